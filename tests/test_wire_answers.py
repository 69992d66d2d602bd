"""Every answer is Keyless's: what mitmproxy used to answer with its own HTML page (an upstream
that cannot be reached, a failed TLS handshake, a name that does not resolve, a malformed or
oversize request) is a JSON refusal with a stable code, the Keyless-Decision-Id header and
exactly one audit record whose outcome names what happened.

Real Keyless processes, real clients (curl, raw sockets) and real upstream stand-ins: a closed
port, an HTTPS server whose certificate comes from a CA Keyless does not trust, a name under
``.invalid`` (RFC 6761: never resolves), and recording servers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import free_port
from tests.clients import Reply, curl
from tests.harness import Keyless, Upstream, base_config

LIMIT = 1 << 20  # listen.max_request_body in these tests
POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "paths under /denied are denied"}

decision := {"allow": true, "reason": "the wire-answers test allows the rest"} if {
\tnot startswith(input.request.path, "/denied")
}
"""


# The pipeline streams every allowed body whose credential does not need it (all but SigV4).
StreamingKeyless = Keyless


@dataclass
class World:
    k: Keyless
    upstream: Upstream
    untrusted: Upstream  # HTTPS with a certificate from a CA Keyless does not trust
    refused_port: int

    def audit_since(self, before: int, decision_id: str | None = None, settle: float = 0.3) -> list[dict[str, Any]]:
        """Records written after ``before``; waits for at least one, then a little longer so that
        a second (duplicate) record would show up too."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(self.k.audit()) <= before:
            time.sleep(0.05)
        time.sleep(settle)
        records = self.k.audit()[before:]
        if decision_id is not None:
            assert [r["decision_id"] for r in records] == [decision_id], records
        return records


def _config(tmp: Path, upstream: Upstream, refused_port: int, **listen: Any) -> dict[str, Any]:
    policy = tmp / "policy"
    policy.mkdir(exist_ok=True)
    (policy / "egress.rego").write_text(POLICY)
    return base_config(tmp, upstream, listen={"address": "127.0.0.1", "port": free_port(), **listen},
                       policy={"dir": str(policy)}, egress={"refused_ports": [refused_port]})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("wire-answers")
    upstream = Upstream(tmp / "upstream").start()
    untrusted = Upstream(tmp / "untrusted").start()  # its own, different throwaway CA
    refused_port = free_port()
    k = Keyless(tmp, _config(tmp, upstream, refused_port, max_request_body="1m")).start()
    try:
        yield World(k, upstream, untrusted, refused_port)
    finally:
        k.stop()
        upstream.stop()
        untrusted.stop()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()  # never listened: connections are refused
    return port


def assert_answer(w: World, r: Reply, status: int, code: str, before: int) -> dict[str, Any]:
    """The reply is Keyless's JSON refusal and exactly one audit record says the same."""
    assert r.status == status, (r.status, r.body[:300])
    assert r.headers.get("content-type") == "application/json"
    body = r.json()
    assert body["error"] == code and body["message"]
    assert r.decision_id and body["decision_id"] == r.decision_id
    (rec,) = w.audit_since(before, r.decision_id)
    assert rec["outcome"]["error"] == code and rec["outcome"]["status"] == status
    return rec


# -- upstream failures -------------------------------------------------------------------------


def test_unreachable_upstream_is_a_json_502(world: World) -> None:
    before = len(world.k.audit())
    r = curl(world.k, f"http://localhost:{closed_port()}/v1/x")
    rec = assert_answer(world, r, 502, "upstream_unreachable", before)
    # The policy allowed it; the outcome says the upstream could not be reached.
    assert rec["decision"]["allow"] is True
    assert "Connect call failed" in rec["outcome"]["message"]


def test_unreachable_upstream_inside_a_tunnel_is_a_json_502(world: World) -> None:
    before = len(world.k.audit())
    r = curl(world.k, f"https://localhost:{closed_port()}/v1/x")
    assert_answer(world, r, 502, "upstream_unreachable", before)


def test_upstream_certificate_from_an_untrusted_ca_is_upstream_tls_failed(world: World) -> None:
    before = len(world.k.audit())
    r = curl(world.k, world.untrusted.url("/v1/x"))
    rec = assert_answer(world, r, 502, "upstream_tls_failed", before)
    assert "certificate" in rec["outcome"]["message"].lower()
    assert world.untrusted.received == []


