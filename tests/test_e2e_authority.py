"""Every spelling of a host gets the decision of its canonical form, wherever the client names it.

A real Keyless with tests/policies/authority (rules on canonical hosts only: ``denied.example``
denied by name, ``127.0.0.1`` read-only by address, ``localhost`` allowed, anything else
"unlisted"), a real upstream on loopback, and real clients: curl, requests and raw sockets (for
the bytes curl normalises itself, such as ``2130706433`` in a CONNECT line). Each spelling is
sent four ways: as the absolute-form URL (with the same Host), as the CONNECT authority (and
the Host inside), as the Host header inside a tunnel to the canonical host (where it must
agree with the tunnel), and as the Host header of an origin-form request sent to the proxy
itself (where it alone names the destination). The test asserts the status, the policy's reason, the audit
record's ``request.host`` and, when allowed, that the upstream received the canonical Host and
the credential. Before proxy.authority, ``DELETE http://2130706433:port/`` reached the policy as
"2130706433" and was not the read-only address any more.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.clients import Reply, curl, req
from tests.harness import REPO, Keyless, Upstream, base_config


@dataclass
class Env:
    k: Keyless
    upstream: Upstream
    secret: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("e2e-authority")
    upstream = Upstream(tmp / "upstream").start()
    secret = "canary-authority-" + secrets.token_hex(8)
    (tmp / "key").write_text(secret + "\n")
    cfg = base_config(tmp, upstream, policy={"dir": str(REPO / "tests" / "policies" / "authority")},
                      credentials={"key": {"type": "static", "from": "file", "file": str(tmp / "key")}})
    k = Keyless(tmp, cfg).start()
    try:
        yield Env(k, upstream, secret)
    finally:
        log = k.stop()
        upstream.stop()
        assert secret not in log


@pytest.fixture(autouse=True)
def _fresh_upstream(env: Env) -> None:
    env.upstream.received.clear()


# --- the three places a client names its destination --------------------------------------------


def _read_reply(sock: socket.socket) -> Reply:
    """One response: up to its Content-Length, or to the end of the connection."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"]) if "content-length" in headers else None
    while (length is None or len(body) < length) and (chunk := sock.recv(65536)):
        body += chunk
    return Reply(int(lines[0].split(" ", 2)[1]), headers, body)


def absolute_form(env: Env, spelling: str, method: str) -> Reply:
    """curl as a plain proxy client, its request line and Host naming ``spelling`` verbatim.

    curl rewrites numeric IPv4 hosts in a URL to the dotted quad, so the request target is set
    explicitly; the URL only tells curl where the proxy request goes."""
    port = env.upstream.http_port
    return curl(env.k, f"http://127.0.0.1:{port}/p", "--request-target", f"http://{spelling}:{port}/p",
                "-H", f"Host: {spelling}:{port}", method=method)


def absolute_form_requests(env: Env, spelling: str, method: str) -> Reply:
    """requests sends numeric hosts as written (it lower-cases names)."""
    return req(env.k, method, f"http://{spelling}:{env.upstream.http_port}/p")


def host_header(env: Env, spelling: str, method: str, canonical: str) -> Reply:
    """curl tunnels to the canonical host (CONNECT), then names ``spelling`` in the Host header."""
    port = env.upstream.http_port
    return curl(env.k, f"http://{canonical}:{port}/p", "--proxytunnel", "-H", f"Host: {spelling}:{port}",
                method=method)


def origin_form(env: Env, spelling: str, method: str, canonical: str = "") -> Reply:
    """A raw client that sends an origin-form request to the proxy: only Host names the host."""
    authority = f"{spelling}:{env.upstream.http_port}".encode()
    with socket.create_connection(("127.0.0.1", env.k.config["listen"]["port"]), timeout=10) as s:
        s.sendall(method.encode() + b" /p HTTP/1.1\r\nHost: " + authority + b"\r\nConnection: close\r\n\r\n")
        return _read_reply(s)


