"""Request-target checks that must hold before the policy sees a path.

The policy decides on the path as sent. Many servers (and the frameworks behind them) resolve
dot-segments before routing, also percent-encoded ones ("%2e%2e", "..%2f") and Tomcat's
"..;" form, so "/v1/../admin" would be decided as a call under "/v1/" and then served as
"/admin" with the injected credential. RFC 3986 clients remove dot-segments before sending
(curl and urllib3 do), so a request that still has them is refused rather than guessed at.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import unquote

from proxy.errors import KeylessError

_SEPARATORS = re.compile(r"[/\\]")


@functools.lru_cache(maxsize=4096)
def check_path(path: str) -> None:
    """Raise ``bad_request`` if any segment of ``path`` is "." or "..", however encoded."""
    target = path.split("?", 1)[0]
    for segment in _SEPARATORS.split(unquote(target)):
        if segment.split(";", 1)[0] in (".", ".."):
            raise KeylessError("bad_request", "request path contains dot-segments ('.' or '..')")