def test_upstream_that_does_not_speak_tls_is_upstream_tls_failed(world: World) -> None:
    before = len(world.k.audit())
    # The plain-HTTP port, asked for https: the handshake fails.
    r = curl(world.k, f"https://localhost:{world.upstream.http_port}/v1/x")
    assert_answer(world, r, 502, "upstream_tls_failed", before)


def test_name_that_does_not_resolve_is_upstream_dns_failed(world: World) -> None:
    before = len(world.k.audit())
    r = curl(world.k, "http://nonexistent.invalid/v1/x")
    rec = assert_answer(world, r, 502, "upstream_dns_failed", before)
    assert rec["decision"]["allow"] is True


def test_refused_upstream_port_is_a_json_forbidden(world: World) -> None:
    before = len(world.k.audit())
    r = curl(world.k, f"http://localhost:{world.refused_port}/v1/x")
    rec = assert_answer(world, r, 403, "forbidden", before)
    assert "refused" in rec["outcome"]["message"] or "port" in rec["outcome"]["message"]


def test_second_request_to_a_failed_upstream_on_the_same_connection_is_answered_too(world: World) -> None:
    # mitmproxy caches the failed connection per client connection and fails the next request
    # without running any connection hook: the answer must still name the cause.
    port = closed_port()
    before = len(world.k.audit())
    with socket.create_connection(("127.0.0.1", world.k.config["listen"]["port"]), timeout=5) as s:
        req = f"GET http://localhost:{port}/v1/a HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()
        s.sendall(req)
        first = read_response(s)
    assert first.status == 502 and first.json()["error"] == "upstream_unreachable"
    assert first.headers.get("connection") == "close"
    assert len(world.audit_since(before)) == 1


# -- malformed requests ------------------------------------------------------------------------


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes
    head: bytes = b""
    rest: bytes = b""
    closed: bool = False
    interim: list[int] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def decision_id(self) -> str | None:
        return self.headers.get("keyless-decision-id")


def read_response(s: socket.socket, *, until_close: bool = False, timeout: float = 5.0) -> Raw:
    """One response (after any 1xx) read off ``s``; ``until_close`` also waits for EOF."""
    s.settimeout(timeout)
    buf = b""
    interim: list[int] = []
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before a response: {buf!r}")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(buf) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    body, rest = buf[:length], buf[length:]
    closed = False
    if until_close:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            rest += chunk
    return Raw(status, headers, body, head, rest, closed, interim)


def raw_exchange(w: World, data: bytes) -> Raw:
    with socket.create_connection(("127.0.0.1", w.k.config["listen"]["port"]), timeout=5) as s:
        s.sendall(data)
        return read_response(s, until_close=True)


def assert_raw_answer(w: World, r: Raw, status: int, code: str, before: int) -> dict[str, Any]:
    assert r.status == status, (r.head, r.body[:300])
    assert r.headers.get("content-type") == "application/json"
    body = r.json()
    assert body["error"] == code and r.decision_id and body["decision_id"] == r.decision_id
    (rec,) = w.audit_since(before, r.decision_id)
    assert rec["outcome"]["error"] == code and rec["outcome"]["status"] == status
    return rec


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"NOT A REQUEST LINE\r\n\r\n", id="request-line"),
    pytest.param(b"GET /v1/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n", id="content-length"),
    pytest.param(b"GET /v1/x HTTP/1.1\r\nHost: localhost\r\nBad Header Line\r\n\r\n", id="header-line"),
])
def test_request_mitmproxy_cannot_parse_is_a_json_400(world: World, request_bytes: bytes) -> None:
    before = len(world.k.audit())
    r = raw_exchange(world, request_bytes)
    rec = assert_raw_answer(world, r, 400, "bad_request", before)
    assert r.closed and rec["decision"] is None
    assert set(rec["request"]) >= {"method", "scheme", "host", "port", "path"}
    assert world.upstream.received == []


def test_parse_error_never_echoes_the_header_line(world: World) -> None:
    before = len(world.k.audit())
    r = raw_exchange(world, b"GET /v1/x HTTP/1.1\r\nHost: localhost\r\nAuthorization Bearer s3cr3t-value\r\n\r\n")
    assert r.status == 400
    assert b"s3cr3t" not in r.body and "s3cr3t" not in json.dumps(world.audit_since(before))


