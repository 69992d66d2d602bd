"""github_app end to end: Keyless signs the App JWT and gets scoped installation tokens.

There is no GitHub here. ``FakeGitHub`` stands in for GitHub's installation-token endpoint
(``POST /app/installations/{id}/access_tokens``, GitHub Enterprise-style base URL
``/api/v3``): it verifies the App JWT with the App's public key as GitHub does (RS256, ``iss``,
at most ten minutes), refuses permissions the installation was not granted with 422, and
issues tokens limited to the requested repositories and permissions. The test API accepts only
tokens the stand-in issued, for the repository in the URL.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.demo import free_port, make_tls_files
from tests.harness import Keyless, Received, Upstream, base_config, wait_for_audit
from tests.peers import write_policy

APP_ID = 424242
INSTALLATION = 77
GRANTED = {"contents": "write", "pull_requests": "write", "metadata": "read"}


@dataclass
class FakeGitHub:
    tmp: Path
    public_key: Any
    port: int = 0
    issued: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> FakeGitHub:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.ca, cert, key = make_tls_files(self.tmp)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.port = free_port()
        started = threading.Event()

        async def tokens(request: web.Request) -> web.Response:
            auth = request.headers.get("Authorization", "")
            try:
                claims = jwt.decode(auth.removeprefix("Bearer "), self.public_key, algorithms=["RS256"],
                                    options={"require": ["iat", "exp", "iss"]})
            except jwt.PyJWTError:
                return web.json_response({"message": "A JSON web token could not be decoded"}, status=401)
            if str(claims["iss"]) != str(APP_ID) or claims["exp"] - claims["iat"] > 600:
                return web.json_response({"message": "bad App JWT"}, status=401)
            if int(request.match_info["id"]) != INSTALLATION:
                return web.json_response({"message": "Not Found"}, status=404)
            body = await request.json()
            self.requests.append(body)
            perms = body.get("permissions", GRANTED)
            level = {"read": 1, "write": 2, "admin": 3}
            if any(level.get(GRANTED.get(k, ""), 0) < level.get(v, 9) for k, v in perms.items()):
                return web.json_response({"message": "The permissions requested are not granted to this "
                                                     "installation."}, status=422)
            token = "ghs_" + secrets.token_urlsafe(27)
            expires = datetime.now(UTC) + timedelta(hours=1)
            self.issued[token] = {"repositories": body.get("repositories"), "permissions": perms}
            return web.json_response({"token": token, "expires_at": expires.isoformat().replace("+00:00", "Z"),
                                      "permissions": perms, "repository_selection": "selected"}, status=201)

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/api/v3/app/installations/{id}/access_tokens", tokens)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ctx).start()
            started.set()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(main())
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert started.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)

    def api_check(self, rec: Received) -> int:
        """The test API: a token from the stand-in, valid for the repository in the path."""
        grant = self.issued.get(rec.headers.get("authorization", "").removeprefix("Bearer "))
        if grant is None:
            return 401
        repo = rec.path.split("/")[3] if rec.path.count("/") >= 3 else ""
        return 200 if grant["repositories"] is None or repo in grant["repositories"] else 403


@pytest.fixture
def github(tmp_path: Path) -> Iterator[tuple[FakeGitHub, Path]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "app.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    gh = FakeGitHub(tmp_path / "github", key.public_key()).start()
    yield gh, key_file
    gh.stop()


def test_installation_tokens_scoped_by_decision_and_cached(tmp_path: Path, upstream: Upstream,
                                                            github: tuple[FakeGitHub, Path]) -> None:
    gh, key_file = github
    upstream.check = gh.api_check
    app = {"type": "github_app", "app_id": APP_ID, "installation_id": INSTALLATION, "private_key_file": str(key_file),
           "base_url": f"https://localhost:{gh.port}/api/v3", "ca_file": str(gh.ca)}
    cfg = base_config(tmp_path, upstream, policy={"dir": str(write_policy(tmp_path, {
        "gh-docs": {"repositories": ["docs"], "permissions": {"contents": "read"}},
        "gh-app": {"repositories": ["app"], "permissions": {"contents": "write", "pull_requests": "write"}},
        "gh-admin": {"repositories": ["app"], "permissions": {"administration": "write"}},
    }))}, credentials={"gh-docs": app, "gh-app": app, "gh-admin": app})
    k = Keyless(tmp_path, cfg).start()

    def call(path: str) -> tuple[int, str]:
        out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-H", "Authorization: token ghp_app_own",
                              upstream.url(path)], env=k.client_env(), capture_output=True, text=True, timeout=60)
        body, _, code = out.stdout.rpartition("\n")
        return int(code), body

    try:
        results = [call("/gh-docs/repos/docs/readme"), call("/gh-app/repos/app/pulls"),
                   call("/gh-docs/repos/docs/readme"), call("/gh-app/repos/app/pulls"),
                   call("/gh-docs/repos/app/readme"),       # docs-scoped token used on another repo
                   call("/gh-admin/repos/app/settings")]    # a permission the installation lacks
    finally:
        log = k.stop()
    assert [r[0] for r in results] == [200, 200, 200, 200, 403, 503], results
    assert "answered 422" in results[5][1]
    # One token per (installation, repositories, permissions), reused until near expiry.
    assert gh.requests == [
        {"repositories": ["docs"], "permissions": {"contents": "read"}},
        {"repositories": ["app"], "permissions": {"contents": "write", "pull_requests": "write"}},
        {"repositories": ["app"], "permissions": {"administration": "write"}},
    ]
    tokens = [r.headers["authorization"] for r in upstream.received]
    assert tokens[0] == tokens[2] == tokens[4] and tokens[1] == tokens[3] and tokens[0] != tokens[1]
    assert not any("ghp_app_own" in t for t in tokens)
    records = wait_for_audit(k, 6)
    assert records[0]["credential"]["type"] == "github_app" and records[0]["credential"]["expires_at"] > time.time()
    audit = k.audit_file.read_text()
    for token in gh.issued:
        assert token not in log and token not in audit
    assert "PRIVATE KEY" not in log + audit
    json.loads(audit.splitlines()[-1])
