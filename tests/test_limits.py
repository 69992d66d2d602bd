"""proxy/limits.py without mitmproxy: config, head inspection, field checks, framing, clock.

End-to-end tests with a real Keyless, real clients and raw-socket upstreams are in
tests/test_wire_limits.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.limits import (
    ConnectionClock,
    WireLimits,
    check_fields,
    host_line,
    http1_framing,
    inspect_http1_head,
    raw_refusal,
    request_line,
)
from tests.harness import REPO

SMALL = WireLimits(max_header_bytes=1024, max_headers=5)


def _config(tmp_path: Path, limits: Any) -> Any:
    raw = {"tls": {"ca_dir": str(tmp_path / "ca")}, "policy": {"dir": str(REPO / "policies")},
           "listen": {"limits": limits}}
    return parse_config(raw, tmp_path / "keyless.yaml")


def test_defaults_are_envoy_and_nginx_like(tmp_path: Path) -> None:
    limits = _config(tmp_path, None).listen.limits
    assert limits == WireLimits()
    assert (limits.max_header_bytes, limits.max_headers) == (61440, 100)
    assert (limits.idle_timeout, limits.header_timeout, limits.request_timeout) == (60, 10, 300)


def test_limits_parse_sizes_and_numbers(tmp_path: Path) -> None:
    limits = _config(tmp_path, {"max_header_bytes": "32k", "max_headers": 20, "idle_timeout": 0,
                                "header_timeout": 2.5, "max_connections": 10, "retry_after": 3}).listen.limits
    assert limits.max_header_bytes == 32768 and limits.max_headers == 20
    assert limits.idle_timeout == 0 and limits.header_timeout == 2.5 and limits.max_connections == 10
    assert _config(tmp_path, {"max_header_bytes": 4096}).listen.limits.max_header_bytes == 4096


def test_limits_report_every_problem_with_its_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, {"max_header_bytes": "60 KB", "max_headers": 0, "idle_timeout": -1,
                           "request_timout": 5, "max_connections": True})
    problems = e.value.problems
    for path in ("listen.limits.max_header_bytes", "listen.limits.max_headers", "listen.limits.idle_timeout",
                 "listen.limits.request_timout", "listen.limits.max_connections"):
        assert any(p.startswith(path + ":") for p in problems), (path, problems)
    assert len(problems) == 5
    assert any("did you mean 'request_timeout'" in p for p in problems)
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, {"max_header_bytes": 100})
    assert "1k to 16m" in e.value.problems[0]


# --- HTTP/1 head inspection ------------------------------------------------------------------


def head(*lines: bytes, end: bool = True) -> bytes:
    return b"\r\n".join([b"GET http://a.example/ HTTP/1.1", *lines]) + (b"\r\n\r\n" if end else b"\r\n")


def test_good_heads_pass_complete_or_not() -> None:
    assert inspect_http1_head(head(b"Host: a.example", b"X-Tab: a\tb"), SMALL) is None
    assert inspect_http1_head(head(b"Host: a.example", end=False), SMALL) is None
    assert inspect_http1_head(b"\r\n\r\n" + head(b"Host: a"), SMALL) is None  # leading empty lines
    assert inspect_http1_head(b"GET / HT", SMALL) is None
    assert inspect_http1_head(b"GET / HTTP/1.1\nHost: a\n\n", SMALL) is None  # bare LF endings


@pytest.mark.parametrize("line", [b" chunked", b"\tfolded", b"Transfer-Encoding : chunked", b"X\x01: 1",
                                  b"no colon", b": empty name", b"X: a\rb", b"X: a\x00b"])
def test_malformed_lines_are_400(line: bytes) -> None:
    error = inspect_http1_head(head(b"Host: a", line), SMALL)
    assert error is not None and error.code == "bad_request" and error.status == 400


def test_obs_fold_is_caught_before_the_head_completes() -> None:
    error = inspect_http1_head(head(b"Transfer-Encoding: identity", b" chunked", b"X-More: 1", end=False), SMALL)
    assert error is not None and "obs-fold" in error.message


def test_size_limit_applies_to_incomplete_and_complete_heads() -> None:
    partial = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 1100
    error = inspect_http1_head(partial, SMALL)
    assert error is not None and error.code == "request_header_fields_too_large" and error.status == 431
    assert inspect_http1_head(head(b"X-Big: " + b"a" * 1100), SMALL) is not None
    # Exactly at the limit passes; the body after the head does not count.
    at = head(b"X: " + b"a" * (1024 - len(head(b"X: "))))
    assert len(at) == 1024 and inspect_http1_head(at + b"body" * 1000, SMALL) is None
    assert inspect_http1_head(b"\r\n" * 600, SMALL) is not None  # empty lines count too


def test_count_limit_counts_only_complete_lines() -> None:
    five = [b"x%d: y" % i for i in range(5)]
    assert inspect_http1_head(head(*five), SMALL) is None
    assert inspect_http1_head(head(*five, b"x6: y"), SMALL) is not None
    assert inspect_http1_head(head(*five, end=False) + b"x6: partial", SMALL) is None
    assert inspect_http1_head(head(*five, b"x6: y", end=False), SMALL) is not None


def test_request_and_host_lines_name_the_destination() -> None:
    data = b"\r\nGET /x HTTP/1.1\r\nX: 1\r\nhost: api.example:8443\r\nX-Big: aaaa"
    assert request_line(data) == b"GET /x HTTP/1.1"
    assert host_line(data) == host_line(data[2:]) == b"api.example:8443"
    assert request_line(b"GET /" + b"a" * 100) is None
    assert host_line(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n") is None  # not an authority: not trusted
    assert host_line(b"GET / HTTP/1.1\r\nX: 1\r\n\r\nHost: a\r\n") is None  # a body is not a head


# --- fields of any protocol ------------------------------------------------------------------


def test_check_fields() -> None:
    ok = [(b"host", b"a"), (b"x-a", b"1")]
    assert check_fields(ok, SMALL, http2=True) is None
    for bad in ((b"x-a", b"1\r\nx: y"), (b"x-a", b"a\x00"), (b"x a", b"1"), (b"x-a", b"\n")):
        error = check_fields([bad], SMALL, http2=True)
        assert error is not None and error.code == "bad_request"
    error = check_fields([(b"a", b"1"), (b"b c", b"2")], SMALL, http2=True)  # a space among several names
    assert error is not None and error.code == "bad_request"
    error = check_fields([(b"x%d" % i, b"y") for i in range(6)], SMALL, http2=True)
    assert error is not None and error.status == 431
    # HTTP/2 counts 32 bytes per field (RFC 7541), HTTP/1 4: 5 tiny fields are 170 or 30 bytes.
    many = [(b"x", b"y")] * 5
    assert check_fields(many, WireLimits(max_header_bytes=140, max_headers=5), http2=True) is not None
    assert check_fields(many, WireLimits(max_header_bytes=140, max_headers=5), http2=False) is None


# --- HTTP/2 to HTTP/1.1 framing --------------------------------------------------------------


def test_framing_buffered_body_gets_its_exact_length() -> None:
    assert http1_framing([(b"x", b"1")], end_stream=False, buffered_length=42) == [(b"x", b"1"),
                                                                                  (b"content-length", b"42")]
    # A declared length is replaced by the real one (h2 has checked they agree).
    assert http1_framing([(b"content-length", b"5")], end_stream=False, buffered_length=5) is None
    assert http1_framing([(b"content-length", b"5"), (b"x", b"1")], end_stream=False,
                         buffered_length=5) == [(b"x", b"1"), (b"content-length", b"5")]


def test_framing_streamed_body_is_chunked_unless_its_length_is_declared() -> None:
    assert http1_framing([(b"x", b"1")], end_stream=False, buffered_length=None) == [
        (b"x", b"1"), (b"transfer-encoding", b"chunked")]
    assert http1_framing([(b"content-length", b"9")], end_stream=False, buffered_length=None) is None


def test_framing_leaves_bodyless_requests_alone_and_drops_transfer_encoding() -> None:
    assert http1_framing([(b"x", b"1")], end_stream=True, buffered_length=None) is None
    assert http1_framing([(b"x", b"1")], end_stream=True, buffered_length=0) is None
    assert http1_framing([(b"transfer-encoding", b"gzip")], end_stream=False, buffered_length=None) == [
        (b"transfer-encoding", b"chunked")]
    assert http1_framing([(b"Transfer-Encoding", b"chunked")], end_stream=True, buffered_length=None) == []


def test_raw_refusal_is_a_complete_json_response() -> None:
    from proxy.errors import KeylessError

    did, raw = raw_refusal(KeylessError("overloaded", "too many"), retry_after=7)
    head_, _, body = raw.partition(b"\r\n\r\n")
    assert head_.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Retry-After: 7" in head_ and f"Keyless-Decision-Id: {did}".encode() in head_
    assert b"Content-Length: %d" % len(body) in head_ and b"Connection: close" in head_
    assert body.startswith(b'{"error": "overloaded"')


# --- the connection clock --------------------------------------------------------------------


LIM = WireLimits(idle_timeout=60, header_timeout=10, request_timeout=300)


def test_clock_idle_then_head_then_request_then_idle() -> None:
    c = ConnectionClock(LIM, idle_since=0.0)
    assert c.deadline() == (60.0, "idle_timeout")
    c.client_bytes(5.0)
    assert c.deadline() == (15.0, "header_timeout")
    c.client_bytes(9.0)  # more bytes of the same head do not extend it
    assert c.deadline() == (15.0, "header_timeout")
    c.request_started("f1", 12.0)
    assert c.deadline() == (305.0, "request_timeout")  # counted from the head's first byte
    c.request_done("f1", 20.0)
    assert c.deadline() == (80.0, "idle_timeout")


def test_clock_multiplexed_connections_are_idle_until_a_request() -> None:
    c = ConnectionClock(LIM, idle_since=0.0, multiplexed=True)
    c.client_bytes(30.0)  # an HTTP/2 PING while idle
    assert c.deadline() == (60.0, "idle_timeout")
    c.request_started("a", 31.0)
    c.request_started("b", 40.0)
    c.request_done("a", 50.0)
    assert c.deadline() == (340.0, "request_timeout")  # the oldest request still in flight
    c.request_done("b", 70.0)
    assert c.deadline() == (130.0, "idle_timeout")


def test_clock_zero_disables_and_tunnels_are_exempt() -> None:
    c = ConnectionClock(WireLimits(idle_timeout=0, header_timeout=0, request_timeout=0), idle_since=0.0)
    assert c.deadline() is None
    c.client_bytes(1.0)
    assert c.deadline() is None
    c = ConnectionClock(LIM, idle_since=0.0)
    c.exempt = True
    assert c.deadline() is None
