"""strip_credentials after the one-pass rewrite: same removals, same order, on real mitmproxy requests."""

from __future__ import annotations

from mitmproxy import http

from proxy.config import StripConfig
from proxy.strip import strip_credentials


def test_headers_cookies_and_query_params_removed_case_insensitively() -> None:
    req = http.Request.make(
        "GET", "http://api.example:8080/v1/x?page=2&api_key=k1&token=t1&token=t2&Token=also-a-key",
        b"", [(b"Host", b"api.example:8080"), (b"AUTHORIZATION", b"Bearer a"), (b"x-api-key", b"k"),
              (b"X-Api-Key", b"k2"), (b"Cookie", b"s=1"), (b"User-Agent", b"t")])
    removed = strip_credentials(req, StripConfig())
    assert removed == ["authorization", "x-api-key", "cookie", "?api_key", "?token", "?Token"]
    assert list(req.headers.keys()) == ["Host", "User-Agent", "content-length"]
    assert list(req.query.items(multi=True)) == [("page", "2")]


def test_nothing_to_strip_leaves_the_request_alone() -> None:
    req = http.Request.make("GET", "http://api.example/v1/x?page=2", b"", {"Host": "api.example", "Accept": "*/*"})
    assert strip_credentials(req, StripConfig()) == []
    assert req.path == "/v1/x?page=2" and len(req.headers) == 3
    assert strip_credentials(req, StripConfig(cookies=False, query_params=())) == []
