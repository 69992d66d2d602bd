"""A mitmdump script for tests/test_wire_limits.py: mitmproxy exactly as released, optionally
with Keyless's wire patches (KEYLESS_WIREPATCH=1), optionally streaming request bodies
(STREAM_BODIES=1, what Keyless does for credentials that do not need the body)."""

from __future__ import annotations

import os

from mitmproxy import http

if os.environ.get("KEYLESS_WIREPATCH") == "1":
    from proxy.limits import WireLimits
    from proxy.wirepatch import install

    install(WireLimits())


class StreamBodies:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if os.environ.get("STREAM_BODIES") == "1":
            flow.request.stream = True


addons = [StreamBodies()]