def test_request_without_host_is_a_json_400(world: World) -> None:
    before = len(world.k.audit())
    r = raw_exchange(world, b"GET /v1/x HTTP/1.1\r\n\r\n")
    assert_raw_answer(world, r, 400, "bad_request", before)


def test_smuggling_framing_is_bad_request_not_an_upstream_outage(world: World) -> None:
    port = world.upstream.http_port
    before = len(world.k.audit())
    r = raw_exchange(world, (
        f"POST http://localhost:{port}/v1/x HTTP/1.1\r\nHost: localhost:{port}\r\n"
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode())
    rec = assert_raw_answer(world, r, 400, "bad_request", before)
    assert rec["request"]["path"] == "/v1/x"
    assert world.upstream.received == []


# -- request body limit, Connection: close, Expect -----------------------------------------------


def test_declared_length_over_the_limit_is_refused_before_the_body(world: World) -> None:
    port = world.upstream.http_port
    before = len(world.k.audit())
    with socket.create_connection(("127.0.0.1", world.k.config["listen"]["port"]), timeout=5) as s:
        # Headers only: the answer must come without a byte of the body being sent.
        s.sendall(f"POST http://localhost:{port}/v1/up HTTP/1.1\r\nHost: localhost:{port}\r\n"
                  f"Content-Length: {LIMIT + 1}\r\n\r\n".encode())
        r = read_response(s, until_close=True)
    assert_raw_answer(world, r, 413, "body_too_large", before)
    assert r.headers.get("connection") == "close" and r.closed
    assert world.upstream.received == []


def test_chunked_body_over_the_limit_is_refused_and_not_forwarded(world: World) -> None:
    port = world.upstream.http_port
    before = len(world.k.audit())
    with socket.create_connection(("127.0.0.1", world.k.config["listen"]["port"]), timeout=5) as s:
        s.sendall(f"POST http://localhost:{port}/v1/up HTTP/1.1\r\nHost: localhost:{port}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 65536
        for _ in range(LIMIT // len(chunk) + 2):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        r = read_response(s, until_close=True)
    rec = assert_raw_answer(world, r, 413, "body_too_large", before)
    assert rec["decision"]["allow"] is True and r.closed
    assert world.upstream.received == []


def test_body_at_the_limit_is_forwarded(world: World) -> None:
    world.upstream.received.clear()
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect:",
                        "--data-binary", "@-", world.upstream.url("/v1/exact", tls=False)],
                       input=b"y" * LIMIT, env=world.k.client_env(), capture_output=True, timeout=30)
    assert r.stdout == b"200"
    assert [len(x.body) for x in world.upstream.received] == [LIMIT]
    world.upstream.received.clear()


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[World]:
    """Keyless with the default request limit (64m), beside the module's 1m one."""
    tmp = tmp_path_factory.mktemp("wire-answers-roomy")
    k = Keyless(tmp, _config(tmp, world.upstream, closed_port())).start()
    try:
        yield World(k, world.upstream, world.untrusted, 0)
    finally:
        k.stop()


def test_curl_uploading_20mb_to_a_denied_url_finishes_quickly(roomy: World, tmp_path: Path) -> None:
    world = roomy
    big = tmp_path / "big"
    big.write_bytes(b"z" * (20 << 20))
    for expect in ("Expect:", "Expect: 100-continue"):
        before = len(world.k.audit())
        started = time.monotonic()
        out = subprocess.run(["curl", "-sS", "--max-time", "20", "-H", expect, "-D", "-", "--data-binary",
                              f"@{big}", world.upstream.url("/denied/upload", tls=False)],
                             env=world.k.client_env(), capture_output=True, timeout=30)
        elapsed = time.monotonic() - started
        text = out.stdout.decode(errors="replace")
        assert " 403 " in text.splitlines()[0], (expect, out.stderr, text[:300])
        assert "100 Continue" not in text
        body = json.loads(text.split("\r\n\r\n", 1)[1])
        assert body["error"] == "forbidden"
        assert elapsed < 5, (expect, elapsed)
        (rec,) = world.audit_since(before, body["decision_id"])
        assert rec["outcome"]["status"] == 403
    assert world.upstream.received == []


def test_refused_request_with_expect_gets_no_100_continue(world: World) -> None:
    port = world.upstream.http_port
    before = len(world.k.audit())
    with socket.create_connection(("127.0.0.1", world.k.config["listen"]["port"]), timeout=5) as s:
        s.sendall(f"POST http://localhost:{port}/denied/x HTTP/1.1\r\nHost: localhost:{port}\r\n"
                  "Content-Length: 500000\r\nExpect: 100-continue\r\n\r\n".encode())
        r = read_response(s, until_close=True)
    assert r.interim == [] and not r.head.startswith(b"HTTP/1.1 100")
    assert_raw_answer(world, r, 403, "forbidden", before)
    assert r.headers.get("connection") == "close" and r.closed


def test_allowed_request_with_expect_gets_100_then_the_body_reaches_the_upstream(world: World) -> None:
    port = world.upstream.http_port
    world.upstream.received.clear()
    body = b"b" * 300_000
    with socket.create_connection(("127.0.0.1", world.k.config["listen"]["port"]), timeout=5) as s:
        s.sendall(f"POST http://localhost:{port}/v1/expect HTTP/1.1\r\nHost: localhost:{port}\r\n"
                  f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        s.settimeout(5)
        interim = s.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        s.sendall(body)
        r = read_response(s)
    assert r.status == 200 and r.decision_id
    assert [x.body for x in world.upstream.received] == [body]
    assert "expect" not in world.upstream.received[0].headers
    world.upstream.received.clear()


def test_refused_request_that_sent_its_body_keeps_the_connection(world: World) -> None:
    # Nothing left unread: the refusal goes out the ordinary way and the connection stays usable.
    port = world.upstream.http_port
    with socket.create_connection(("127.0.0.1", world.k.config["listen"]["port"]), timeout=5) as s:
        s.sendall(f"GET http://localhost:{port}/denied/a HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        first = read_response(s)
        s.sendall(f"GET http://localhost:{port}/v1/b HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        second = read_response(s)
    assert first.status == 403 and first.json()["error"] == "forbidden"
    assert second.status == 200


# -- responses are not limited by the request limit -------------------------------------------


class BigServer:
    """A plain HTTP server answering every request with ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % self.size)
                conn.sendall(b"d" * self.size)


class ScriptedServer:
    """A plain HTTP server that answers every request with ``reply`` bytes, then closes."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                conn.sendall(self.reply)


@pytest.mark.parametrize("reply", [
    pytest.param(b"", id="closes-without-answer"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 id="smuggling-framing"),
    pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
    # Buffered: nothing of it reached the client yet, so the client still gets a clean answer.
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ntruncated", id="truncated-body"),
])
def test_upstream_that_fails_before_its_answer_is_complete_is_upstream_failed(world: World, reply: bytes) -> None:
    server = ScriptedServer(reply)
    try:
        before = len(world.k.audit())
        r = curl(world.k, f"http://localhost:{server.port}/v1/x")
        rec = assert_answer(world, r, 502, "upstream_failed", before)
        assert rec["decision"]["allow"] is True
    finally:
        server.sock.close()


def test_client_that_keeps_uploading_without_reading_is_cut_off(roomy: World) -> None:
    port = roomy.upstream.http_port
    sent = 0
    with socket.create_connection(("127.0.0.1", roomy.k.config["listen"]["port"]), timeout=5) as s:
        s.sendall(f"POST http://localhost:{port}/denied/flood HTTP/1.1\r\nHost: localhost:{port}\r\n"
                  f"Content-Length: {60 << 20}\r\n\r\n".encode())
        chunk = b"f" * 65536
        started = time.monotonic()
        with pytest.raises(OSError):  # EPIPE / ECONNRESET once Keyless stops reading
            while sent < 60 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        assert time.monotonic() - started < 10
    # Keyless read and dropped a bounded amount (plus what the socket buffers held).
    assert sent < 30 << 20


def test_response_larger_than_the_request_limit_is_delivered(world: World) -> None:
    server = BigServer(4 * LIMIT)
    out = subprocess.run(["curl", "-sS", "-o", "-", f"http://localhost:{server.port}/v1/big"],
                         env=world.k.client_env(), capture_output=True, timeout=30)
    server.sock.close()
    assert len(out.stdout) == 4 * LIMIT, out.stderr


def test_download_over_64_mib_is_not_capped_by_default(roomy: World) -> None:
    # mitmproxy's body_size_limit (once set to the request limit) also capped responses: 502.
    size = (64 << 20) + 1
    server = BigServer(size)
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                          f"http://localhost:{server.port}/v1/big"], env=roomy.k.client_env(), capture_output=True,
                         text=True, timeout=60)
    server.sock.close()
    assert out.stdout == f"200 {size}", out.stderr


# -- streamed request bodies ----------------------------------------------------------------


def test_streamed_body_over_the_limit_is_cut_and_refused(tmp_path: Path, upstream: Upstream) -> None:
    k = StreamingKeyless(tmp_path, _config(tmp_path, upstream, closed_port(), max_request_body="256k")).start()
    w = World(k, upstream, upstream, 0)
    try:
        port = upstream.http_port
        small = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect:",
                                "-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
                                upstream.url("/v1/small", tls=False)],
                               input=b"s" * 100_000, env=k.client_env(), capture_output=True, timeout=30)
        assert small.stdout == b"200"
        assert [len(x.body) for x in upstream.received] == [100_000]
        before = len(k.audit())
        with socket.create_connection(("127.0.0.1", k.config["listen"]["port"]), timeout=5) as s:
            s.sendall(f"POST http://localhost:{port}/v1/big HTTP/1.1\r\nHost: localhost:{port}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"x" * 65536
            for _ in range(8):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            r = read_response(s, until_close=True)
        assert_raw_answer(w, r, 413, "body_too_large", before)
        # The upstream saw the start of the body but never a complete request.
        assert len(upstream.received) == 1
        # A streamed request whose upstream cannot be reached: answered while its body is still
        # on the way, and the connection ends instead of waiting for the rest.
        dead = closed_port()
        before = len(k.audit())
        with socket.create_connection(("127.0.0.1", k.config["listen"]["port"]), timeout=5) as s:
            s.sendall(f"POST http://localhost:{dead}/v1/up HTTP/1.1\r\nHost: localhost:{dead}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n".encode())
            s.sendall(b"%x\r\n%s\r\n" % (1000, b"c" * 1000))
            r = read_response(s, until_close=True)
        assert_raw_answer(w, r, 502, "upstream_unreachable", before)
        assert r.closed
    finally:
        k.stop()


# -- HTTP/2 -----------------------------------------------------------------------------------


class H2Client:
    """A minimal HTTP/2 client (the h2 library) through a CONNECT tunnel, TLS with Keyless's CA."""

    def __init__(self, k: Keyless, port: int) -> None:
        import ssl

        import h2.config
        import h2.connection

        raw = socket.create_connection(("127.0.0.1", k.config["listen"]["port"]), timeout=5)
        raw.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        assert read_response(raw).status == 200
        ctx = ssl.create_default_context(cafile=str(k.ca_cert))
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.authority = f"localhost:{port}"
        self._flush()

    def _flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def start(self, method: str, path: str, *, end_stream: bool, length: int | None = None) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "https"), (":authority", self.authority), (":path", path)]
        if length is not None:
            headers.append(("content-length", str(length)))
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self._flush()
        return sid

    def result(self, sid: int, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes, bool]:
        """(status, headers, body, reset) of stream ``sid``: reset is True when Keyless reset it."""
        import h2.events

        status, headers, body = 0, {}, b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.sock.recv(65536)
            if not data:
                break
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    headers = {k.decode(): v.decode() for k, v in ev.headers}
                    status = int(headers[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    body += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self._flush()
                    return status, headers, body, False
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    return status, headers, body, True
            self._flush()
        raise AssertionError(f"stream {sid} did not end: {status} {body[:200]!r}")

    def upload(self, sid: int, total: int, timeout: float = 10.0) -> list[Any]:
        """Send up to ``total`` body bytes on ``sid`` as flow control allows, reading whatever
        Keyless sends meanwhile; stop once it answers or resets the stream. Returns the events
        received."""
        import select

        import h2.events

        got: list[Any] = []
        sent = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) for ev in got):
                break
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, total - sent)
            if window > 0:
                self.conn.send_data(sid, b"u" * window)
                sent += window
                self._flush()
            readable, _, _ = select.select([self.sock], [], [], 0 if window > 0 else 0.2)
            if readable or self.sock.pending():
                data = self.sock.recv(65536)
                if not data:
                    break
                got.extend(self.conn.receive_data(data))
                self._flush()
        return got

    def reset_follows(self, sid: int, timeout: float = 3.0) -> bool:
        """Whether Keyless resets stream ``sid`` (after its complete answer)."""
        import h2.events

        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return False
            events = self.conn.receive_data(data)
            if any(isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid for ev in events):
                return True
            self._flush()
        return False

    def close(self) -> None:
        self.sock.close()


