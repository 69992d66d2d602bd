"""Wire limits end to end: nothing a client sends on the wire gets past the policy.

A real Keyless process (tests/harness.py), raw-socket clients that send exactly the bytes an
attacker would, an h2 client (the ``h2`` library over TLS through CONNECT) and a raw-socket
HTTP/1.1 upstream (tests/rawpeer.py) that logs every byte it receives and parses them the
lenient way a smuggling attack relies on. Timeouts are small so that each test stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from proxy.demo import free_port
from tests.harness import REPO, Keyless, audit_record, base_config
from tests.rawpeer import RawUpstream

LIMITS = {"max_header_bytes": "16k", "max_headers": 50, "idle_timeout": 1.5, "header_timeout": 1.0,
          "request_timeout": 3.0, "max_connections": 12, "retry_after": 7}


@dataclass
class Env:
    k: Keyless
    up: RawUpstream  # plain HTTP
    silent: RawUpstream  # plain HTTP, never answers
    tls_up: RawUpstream  # HTTPS, ALPN http/1.1 only
    secret: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("wire-limits")
    up = RawUpstream().start()
    silent = RawUpstream(answer=False).start()
    tls_up = RawUpstream(tmp / "tls-up").start()
    secret = "canary-wire-limits-secret"
    (tmp / "file-key").write_text(secret + "\n")
    cfg = base_config(
        tmp,
        policy={"dir": str(REPO / "tests" / "policies" / "e2e")},
        credentials={"file-key": {"type": "static", "from": "file", "file": str(tmp / "file-key")}},
    )
    cfg["listen"]["limits"] = LIMITS
    cfg["tls"]["upstream_ca"] = str(tls_up.ca_file)
    k = Keyless(tmp, cfg).start(log_level="info")
    try:
        yield Env(k, up, silent, tls_up, secret)
    finally:
        k.stop()
        up.stop()
        silent.stop()
        tls_up.stop()


@pytest.fixture(autouse=True)
def _fresh(env: Env) -> None:
    for u in (env.up, env.silent, env.tls_up):
        u.connections.clear()
        u.requests.clear()


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(env: Env, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", env.k.config["listen"]["port"]), timeout=timeout)


def read_answer(sock: socket.socket) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(lines[0].split(" ", 2)[1]), headers, body[:length])


def closed_by_peer(sock: socket.socket, within: float) -> float:
    """Seconds until the peer closes ``sock`` (reading and discarding what it sends)."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        raise AssertionError(f"connection still open after {within}s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def audit_for(env: Env, decision_id: str, timeout: float = 5.0) -> dict[str, Any]:
    return audit_record(env.k, decision_id, timeout)


def assert_refusal(env: Env, a: Answer, status: int, code: str) -> dict[str, Any]:
    assert a.status == status, (a.status, a.body)
    body = a.json()
    assert set(body) == {"error", "message", "decision_id"} and body["error"] == code
    assert a.headers["keyless-decision-id"] == body["decision_id"]
    rec = audit_for(env, body["decision_id"])
    assert rec["outcome"]["error"] == code and rec["outcome"]["status"] == status
    return rec


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def allowed_target(env: Env) -> str:
    # The e2e policy grants billing (127.0.0.1) GET/POST /v1/ on "localhost" with file-key.
    return f"localhost:{env.up.port}"


# --- obs-fold, bad names, CR/LF/NUL ----------------------------------------------------------


def test_folded_transfer_encoding_cannot_smuggle_a_request(env: Env) -> None:
    target = allowed_target(env)
    smuggled = f"GET /v1/admin HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer app-own\r\n\r\n"
    chunked = f"0\r\n\r\n{smuggled}"
    request = (f"POST http://{target}/v1/upload HTTP/1.1\r\nHost: {target}\r\n"
               f"Transfer-Encoding: identity\r\n chunked\r\nContent-Length: {len(chunked)}\r\n\r\n{chunked}")
    with connect(env) as s:
        s.sendall(request.encode())
        a = read_answer(s)
        rec = assert_refusal(env, a, 400, "bad_request")
        assert "obs-fold" in a.json()["message"]
        assert rec["request"]["path"] == "/v1/upload"
        closed_by_peer(s, 3)  # nothing after a broken head is read as a request
    time.sleep(0.3)
    assert env.up.connections == [] and env.up.requests == []


