"""Strip: remove every credential the app sent before anything is injected."""

from __future__ import annotations

from proxy.config import StripConfig
from proxy.model import OutboundRequest


def strip_credentials(request: OutboundRequest, config: StripConfig) -> list[str]:
    """Remove credential headers, cookies and API-key query parameters in place.

    Returns the names removed (never their values), for the audit record.
    """
    removed: list[str] = []
    headers = request.headers
    # One pass over the names present instead of a case-insensitive lookup per configured
    # name (mitmproxy's Headers scans every field on each ``in``): ~13 us -> ~3 us a request.
    present = {name.lower() for name in headers}
    for name in config.headers:
        if name in present and name in headers:
            del headers[name]
            removed.append(name)
    if config.cookies and "cookie" in present and "cookie" in headers:
        del headers["cookie"]
        removed.append("cookie")
    if config.query_params and "?" in request.path:
        query = request.query
        # mitmproxy re-parses the URL on every lookup through this view: read the names once.
        for name in dict.fromkeys(query):  # each name once, in request order
            if name.lower() in config.query_params:
                del query[name]
                removed.append(f"?{name}")
    return removed