def test_http2_refusal_goes_out_before_the_body_and_the_connection_stays_usable(world: World) -> None:
    client = H2Client(world.k, world.upstream.https_port)
    try:
        before = len(world.k.audit())
        sid = client.start("POST", "/denied/h2", end_stream=False, length=500_000)
        status, headers, body, _ = client.result(sid)
        assert status == 403 and json.loads(body)["error"] == "forbidden"
        assert headers["keyless-decision-id"] == json.loads(body)["decision_id"]
        # RFC 9113 8.1: the complete answer, then RST_STREAM tells the client to stop uploading.
        assert client.reset_follows(sid)
        world.audit_since(before, headers["keyless-decision-id"])
        ok = client.start("GET", "/v1/h2-after", end_stream=True)
        assert client.result(ok)[0] == 200
    finally:
        client.close()


def test_http2_body_over_the_declared_limit_is_a_json_413(world: World) -> None:
    client = H2Client(world.k, world.upstream.https_port)
    try:
        before = len(world.k.audit())
        sid = client.start("POST", "/v1/h2-big", end_stream=False, length=LIMIT + 1)
        status, headers, body, _ = client.result(sid)
        assert status == 413 and json.loads(body)["error"] == "body_too_large"
        world.audit_since(before, headers["keyless-decision-id"])
    finally:
        client.close()