def test_folded_authorization_never_reaches_the_upstream(env: Env) -> None:
    target = allowed_target(env)
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/x HTTP/1.1\r\nHost: {target}\r\nX-Note: a\r\n"
                  "Authorization: Basic\r\n\tYXBwOnNlY3JldA==\r\n\r\n".encode())
        assert_refusal(env, read_answer(s), 400, "bad_request")
    time.sleep(0.3)
    assert env.up.connections == []


@pytest.mark.parametrize("line", [
    b"Transfer-Encoding : chunked",   # whitespace before the colon
    b"X-A\x00b: 1",                   # NUL in a name
    b"X-Ok: a\rTransfer-Encoding: chunked",  # bare CR inside a value
    b"X-Ok: a\x00b",                  # NUL in a value
    b"no colon here",
])
def test_malformed_header_lines_are_400(env: Env, line: bytes) -> None:
    target = allowed_target(env)
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/x HTTP/1.1\r\nHost: {target}\r\n".encode() + line + b"\r\n\r\n")
        assert_refusal(env, read_answer(s), 400, "bad_request")
    assert env.up.connections == []


@contextlib.contextmanager
def tls_tunnel(env: Env, port: int) -> Iterator[ssl.SSLSocket]:
    with connect(env) as raw:
        raw.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(env.k.ca_cert))
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            yield tls


def test_inside_a_tls_tunnel_the_refusal_names_the_tunnel_destination(env: Env) -> None:
    """Origin-form requests: the refused head's Host line, or else the CONNECT authority,
    names the destination in the audit record; the refusal travels inside the TLS tunnel."""
    port = env.tls_up.port
    with tls_tunnel(env, port) as tls:
        tls.sendall(f"POST /v1/x HTTP/1.1\r\nHost: localhost:{port}\r\nX-A: 1\r\n 2\r\n\r\n".encode())
        rec = assert_refusal(env, read_answer(tls), 400, "bad_request")
    assert (rec["request"]["host"], rec["request"]["port"], rec["request"]["path"]) == ("localhost", port, "/v1/x")
    with tls_tunnel(env, port) as tls:
        with contextlib.suppress(OSError):
            tls.sendall(b"GET /v1/y HTTP/1.1\r\nX-Big: " + b"a" * 40_000)
        rec = assert_refusal(env, read_answer(tls), 431, "request_header_fields_too_large")
    assert (rec["request"]["host"], rec["request"]["port"], rec["request"]["path"]) == ("localhost", port, "/v1/y")
    assert env.tls_up.connections == []


def test_malformed_connect_is_refused_and_opens_no_tunnel(env: Env) -> None:
    with connect(env) as s:
        s.sendall(f"CONNECT localhost:{env.tls_up.port} HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n 2\r\n\r\n".encode())
        rec = assert_refusal(env, read_answer(s), 400, "bad_request")
        closed_by_peer(s, 3)
    assert rec["request"]["method"] == "CONNECT" and rec["request"]["port"] == env.tls_up.port
    assert env.tls_up.connections == []


def test_well_formed_request_still_passes_with_the_credential(env: Env) -> None:
    target = allowed_target(env)
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/ok HTTP/1.1\r\nHost: {target}\r\nX-Tab: a\tb\r\n"
                  "Connection: close\r\n\r\n".encode())
        a = read_answer(s)
    assert a.status == 200, a.body
    (req,) = env.up.requests
    assert req.header(b"authorization") == f"Bearer {env.secret}".encode()


# --- header size and count -------------------------------------------------------------------


def test_oversize_header_is_431_and_memory_stays_bounded(env: Env) -> None:
    assert env.k.proc is not None
    pid = env.k.proc.pid
    before, hwm_before = rss_kib(pid), rss_kib(pid, "VmHWM")
    target = allowed_target(env)
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/x HTTP/1.1\r\nHost: {target}\r\nX-Big: ".encode())
        sent = 0
        try:
            while sent < 10 * 1024 * 1024:
                s.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass  # Keyless answered and closed: the rest is never read
        s.settimeout(5)
        rec = assert_refusal(env, read_answer(s), 431, "request_header_fields_too_large")
    assert rec["request"]["host"] == "localhost" and rec["request"]["path"] == "/v1/x"
    after, hwm_after = rss_kib(pid), rss_kib(pid, "VmHWM")
    assert hwm_after - hwm_before < 16 * 1024, (before, after, hwm_before, hwm_after)
    assert env.up.connections == []


