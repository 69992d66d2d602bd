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


def check_path(path: str) -> None:
    """Raise ``bad_request`` if any segment of ``path`` is "." or "..", however encoded."""
    # Memoised for the paths clients repeat; only short ones, so the memo stays small however
    # long the paths a client sends (up to the header limit each).
    if len(path) <= MEMO_PATH:
        _check_path_memo(path)
    else:
        _check_path(path)


# Paths up to this long are memoised (by check_path here, path_template in proxy.policy.input).
MEMO_PATH = 256


@functools.lru_cache(maxsize=4096)
def _check_path_memo(path: str) -> None:
    _check_path(path)


def _check_path(path: str) -> None:
    target = path.split("?", 1)[0]
    for segment in _SEPARATORS.split(unquote(target)):
        if segment.split(";", 1)[0] in (".", ".."):
            raise KeylessError("bad_request", "request path contains dot-segments ('.' or '..')")