def test_http2_unreachable_upstream_is_a_json_502(world: World) -> None:
    client = H2Client(world.k, closed_port())
    try:
        before = len(world.k.audit())
        sid = client.start("GET", "/v1/h2", end_stream=True)
        status, headers, body, _ = client.result(sid)
        assert status == 502 and json.loads(body)["error"] == "upstream_unreachable"
        assert headers["content-type"] == "application/json"
        world.audit_since(before, headers["keyless-decision-id"])
    finally:
        client.close()


# -- plain functions and config ----------------------------------------------------------------


def _listen(tmp: Path, **listen: Any) -> Any:
    from proxy.config import parse_config

    (tmp / "policy").mkdir(exist_ok=True)
    raw = {"listen": listen, "tls": {"ca_dir": str(tmp / "ca")}, "policy": {"dir": str(tmp / "policy")}}
    return parse_config(raw, tmp / "keyless.yaml").listen


def test_max_request_body_and_its_deprecated_alias(tmp_path: Path) -> None:
    from proxy.errors import ConfigError

    assert _listen(tmp_path).max_request_body == 64 << 20
    assert _listen(tmp_path, max_request_body="512k").max_request_body == 512 << 10
    assert _listen(tmp_path, max_request_body=1000).max_request_body == 1000
    assert _listen(tmp_path, max_body_size="2m").max_request_body == 2 << 20
    for bad, key in (({"max_request_body": "64 MB"}, "listen.max_request_body"),
                     ({"max_request_body": 0}, "listen.max_request_body"),
                     ({"max_body_size": "1m", "max_request_body": "1m"}, "listen.max_body_size")):
        with pytest.raises(ConfigError) as e:
            _listen(tmp_path, **bad)
        assert any(p.startswith(key + ":") for p in e.value.problems), e.value.problems