def test_many_small_headers_are_431_and_memory_is_given_back(env: Env) -> None:
    assert env.k.proc is not None
    pid = env.k.proc.pid
    hwm_before = rss_kib(pid, "VmHWM")
    target = allowed_target(env)
    # 400k small headers: before the limit, mitmproxy parsed them all (+160 MiB, an 8 s stall
    # of every connection for 800k); now the read stops at 16 KiB.
    flood = b"".join(b"x%d: y\r\n" % i for i in range(400_000))
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/x HTTP/1.1\r\nHost: {target}\r\n".encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(flood + b"\r\n")
        s.settimeout(5)
        assert_refusal(env, read_answer(s), 431, "request_header_fields_too_large")
    assert rss_kib(pid, "VmHWM") - hwm_before < 16 * 1024
    assert env.up.connections == []


def test_upstream_response_head_over_the_limit_is_502_and_bounded(env: Env) -> None:
    assert env.k.proc is not None
    pid = env.k.proc.pid
    huge = RawUpstream(response_padding=8 * 1024 * 1024).start()
    try:
        hwm_before = rss_kib(pid, "VmHWM")
        target = f"localhost:{huge.port}"
        with connect(env) as s:
            s.sendall(f"GET http://{target}/v1/x HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            a = read_answer(s)
        # mitmproxy's own 502 page for now; turning it into a JSON refusal is wire-answers' part.
        assert a.status == 502
        assert rss_kib(pid, "VmHWM") - hwm_before < 16 * 1024
    finally:
        huge.stop()


def test_header_count_over_the_limit_is_431_within_the_size(env: Env) -> None:
    target = allowed_target(env)
    many = "".join(f"x{i}: y\r\n" for i in range(LIMITS["max_headers"] + 1))  # type: ignore[operator]
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/x HTTP/1.1\r\nHost: {target}\r\n{many}\r\n".encode())
        a = read_answer(s)
    assert_refusal(env, a, 431, "request_header_fields_too_large")
    assert "header fields" in a.json()["message"]
    assert env.up.connections == []


def test_oversize_request_line_with_no_destination_gets_a_json_431(env: Env) -> None:
    """A head that never completes its first line names no request: the answer is still JSON
    with a decision id, and the audit record has no request fields."""
    with connect(env) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"GET /" + b"a" * (20 * 1024))
        a = read_answer(s)
    rec = assert_refusal(env, a, 431, "request_header_fields_too_large")
    assert a.headers["connection"] == "close"
    assert rec["request"]["method"] is None and rec["request"]["host"] is None


def test_flood_of_empty_lines_is_431(env: Env) -> None:
    """mitmproxy drops one leading empty line per read: a CR LF flood never starts a head and
    would otherwise be buffered without bound."""
    with connect(env) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(64):
                s.sendall(b"\r\n" * 32768)
        a = read_answer(s)
    assert_refusal(env, a, 431, "request_header_fields_too_large")


# --- HTTP/2 client, HTTP/1.1 upstream --------------------------------------------------------


@contextlib.contextmanager
def h2_tunnel(env: Env, port: int) -> Iterator[tuple[ssl.SSLSocket, h2.connection.H2Connection]]:
    with h2_via(env.k.config["listen"]["port"], env.k.ca_cert, port) as pair:
        yield pair