def connect_authority(env: Env, spelling: str, method: str) -> Reply:
    """A raw client: ``CONNECT spelling:port``, then a request naming the same spelling."""
    port = env.upstream.http_port
    authority = f"{spelling}:{port}".encode()
    with socket.create_connection(("127.0.0.1", env.k.config["listen"]["port"]), timeout=10) as s:
        s.sendall(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n")
        established = s.recv(4096)
        assert established.startswith(b"HTTP/1.1 200"), established
        s.sendall(method.encode() + b" /p HTTP/1.1\r\nHost: " + authority + b"\r\nConnection: close\r\n\r\n")
        return _read_reply(s)


# --- spellings and what their canonical form is decided ------------------------------------------

ADDRESS = ["127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1", "127.0.0.1.",
           "[::ffff:127.0.0.1]", "[::FFFF:7f00:1]"]
DENIED = ["denied.example", "DENIED.EXAMPLE", "denied.example.", "Denied.Example."]
LOCAL = ["localhost", "LOCALHOST", "localhost."]
# Non-ASCII only fits in a header: mitmproxy itself refuses it on a request or CONNECT line.
UNICODE = [("ｄｅｎｉｅｄ.example", "denied.example"), ("ｌｏｃａｌｈｏｓｔ", "localhost")]


@dataclass(frozen=True)
class Want:
    status: int
    reason: str


def want(canonical: str, method: str) -> Want:
    if canonical == "denied.example":
        return Want(403, "denied by name")
    if canonical == "127.0.0.1" and method != "GET":
        return Want(403, "read-only address")
    return Want(200, "allowed")


def cases() -> list[tuple[str, str, str]]:
    out = [(s, "127.0.0.1", m) for s in ADDRESS for m in ("GET", "DELETE")]
    out += [(s, "denied.example", "GET") for s in DENIED]
    out += [(s, "localhost", "GET") for s in LOCAL]
    return out


def record(k: Keyless, decision_id: str | None, timeout: float = 5.0) -> dict[str, Any]:
    assert decision_id, "reply carries no Keyless-Decision-Id"
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in k.audit() if r["decision_id"] == decision_id]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1, f"{len(found)} audit records for {decision_id}"
    return found[0]


def check(env: Env, reply: Reply, canonical: str, method: str) -> None:
    """The reply, the audit record and the upstream all show the canonical form's decision."""
    expected = want(canonical, method)
    assert reply.status == expected.status, reply.body
    rec = record(env.k, reply.decision_id)
    assert rec["request"]["host"] == canonical
    assert rec["request"]["method"] == method
    assert rec["decision"]["reason"] == expected.reason
    if expected.status == 200:
        assert len(env.upstream.received) == 1, env.upstream.received
        got = env.upstream.received[0]
        assert got.host == f"{canonical}:{env.upstream.http_port}"
        assert got.method == method and got.path == "/p"
        assert got.headers["authorization"] == f"Bearer {env.secret}"
    else:
        assert reply.json()["error"] == "forbidden"
        assert rec["outcome"]["error"] == "forbidden"
        assert env.upstream.received == []


def _ids(case: tuple[str, str, str]) -> str:
    return f"{case[2]} {case[0]}"


Place = Callable[[Env, str, str], Reply]
HostPlace = Callable[[Env, str, str, str], Reply]  # also given the canonical host, for the tunnel


@pytest.mark.parametrize("case", cases(), ids=_ids)
@pytest.mark.parametrize("place", [absolute_form, connect_authority], ids=lambda p: p.__name__)
def test_every_spelling_gets_the_canonical_decision(env: Env, place: Place, case: tuple[str, str, str]) -> None:
    spelling, canonical, method = case
    check(env, place(env, spelling, method), canonical, method)


@pytest.mark.parametrize("case", cases() + [(s, c, "GET") for s, c in UNICODE], ids=_ids)
@pytest.mark.parametrize("place", [host_header, origin_form], ids=lambda p: p.__name__)
def test_every_spelling_in_the_host_header_gets_the_canonical_decision(
        env: Env, place: HostPlace, case: tuple[str, str, str]) -> None:
    spelling, canonical, method = case
    check(env, place(env, spelling, method, canonical), canonical, method)