def test_connect_errors_are_told_apart_by_errno() -> None:
    from proxy.answers import connect_error

    assert connect_error("[Errno 111] Connect call failed ('127.0.0.1', 9)").code == "upstream_unreachable"
    assert connect_error("[Errno -2] Name or service not known").code == "upstream_dns_failed"
    assert connect_error("[Errno 110] Connect call failed ('10.0.0.1', 443)").code == "upstream_timeout"
    assert connect_error("Multiple exceptions: [Errno 111] a, [Errno 99] b").code == "upstream_unreachable"
    assert connect_error("connection cancelled").code == "upstream_unreachable"


def test_wire_refusal_never_quotes_the_input() -> None:
    from proxy.answers import WireError, wire_refusal

    e = wire_refusal(WireError("GENERIC_CLIENT_ERROR", "Invalid header line: b'Authorization Bearer s3cret'"))
    assert e.code == "bad_request" and "s3cret" not in e.message
    e = wire_refusal(WireError("REQUEST_VALIDATION_FAILED",
                               "Received invalid transfer-encoding header: 'x' from client, refusing ..."))
    assert e.code == "bad_request" and e.message == "malformed request: invalid transfer-encoding header"
    assert wire_refusal(WireError("GENERIC_SERVER_ERROR", "server closed connection")).code == "upstream_failed"
    assert not WireError("CLIENT_DISCONNECTED", "Client disconnected.").answerable


