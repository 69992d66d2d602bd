"""The app never sees the credential: an upstream that echoes it back is redacted, TRACE gets none.

A real Keyless process, a real httpbin-style upstream (aiohttp over HTTPS on loopback) that
echoes every request header into its response headers and a JSON or text body (also gzip- and
brotli-encoded, also streamed in chunks that split the credential), and real clients (curl,
requests). Every assertion about what left Keyless is made on what the upstream received or
what the client got.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import secrets
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brotli
import pytest
import requests
from aiohttp import web

from proxy.demo import free_port, make_tls_files
from tests.clients import Reply, curl, proxy_environ, req
from tests.harness import REPO, Keyless, ThreadedSite, audit_record, base_config

BILLING = "spiffe://demo.local/billing"
MARKER = "[keyless:redacted]"
MIB = 1024 * 1024


@dataclass
class Echo:
    """httpbin's ``/anything``, with knobs: it reflects the request, headers and all."""

    tls_dir: Path
    port: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    _site: ThreadedSite = field(default_factory=ThreadedSite)

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "upstream-ca.pem"

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        self.received.append({"method": request.method, "path": request.path, "headers": headers})
        q = request.query
        echo_headers = {f"X-Echo-{k}": v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
        if request.method == "TRACE":
            lines = [f"TRACE {request.path_qs} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
            return web.Response(body=("\r\n".join(lines) + "\r\n\r\n").encode(), content_type="message/http")
        if "stream" in q:
            return await self.stream(request, headers, int(q["stream"]))
        if "download" in q:
            return await self.download(request, int(q["download"]))
        doc = json.dumps({"method": request.method, "url": str(request.url), "headers": headers,
                          "data": body.decode(errors="replace")}, indent=2).encode()
        ctype = q.get("type", "application/json")
        if q.get("encoding") == "gzip":
            return web.Response(body=gzip.compress(doc), headers={**echo_headers, "Content-Encoding": "gzip",
                                                                  "Content-Type": ctype})
        if q.get("encoding") == "br":
            return web.Response(body=brotli.compress(doc), headers={**echo_headers, "Content-Encoding": "br",
                                                                    "Content-Type": ctype})
        if q.get("encoding") == "compress":
            return web.Response(body=doc, headers={"Content-Encoding": "compress", "Content-Type": ctype})
        return web.Response(body=doc, headers={**echo_headers, "Content-Type": ctype})

    async def stream(self, request: web.Request, headers: dict[str, str], size: int) -> web.StreamResponse:
        """A chunked text body of ``size`` filler bytes with the Authorization value in the middle,
        split across two writes sent 50 ms apart, so the two halves arrive as separate chunks."""
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        secret = headers.get("Authorization", "").encode()
        half = len(secret) // 2
        line = b"an ordinary line of streamed log output\n"
        sent = 0
        while sent < size // 2:
            await resp.write(line * 1000)
            sent += len(line) * 1000
        await resp.write(b"auth=" + secret[:half])
        await asyncio.sleep(0.05)
        await resp.write(secret[half:] + b"\n")
        while sent < size:
            await resp.write(line * 1000)
            sent += len(line) * 1000
        await resp.write_eof()
        return resp

    async def download(self, request: web.Request, size: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        block = hashlib.sha256(b"block").digest() * (MIB // 32)
        for _ in range(size // MIB):
            await resp.write(block)
        await resp.write_eof()
        return resp

    def start(self) -> Echo:
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        _, cert, key = make_tls_files(self.tls_dir)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.port = free_port()

        app = web.Application(client_max_size=16 * MIB)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._site.serve(app, (self.port, ctx))
        return self

    def stop(self) -> None:
        self._site.stop()


@dataclass
class Env:
    k: Keyless
    echo: Echo
    key: str
    basic_pair: str

    @property
    def canaries(self) -> list[str]:
        b64 = base64.b64encode(self.basic_pair.encode()).decode()
        return [self.key, b64, self.basic_pair, self.basic_pair.partition(":")[2]]

    def last(self) -> dict[str, Any]:
        return self.echo.received[-1]

    def record(self, decision_id: str | None) -> dict[str, Any]:
        assert decision_id
        return audit_record(self.k, decision_id)


def start(tmp: Path, echo: Echo, **extra: Any) -> tuple[Keyless, str, str]:
    key = "canary-key-" + secrets.token_hex(12)
    pair = "svc-user:canary-pass-" + secrets.token_hex(8)
    (tmp / "key").write_text(key + "\n")
    (tmp / "basic").write_text(base64.b64encode(pair.encode()).decode() + "\n")
    cfg = base_config(tmp, policy={"dir": str(REPO / "tests" / "policies" / "reflect")}, credentials={
        "api-key": {"type": "static", "from": "file", "file": str(tmp / "key")},
        "basic": {"type": "static", "from": "file", "file": str(tmp / "basic"), "template": "Basic {secret}"},
        "minted": {"type": "jwt", "ttl": 120},
    })
    cfg["tls"]["upstream_ca"] = str(echo.ca_file)
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return Keyless(tmp, cfg).start(log_level="info"), key, pair


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("reflect")
    echo = Echo(tmp / "upstream").start()
    k, key, pair = start(tmp, echo, listen={"redact_max_body": "64k"})
    yield Env(k, echo, key, pair)
    k.stop()
    echo.stop()


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """TRACE forwarded bare, and a 1 MiB response limit."""
    tmp = tmp_path_factory.mktemp("reflect-bare")
    echo = Echo(tmp / "upstream").start()
    k, key, pair = start(tmp, echo, egress={"trace": "forward_bare"}, listen={"max_response_body": "1m"})
    yield Env(k, echo, key, pair)
    k.stop()
    echo.stop()


def assert_clean(env: Env, headers: dict[str, str], body: bytes) -> None:
    text = body.decode(errors="replace") + json.dumps(headers)
    for canary in env.canaries:
        assert canary not in text


def fetch(env: Env, client: str, url: str) -> Reply:
    if client == "requests":
        return req(env.k, "GET", url)
    # curl-h2 speaks HTTP/2 to Keyless inside the CONNECT tunnel (the upstream stays HTTP/1.1).
    r = curl(env.k, url, "--compressed", *(["--http2"] if client == "curl-h2" else []))
    if client == "curl-h2":
        assert r.status == 200 and "transfer-encoding" not in r.headers
    return r


@pytest.mark.parametrize("client", ["curl", "curl-h2", "requests"])
@pytest.mark.parametrize("encoding", ["", "gzip", "br"])
def test_echoed_bearer_is_redacted(env: Env, client: str, encoding: str) -> None:
    url = env.echo.url(f"/anything/static?encoding={encoding}")
    r = fetch(env, client, url)
    assert r.status == 200
    # The credential did reach the upstream ...
    assert env.last()["headers"]["Authorization"] == f"Bearer {env.key}"
    # ... and not the app: not in the echoed headers, not in the (decoded) JSON body.
    assert_clean(env, r.headers, r.body)
    assert r.headers["x-echo-authorization"] == MARKER
    assert r.json()["headers"]["Authorization"] == MARKER
    assert "content-encoding" not in r.headers
    rec = env.record(r.decision_id)
    assert rec["reflected"] == {"headers": ["x-echo-authorization"], "body": True, "body_scan": "full"}
    assert env.key not in json.dumps(rec)


def test_basic_pair_and_its_base64_are_redacted(env: Env) -> None:
    r = req(env.k, "POST", env.echo.url("/basic/anything?type=text/html"), data=env.basic_pair.encode())
    assert r.status == 200
    assert env.last()["headers"]["Authorization"].startswith("Basic ")
    # The body echoes the decoded pair the app posted too: Keyless produced its base64 form.
    assert_clean(env, r.headers, r.body)
    assert r.json()["data"] == MARKER


def test_minted_jwt_is_redacted(env: Env) -> None:
    r = req(env.k, "GET", env.echo.url("/jwt/anything"))
    token = env.last()["headers"]["Authorization"].removeprefix("Bearer ")
    assert token.count(".") == 2
    assert token not in r.body.decode() and token not in json.dumps(r.headers)


def test_no_credential_nothing_scanned(env: Env) -> None:
    r = req(env.k, "GET", env.echo.url("/open/anything"))
    assert r.status == 200 and "Authorization" not in env.last()["headers"]
    assert env.record(r.decision_id)["reflected"] is None


def test_binary_bodies(env: Env) -> None:
    # A short body is scanned whatever its type: an echo labelled image/png is still an echo.
    r = req(env.k, "GET", env.echo.url("/anything?type=image/png"))
    assert_clean(env, r.headers, r.body)
    assert env.record(r.decision_id)["reflected"]["body_scan"] == "full"
    # A long binary body streams through unscanned, exactly as the upstream sent it.
    r = req(env.k, "GET", env.echo.url(f"/anything?download={2 * MIB}"))
    assert r.status == 200 and r.body == hashlib.sha256(b"block").digest() * (2 * MIB // 32)
    assert r.headers["content-length"] == str(2 * MIB)
    assert env.record(r.decision_id)["reflected"] == {"headers": [], "body": False, "body_scan": "binary"}


def test_undecodable_text_is_refused(env: Env) -> None:
    r = req(env.k, "GET", env.echo.url("/anything?encoding=compress"))
    assert r.status == 502 and r.json()["error"] == "response_unscannable"
    assert env.key not in r.body.decode()
    assert env.record(r.decision_id)["outcome"]["error"] == "response_unscannable"


@pytest.mark.parametrize("client", ["curl", "curl-h2", "requests"])
def test_streamed_text_split_across_chunks(env: Env, client: str) -> None:
    # Past redact_max_body (64k here) and chunked: scanned as it streams.
    url = env.echo.url("/anything?stream=2000000")
    r = fetch(env, client, url)
    assert r.status == 200
    assert_clean(env, r.headers, r.body)
    assert f"auth={MARKER}\n".encode() in r.body
    assert len(r.body) > 2_000_000
    assert env.record(r.decision_id)["reflected"] == {"headers": [], "body": True, "body_scan": "stream"}


def test_trace_is_refused_whatever_the_policy_says(env: Env) -> None:
    before = len(env.echo.received)
    for r in (curl(env.k, env.echo.url("/anything"), method="TRACE"),
              req(env.k, "TRACE", env.echo.url("/anything"))):
        assert r.status == 403 and r.json()["error"] == "forbidden"
        assert "TRACE" in r.json()["message"]
        assert env.record(r.decision_id)["outcome"]["error"] == "forbidden"
    assert len(env.echo.received) == before


def test_trace_forward_bare_gets_no_credential(bare: Env) -> None:
    r = req(bare.k, "TRACE", bare.echo.url("/anything"), headers={"Authorization": "Bearer app-own-secret"})
    assert r.status == 200
    got = bare.last()
    assert got["method"] == "TRACE"
    # Neither Keyless's credential nor the app's own reached the upstream.
    assert "Authorization" not in got["headers"]
    rec = bare.record(r.decision_id)
    assert rec["credential"] is None and rec["stripped"] == ["authorization"]


def test_response_limit(bare: Env) -> None:
    # Content-Length over listen.max_response_body: a JSON 502 instead of the body.
    r = req(bare.k, "GET", bare.echo.url("/open/anything?download=2097152"))
    assert r.status == 502 and r.json()["error"] == "response_too_large"
    assert bare.record(r.decision_id)["outcome"]["error"] == "response_too_large"
    # Chunked, so the limit is only crossed mid-stream: the client sees a cut-off body.
    with proxy_environ(bare.k), pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(bare.echo.url("/anything?stream=3000000"), timeout=20)
    # The same connection-level cut for curl: an error exit, never a clean 200.
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", bare.echo.url("/anything?stream=3000000")],
                         env=bare.k.client_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode != 0


def _rss_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(field_name)


def test_64_mib_download_streams_in_bounded_memory(env: Env) -> None:
    assert env.k.proc is not None
    pid = env.k.proc.pid
    before = _rss_kib(pid, "VmRSS")
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
         env.echo.url("/anything?download=" + str(64 * MIB))],
        env=env.k.client_env(), capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["200", str(64 * MIB)], out.stderr
    # Buffered, the body alone would take 64 MiB; streamed, the peak barely moves.
    grown = _rss_kib(pid, "VmHWM") - before
    print(f"peak RSS grew by {grown} KiB")
    assert grown < 32 * 1024, f"peak RSS grew by {grown} KiB"


def test_request_limit_does_not_cap_responses(tmp_path: Path) -> None:
    echo = Echo(tmp_path / "upstream").start()
    k, _, _ = start(tmp_path, echo, listen={"max_request_body": "1m"})
    try:
        r = req(k, "GET", echo.url(f"/open/anything?download={4 * MIB}"))
        assert r.status == 200 and len(r.body) == 4 * MIB
    finally:
        k.stop()
        echo.stop()