@contextlib.contextmanager
def h2_via(proxy_port: int, ca: Path, port: int) -> Iterator[tuple[ssl.SSLSocket, h2.connection.H2Connection]]:
    """CONNECT localhost:``port`` through the proxy, TLS with ALPN h2 only, an h2 connection."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as raw:
        raw.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.set_alpn_protocols(["h2"])
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            conn.initiate_connection()
            tls.sendall(conn.data_to_send())
            yield tls, conn


def h2_exchange(tls: ssl.SSLSocket, conn: h2.connection.H2Connection, headers: list[tuple[bytes, bytes]],
                chunks: list[bytes]) -> tuple[int, dict[bytes, bytes], bytes]:
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=not chunks)
    tls.sendall(conn.data_to_send())
    for chunk in chunks:
        conn.send_data(sid, chunk)
        tls.sendall(conn.data_to_send())
        time.sleep(0.05)
    if chunks:
        conn.end_stream(sid)
        tls.sendall(conn.data_to_send())
    status, got, body = 0, {}, b""
    while True:
        data = tls.recv(65536)
        assert data, "connection closed"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                got = dict(ev.headers)
                status = int(got[b":status"])
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                return status, got, body
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                raise AssertionError(f"stream reset: {ev}")
            elif isinstance(ev, h2.events.ConnectionTerminated):
                raise AssertionError(f"connection terminated: {ev}")
        tls.sendall(conn.data_to_send())


def test_h2_body_without_content_length_is_framed_for_http1_upstream(env: Env) -> None:
    """Legal HTTP/2 (no content-length); streamed by Keyless after the decision, it must reach
    the HTTP/1.1 upstream chunked, never as a bodyless request followed by a second one.
    (Buffered bodies get a Content-Length: the mitmdump tests below cover that path.)"""
    port = env.tls_up.port
    smuggle = f"GET /v1/admin HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()
    with h2_tunnel(env, port) as (tls, conn):
        status, _, _ = h2_exchange(tls, conn, [
            (b":method", b"POST"), (b":scheme", b"https"), (b":authority", f"localhost:{port}".encode()),
            (b":path", b"/v1/upload")], [smuggle[:20], smuggle[20:]])
    assert status == 200
    (req,) = env.tls_up.requests
    assert req.line == b"POST /v1/upload HTTP/1.1"
    assert req.header(b"transfer-encoding") == b"chunked"
    assert req.header(b"content-length") is None
    assert req.body == smuggle
    assert req.header(b"authorization") == f"Bearer {env.secret}".encode()


@contextlib.contextmanager
def mitmdump(tmp: Path, *, patched: bool, stream: bool) -> Iterator[tuple[int, Path]]:
    """mitmproxy as released (mitmdump), with tests/mitm/h2_stream.py: (port, CA file)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "KEYLESS_WIREPATCH": "1" if patched else "0",
           "STREAM_BODIES": "1" if stream else "0"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(port),
         "--set", f"confdir={tmp}", "--set", "connection_strategy=lazy", "--ssl-insecure",
         "-s", str(REPO / "tests" / "mitm" / "h2_stream.py")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "mitmdump did not start"
            time.sleep(0.1)
        yield port, tmp / "mitmproxy-ca-cert.pem"
    finally:
        proc.terminate()
        proc.wait(10)


def _post_unframed_h2(proxy_port: int, ca: Path, up: RawUpstream, body: bytes) -> int:
    with h2_via(proxy_port, ca, up.port) as (tls, conn):
        status, _, _ = h2_exchange(tls, conn, [
            (b":method", b"POST"), (b":scheme", b"https"), (b":authority", f"localhost:{up.port}".encode()),
            (b":path", b"/upload")], [body[:20], body[20:]])
    return status


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
def test_mitmproxy_with_the_patch_frames_h2_bodies_for_http1(env: Env, tmp_path: Path, stream: bool) -> None:
    """Both of mitmproxy's request-body paths: buffered (state_consume_request_body) gets a
    Content-Length, streamed (flow.request.stream = True) gets chunked framing."""
    body = f"GET /v1/admin HTTP/1.1\r\nHost: localhost:{env.tls_up.port}\r\n\r\n".encode()
    with mitmdump(tmp_path, patched=True, stream=stream) as (port, ca):
        assert _post_unframed_h2(port, ca, env.tls_up, body) == 200
    (req,) = env.tls_up.requests
    assert req.line == b"POST /upload HTTP/1.1" and req.body == body
    if stream:
        assert req.header(b"transfer-encoding") == b"chunked" and req.header(b"content-length") is None
    else:
        assert req.header(b"content-length") == str(len(body)).encode()