@pytest.mark.parametrize("spelling", [s for s in ADDRESS if not s.endswith(".")])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_requests_numeric_spellings(env: Env, spelling: str, method: str) -> None:
    check(env, absolute_form_requests(env, spelling, method), "127.0.0.1", method)


def test_a_host_that_is_no_host_is_keyless_bad_request(env: Env) -> None:
    """A name ending in a number that is no IPv4 address is never looked up: 400, audited."""
    port = env.upstream.http_port
    for reply in (curl(env.k, f"http://127.0.0.1:{port}/p", "--request-target", f"http://1.2.3.4.5:{port}/p",
                       "-H", f"Host: 1.2.3.4.5:{port}"),
                  host_header(env, "foo.123", "GET", "127.0.0.1")):
        assert reply.status == 400, reply.body
        body = reply.json()
        assert body["error"] == "bad_request" and "not a valid IPv4 address" in body["message"]
        rec = record(env.k, reply.decision_id)
        assert rec["outcome"]["error"] == "bad_request"
        assert rec["decision"] is None
    assert env.upstream.received == []


def test_connect_to_a_host_that_is_no_host_is_refused(env: Env) -> None:
    port = env.upstream.http_port
    with socket.create_connection(("127.0.0.1", env.k.config["listen"]["port"]), timeout=10) as s:
        s.sendall(f"CONNECT 1.2.3.4.5:{port} HTTP/1.1\r\nHost: 1.2.3.4.5:{port}\r\n\r\n".encode())
        reply = _read_reply(s)
    assert reply.status == 400
    rec = record(env.k, reply.decision_id)
    assert rec["outcome"]["error"] == "bad_request" and rec["request"]["host"] == "1.2.3.4.5"
    assert env.upstream.received == []


# Not [::ffff:127.0.0.1]: Keyless dials, and so mints its certificate for, 127.0.0.1, which a
# client that checks the certificate against the IPv6 literal it asked for refuses.
@pytest.mark.parametrize("spelling", ["2130706433", "127.1", "0x7f000001", "LOCALHOST", "localhost."])
def test_tls_tunnel_spellings(env: Env, spelling: str) -> None:
    """requests over HTTPS: the CONNECT line and the TLS SNI carry the spelling (Python sends
    ``2130706433`` as a name); the upstream is dialled and verified as the canonical host."""
    reply = req(env.k, "GET", f"https://{spelling}:{env.upstream.https_port}/p")
    canonical = "localhost" if "local" in spelling.lower() else "127.0.0.1"
    assert reply.status == 200, reply.body
    rec = record(env.k, reply.decision_id)
    assert rec["request"]["host"] == canonical
    got = env.upstream.received[0]
    assert got.host == f"{canonical}:{env.upstream.https_port}" and got.scheme == "https"


@pytest.mark.parametrize(("spelling", "canonical"), [("LOCALHOST", "localhost"), ("localhost.", "localhost"),
                                                     ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1")])
def test_http2_authority_spellings(env: Env, spelling: str, canonical: str) -> None:
    """curl over HTTP/2 in a tunnel to the canonical host, ``:authority`` naming the spelling:
    the HTTP/1.1 upstream gets the canonical Host (mitmproxy builds it from ``:authority``)."""
    port = env.upstream.https_port
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--http2", "-D", "-", "-o", "/dev/null",
                          "-w", "%{http_version}", "-H", f"Host: {spelling}:{port}", f"https://{canonical}:{port}/p"],
                         env=env.k.client_env(), capture_output=True, text=True, timeout=30)
    *blocks, version = out.stdout.split("\n\n")  # text mode: CRLF is read as LF
    final = blocks[-1].splitlines()  # after the CONNECT's own "200 Connection established"
    assert version == "2" and final[0].strip() == "HTTP/2 200", out.stdout + out.stderr
    decision_id = next(v.strip() for n, _, v in (line.partition(":") for line in final[1:])
                       if n.lower() == "keyless-decision-id")
    rec = record(env.k, decision_id)
    assert rec["request"]["host"] == canonical
    assert [r.host for r in env.upstream.received] == [f"{canonical}:{port}"]
