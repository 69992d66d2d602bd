"""Real peers for the shared-cache tests: a redis-server process and a token endpoint.

``RedisServer`` is Debian's ``redis-server`` on a free loopback port, with a password and no
persistence (``--save '' --appendonly no``). ``TokenEndpoint`` is a small aiohttp stand-in for an
authorization server (node-oidc-provider has no rotating-refresh-token mode that rejects reuse
the way the tests need): ``client_credentials``, and ``refresh_token`` with rotation that
REJECTS a refresh token used twice (``invalid_grant``), as RFC 9700 section 4.14.2 recommends.
It counts every call and every token it issued.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from proxy.demo import free_port
from tests.harness import ThreadedSite

CLIENT_ID = "replica-client"
CLIENT_SECRET = "canary-client-secret-7c1d9e2f"


@dataclass
class RedisServer:
    tmp: Path
    password: str = field(default_factory=lambda: "canary-redis-pw-" + secrets.token_hex(8))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    # TLS only (rediss://localhost), with a throwaway CA: (ca, cert, key) from make_tls_files.
    tls: tuple[Path, Path, Path] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://localhost:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        self.port = self.port or free_port()
        self.tmp.mkdir(parents=True, exist_ok=True)
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            ca, cert, key = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            [exe, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--requirepass", self.password, "--dir", str(self.tmp), "--logfile", str(self.tmp / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "--no-auth-warning", "-a", self.password, *args],
                             capture_output=True, timeout=10)
        return out.stdout.decode(errors="replace")

    def dump(self) -> tuple[list[str], bytes]:
        """Every key name, and every value's raw bytes concatenated (to look for canaries)."""
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        keys = [k.decode() for k in r.keys("*")]
        blob = b""
        for k in keys:
            kind = r.type(k)
            if kind == b"string":
                blob += r.get(k) or b""
            elif kind == b"hash":
                blob += b"".join(a + b for a, b in r.hgetall(k).items())
            elif kind == b"set":
                blob += b"".join(r.smembers(k))
        r.close()
        return keys, blob

    def flush(self) -> None:
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        r.flushall()
        r.close()


@dataclass
class Issued:
    value: str
    expires_at: float


@dataclass
class TokenEndpoint:
    """POST /token on loopback (HTTP). ``delay`` holds each answer so that concurrent requests
    really overlap; ``lifetime`` is expires_in."""

    lifetime: int = 3600
    delay: float = 0.3
    port: int = 0
    calls: int = 0
    invalid_grants: int = 0
    issued: list[Issued] = field(default_factory=list)
    call_times: list[float] = field(default_factory=list)
    refresh_token: str = field(default_factory=lambda: "canary-rt-" + secrets.token_urlsafe(12))
    spent: set[str] = field(default_factory=set)
    subjects: list[str] = field(default_factory=list)
    _site: ThreadedSite = field(default_factory=ThreadedSite)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> TokenEndpoint:
        self.port = free_port()
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()

        async def token(request: web.Request) -> web.Response:
            form = await request.post()
            if not secrets.compare_digest(request.headers.get("Authorization", ""), expected):
                return web.json_response({"error": "invalid_client"}, status=401)
            grant = form.get("grant_type")
            self.calls += 1
            self.call_times.append(time.time())
            answer: dict[str, object] = {"token_type": "Bearer", "expires_in": self.lifetime}
            if grant == "refresh_token":
                presented = str(form.get("refresh_token", ""))
                if presented != self.refresh_token:
                    # Reuse of a spent (rotated) refresh token: rejected, as a strict issuer does.
                    self.invalid_grants += 1
                    return web.json_response({"error": "invalid_grant"}, status=400)
                # Rotate before the (slow) answer: a second refresh with it now fails.
                self.spent.add(presented)
                self.refresh_token = answer["refresh_token"] = "canary-rt-" + secrets.token_urlsafe(12)
            elif grant == "urn:ietf:params:oauth:grant-type:token-exchange":
                # RFC 8693: the subject is Keyless's minted JWT for the caller; its sub is recorded.
                import jwt

                self.subjects.append(jwt.decode(str(form.get("subject_token")), options={"verify_signature": False})
                                     ["sub"])
            elif grant != "client_credentials":
                return web.json_response({"error": "unsupported_grant_type"}, status=400)
            await asyncio.sleep(self.delay)
            value = "canary-at-" + secrets.token_urlsafe(16)
            self.issued.append(Issued(value, time.time() + self.lifetime))
            answer["access_token"] = value
            return web.json_response(answer)

        app = web.Application()
        app.router.add_post("/token", token)
        self._site.serve(app, (self.port, None))
        return self

    def stop(self) -> None:
        self._site.stop()