def test_mitmproxy_as_released_sends_h2_bodies_unframed(env: Env, tmp_path: Path) -> None:
    """The upstream bug the patch exists for (docs/upstream/mitmproxy-h2-to-h1-framing.md):
    when this fails after a mitmproxy upgrade, the framing patch may be retired."""
    body = f"GET /v1/admin HTTP/1.1\r\nHost: localhost:{env.tls_up.port}\r\n\r\n".encode()
    with mitmdump(tmp_path, patched=False, stream=False) as (port, ca):
        _post_unframed_h2(port, ca, env.tls_up, body)
    time.sleep(0.3)
    first, *rest = env.tls_up.requests
    assert first.header(b"content-length") is None and first.header(b"transfer-encoding") is None
    assert first.body == b"" and rest and rest[0].line == b"GET /v1/admin HTTP/1.1"  # the smuggled request


def test_h2_header_value_with_crlf_never_reaches_the_http1_upstream(env: Env) -> None:
    """A CR LF inside an HTTP/2 value would split the line on HTTP/1.1. h2 (inbound header
    validation, on in Keyless) ends the connection with PROTOCOL_ERROR; Keyless's own field
    check (limits.check_fields, a 400) stands behind it."""
    port = env.tls_up.port
    with h2_tunnel(env, port) as (tls, conn), \
            pytest.raises(AssertionError, match="connection terminated: .*error_code:1"):
        h2_exchange(tls, conn, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", f"localhost:{port}".encode()),
            (b":path", b"/v1/x"), (b"x-a", b"1\r\nTransfer-Encoding: chunked")], [])
    time.sleep(0.3)
    assert env.tls_up.connections == []


def test_h2_too_many_headers_is_431(env: Env) -> None:
    port = env.tls_up.port
    extra = [(b"x-%d" % i, b"y") for i in range(LIMITS["max_headers"] + 1)]  # type: ignore[operator]
    with h2_tunnel(env, port) as (tls, conn):
        status, headers, body = h2_exchange(tls, conn, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", f"localhost:{port}".encode()),
            (b":path", b"/v1/x"), *extra], [])
    assert status == 431 and json.loads(body)["error"] == "request_header_fields_too_large"
    audit_for(env, headers[b"keyless-decision-id"].decode())
    assert env.tls_up.connections == []


# --- timeouts and the connection cap ---------------------------------------------------------


def test_slowloris_head_is_closed_after_header_timeout(env: Env) -> None:
    target = allowed_target(env)
    head = f"GET http://{target}/v1/x HTTP/1.1\r\nHost: {target}\r\n".encode()
    with connect(env) as s:
        start = time.monotonic()
        s.settimeout(0.2)
        closed = None
        for i in range(60):  # a byte every 0.1 s: activity, but never a complete head
            try:
                s.sendall(head[i % len(head):i % len(head) + 1] if i < len(head) else b"X")
                if s.recv(1) == b"":
                    closed = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic() - start
                break
        assert closed is not None, "slowloris connection never closed"
    assert LIMITS["header_timeout"] - 0.1 <= closed < LIMITS["header_timeout"] + 1.5  # type: ignore[operator]
    assert env.up.connections == []


def test_idle_keep_alive_is_closed_after_idle_timeout(env: Env) -> None:
    target = allowed_target(env)
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/ok HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert read_answer(s).status == 200
        waited = closed_by_peer(s, 5)
    assert LIMITS["idle_timeout"] - 0.1 <= waited < LIMITS["idle_timeout"] + 1.5  # type: ignore[operator]


def test_connection_that_never_speaks_is_closed_after_idle_timeout(env: Env) -> None:
    with connect(env) as s:
        waited = closed_by_peer(s, 5)
    assert waited < LIMITS["idle_timeout"] + 1.5  # type: ignore[operator]


