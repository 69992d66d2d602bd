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
    for name in config.headers:
        if name in headers:
            del headers[name]
            removed.append(name)
    if config.cookies and "cookie" in headers:
        del headers["cookie"]
        removed.append("cookie")
    if config.query_params and "?" in request.path:
        query = request.query
        for param in config.query_params:
            if param in query:
                del query[param]
                removed.append(f"?{param}")
    return removed
