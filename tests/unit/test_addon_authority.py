"""The addon's hooks make the canonical Target what mitmproxy dials and what the upstream is told.

In process, on mitmproxy's real flows and the real pipeline (the rig of tests/unit/test_addon.py):
after ``http_connect`` the tunnel address is canonical; after ``requestheaders`` the request's
host, its Host header (IPv6 in brackets, which mitmproxy's own host setter leaves out) and the
upstream TLS name are canonical; a host with no canonical form is refused with one record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import http

from tests.unit.test_addon import Rig, assert_refused, plain_flow


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def request(url: str, host_header: str) -> http.HTTPFlow:
    f = plain_flow()
    f.request = http.Request.make("GET", url, b"", {})
    # Set after make(): make() writes Host itself, and without brackets for IPv6.
    f.request.headers["Host"] = host_header
    return f


def test_requestheaders_points_the_request_at_the_canonical_host(rig: Rig) -> None:
    f = request("http://API.EXAMPLE.:8000/open/x", "Api.Example.:8000")
    rig.run(rig.addon.requestheaders, f)
    assert f.response is None, f.response and f.response.content
    assert (f.request.host, f.request.port, f.request.headers["Host"]) == ("api.example", 8000, "api.example:8000")
    assert f.server_conn.sni == "api.example"
    rig.run(rig.addon.response, _answered(f))
    assert rig.records()[0]["request"]["host"] == "api.example"


def test_numeric_and_ipv6_spellings_are_rewritten_with_brackets(rig: Rig) -> None:
    f = request("http://2130706433:8000/open/x", "0x7f.1:8000")
    rig.run(rig.addon.requestheaders, f)
    assert f.response is None
    assert (f.request.host, f.request.headers["Host"]) == ("127.0.0.1", "127.0.0.1:8000")
    f = request("http://[0:0::1]:8000/open/x", "[::0:1]:8000")
    rig.run(rig.addon.requestheaders, f)
    assert f.response is None
    assert (f.request.host, f.request.headers["Host"]) == ("::1", "[::1]:8000")


def test_http_connect_makes_the_tunnel_address_canonical(rig: Rig) -> None:
    f = plain_flow()
    f.request = http.Request.make("CONNECT", "http://0x7f000001:8443", b"", {})
    rig.run(rig.addon.http_connect, f)
    assert f.response is None
    assert (f.request.host, f.request.port, f.request.authority) == ("127.0.0.1", 8443, "127.0.0.1:8443")
    # The request inside the tunnel may spell it differently; it is the same destination.
    inner = request("http://127.1:8443/open/x", "[::ffff:127.0.0.1]:8443")
    inner.client_conn = f.client_conn
    rig.run(rig.addon.requestheaders, inner)
    assert inner.response is None, inner.response and inner.response.content


def test_a_host_with_no_canonical_form_is_refused_once(rig: Rig) -> None:
    f = request("http://1.2.3.4.5:8000/open/x", "1.2.3.4.5:8000")
    rig.run(rig.addon.requestheaders, f)
    record = assert_refused(rig, f, 400, "bad_request")
    assert record["request"]["host"] == "1.2.3.4.5" and record["decision"] is None
    assert "not a valid IPv4 address" in json.loads(f.response.content or b"")["message"]  # type: ignore[union-attr]


def _answered(f: http.HTTPFlow) -> http.HTTPFlow:
    f.response = http.Response.make(200, b"ok")
    return f