def test_connection_cap_answers_503_with_retry_after(env: Env) -> None:
    cap = int(LIMITS["max_connections"])
    time.sleep(0.5)  # connections of earlier tests finish closing (they count until then)
    held = [connect(env) for _ in range(cap)]
    try:
        time.sleep(0.3)
        with connect(env) as extra:
            extra.sendall(b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            a = read_answer(extra)
        rec = assert_refusal(env, a, 503, "overloaded")
        assert rec["request"]["method"] is None
        assert a.headers["retry-after"] == str(LIMITS["retry_after"])
    finally:
        for s in held:
            s.close()
    # Capacity comes back once connections close.
    time.sleep(0.3)
    target = allowed_target(env)
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/ok HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        assert read_answer(s).status == 200


def test_slow_tls_handshake_in_a_tunnel_is_closed_after_header_timeout(env: Env) -> None:
    port = env.tls_up.port
    with connect(env) as s:
        s.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        s.settimeout(0.1)
        closed = None
        for _ in range(60):
            try:
                s.sendall(b"\x16")  # a TLS record header, one byte at a time
                if s.recv(1) == b"":
                    closed = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic() - start
                break
    assert closed is not None and closed < LIMITS["header_timeout"] + 1.5  # type: ignore[operator]


def test_request_to_a_hanging_upstream_ends_at_request_timeout(env: Env) -> None:
    target = f"localhost:{env.silent.port}"
    with connect(env) as s:
        s.sendall(f"GET http://{target}/v1/slow HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        waited = closed_by_peer(s, 8)
    assert LIMITS["request_timeout"] - 0.1 <= waited < LIMITS["request_timeout"] + 1.5  # type: ignore[operator]
    assert len(env.silent.requests) == 1  # it was allowed and forwarded; the upstream hung
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        recs = [r for r in env.k.audit() if r["request"].get("path") == "/v1/slow"]
        if recs:
            break
        time.sleep(0.05)
    (rec,) = recs
    assert "request_timeout" in json.dumps(rec["outcome"])


def test_h2_header_list_between_limit_and_hard_cap_is_431(env: Env) -> None:
    port = env.tls_up.port
    with h2_tunnel(env, port) as (tls, conn):
        status, headers, body = h2_exchange(tls, conn, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", f"localhost:{port}".encode()),
            (b":path", b"/v1/x"), (b"x-big", b"a" * 20_000)], [])
    assert status == 431 and json.loads(body)["error"] == "request_header_fields_too_large"
    audit_for(env, headers[b"keyless-decision-id"].decode())
    assert env.tls_up.connections == []


def test_h2_header_list_over_the_hard_cap_ends_the_connection(env: Env) -> None:
    """Over twice max_header_bytes the HPACK decoder stops (h2's DenialOfServiceError): the
    connection ends with GOAWAY and nothing is forwarded."""
    port = env.tls_up.port
    with h2_tunnel(env, port) as (tls, conn), pytest.raises(AssertionError, match="connection terminated"):
        h2_exchange(tls, conn, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", f"localhost:{port}".encode()),
            (b":path", b"/v1/x"), (b"x-big", b"a" * 40_000)], [])
    assert env.tls_up.connections == []


def test_h2_continuation_flood_ends_at_the_header_cap(env: Env) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames of junk: h2 alone buffers up to 64
    frames (8 MiB at mitmproxy's frame size) before it looks; the bounded buffer stops at twice
    max_header_bytes (32 KiB here)."""
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    port = env.tls_up.port
    with h2_tunnel(env, port) as (tls, conn):
        sid = conn.get_next_available_stream_id()
        first = HeadersFrame(sid, data=b"\x00" * 16384)  # flags: no END_HEADERS
        tls.sendall(first.serialize())
        tls.settimeout(3)
        sent = 1
        terminated = False
        for _ in range(40):
            with contextlib.suppress(TimeoutError):
                tls.settimeout(0.05)
                data = tls.recv(65536)
                if not data or any(isinstance(e, h2.events.ConnectionTerminated) for e in conn.receive_data(data)):
                    terminated = True
                    break
            try:
                tls.sendall(ContinuationFrame(sid, data=b"\x00" * 16384).serialize())
            except OSError:
                terminated = True
                break
            sent += 1
    assert terminated, "the connection survived 40 CONTINUATION frames"
    assert sent <= 8, f"{sent} frames of 16 KiB were buffered before the connection ended"
    assert env.tls_up.connections == []