def test_error_answer_from_what_the_layer_recorded() -> None:
    from mitmproxy.test import tflow

    from proxy.answer_layers import ANSWER, SENT, WIRE, _unreported, error_answer
    from proxy.answers import WireError, tls_error
    from proxy.errors import KeylessError

    f = tflow.tflow()
    f.metadata[WIRE] = WireError("CONNECT_FAILED", "Certificate verify failed: self-signed")
    found = error_answer(f, None, tls_error("Certificate verify failed"), "d1")
    assert found is not None and found[0].code == "upstream_tls_failed" and found[1] is True
    assert f.metadata[ANSWER].decision_id == "d1" and f.metadata[ANSWER].error.status == 502
    # A refusal Keyless already made wins over what the wire says.
    g = tflow.tflow()
    g.metadata[WIRE] = WireError("REQUEST_VALIDATION_FAILED", "Received both ...")
    refused = KeylessError("forbidden", "denied")
    assert error_answer(g, refused, None, "d2") == (refused, True)
    # After the upstream's headers went out there is nothing left to answer, only to record.
    h = tflow.tflow(resp=True)
    h.metadata[WIRE], h.metadata[SENT] = WireError("GENERIC_SERVER_ERROR", "server closed connection"), True
    found = error_answer(h, None, None, "d3")
    assert found is not None and found[0].code == "upstream_failed" and found[1] is False and ANSWER not in h.metadata
    # The client going away, or a kill, is not answered.
    i = tflow.tflow()
    i.metadata[WIRE] = WireError("CLIENT_DISCONNECTED", "Client disconnected.")
    assert error_answer(i, None, None, "d4") is None
    j = tflow.tflow()
    j.kill()
    assert not _unreported(j).answerable


def test_http2_body_without_length_growing_over_the_limit_is_a_json_413(world: World) -> None:
    import h2.events

    client = H2Client(world.k, world.upstream.https_port)
    try:
        world.upstream.received.clear()
        before = len(world.k.audit())
        sid = client.start("POST", "/v1/h2-growing", end_stream=False)  # no content-length (legal in h2)
        got = client.upload(sid, 3 * LIMIT)
        heads = [dict((k.decode(), v.decode()) for k, v in ev.headers) for ev in got
                 if isinstance(ev, h2.events.ResponseReceived)]
        assert heads and heads[0][":status"] == "413", got
        (rec,) = world.audit_since(before, heads[0]["keyless-decision-id"])
        assert rec["outcome"]["error"] == "body_too_large"
        assert world.upstream.received == []
    finally:
        client.close()


def test_curl_with_expect_gets_100_after_the_decision_and_uploads_to_an_allowed_url(roomy: World,
                                                                                   tmp_path: Path) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"e" * 1_000_000)  # the aiohttp upstream takes at most 1 MiB
    roomy.upstream.received.clear()
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "-H", "Expect: 100-continue", "-D", "-", "-o",
                          "/dev/null", "--data-binary", f"@{body}", roomy.upstream.url("/v1/up", tls=False)],
                         env=roomy.k.client_env(), capture_output=True, timeout=30)
    text = out.stdout.decode(errors="replace")
    assert text.startswith("HTTP/1.1 100 Continue"), (out.stderr, text[:300])
    assert "HTTP/1.1 200" in text
    assert [len(r.body) for r in roomy.upstream.received] == [1_000_000]
    roomy.upstream.received.clear()


def test_answered_codes_are_exactly_those_mitmproxy_answers_with_a_page() -> None:
    # If a mitmproxy upgrade adds an error code with a status, this says where to classify it.
    from mitmproxy.proxy.layers.http._events import ErrorCode

    from proxy.answers import WireError

    for code in ErrorCode:
        assert WireError(code.name, "").answerable == (code.http_status_code() is not None), code
