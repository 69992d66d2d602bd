"""Real peers for the credential tests: oidc-provider (Node.js) and a policy written per test.

``OidcProvider`` runs tests/oauth/server.js, node-oidc-provider with the client_credentials
grant, resource indicators and a registered RFC 8693 grant. ``.ci/run`` installs it with
``npm ci`` in tests/oauth.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from proxy.demo import free_port
from proxy.signing import Signer
from tests.harness import REPO, Received

OAUTH_DIR = REPO / "tests" / "oauth"


@dataclass
class OidcProvider:
    tmp: Path
    clients: list[dict[str, Any]]
    subject_jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    ttl: int = 300
    subject_audiences: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return self.issuer + "/token"

    def start(self) -> OidcProvider:
        if not (OAUTH_DIR / "node_modules" / "oidc-provider").is_dir():
            # `make test` runs `npm ci` here when npm exists (scripts/npm-peers); without npm, skip.
            pytest.skip("tests/oauth/node_modules is missing (npm not found, or `npm ci` in tests/oauth failed)")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.tmp / "oidc.json"
        conf.write_text(json.dumps({"port": self.port, "ttl": self.ttl, "clients": self.clients,
                                    "subjectJwks": self.subject_jwks,
                                    "subjectAudiences": self.subject_audiences}))
        self.log = self.tmp / "oidc.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["node", str(OAUTH_DIR / "server.js"), str(conf)], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=OAUTH_DIR)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("oidc-provider exited: " + self.log.read_text()[-2000:])
            if "listening" in self.log.read_text():
                return self
            time.sleep(0.05)
        raise RuntimeError("oidc-provider did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = requests.get(self.issuer + "/_test/stats", timeout=5).json()
        return result

    def fault(self, mode: str | None) -> None:
        requests.get(self.issuer + "/_test/fault", params={"mode": mode or ""}, timeout=5)

    def verifier(self, audience: str) -> JwtVerifier:
        return JwtVerifier(requests.get(self.issuer + "/jwks", timeout=5).json(), self.issuer, audience)


class JwtVerifier:
    """What the test API does with a bearer token: verify it against the issuer's JWKS."""

    def __init__(self, jwks: dict[str, Any], issuer: str, audience: str) -> None:
        self.keys = jwt.PyJWKSet.from_dict(jwks)
        self.issuer = issuer
        self.audience = audience
        self.claims: list[dict[str, Any]] = []

    def __call__(self, rec: Received) -> int:
        auth = rec.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return 401
        token = auth[7:]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = next(k for k in self.keys.keys if k.key_id == kid)
            claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=self.audience,
                                issuer=self.issuer)
        except (jwt.PyJWTError, StopIteration):
            return 401
        self.claims.append(claims)
        return 200


def keyless_signing_key(tmp: Path) -> tuple[Path, dict[str, Any]]:
    """A Keyless signing key file and its public JWKS, so a peer can trust Keyless up front."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp / "keyless-signing.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path, Signer.create("ES256", path, "keyless").jwks()


POLICY = """package keyless.egress

import rego.v1

# Test policy: the first path segment names the credential; PARAMS gives its params.
params := {PARAMS}

default decision := {"allow": false, "reason": "no attested identity"}

decision := {"allow": true, "reason": "test grant", "credential": name, "params": object.get(params, name, {})} if {
	input.identity.id != null
	name := split(input.request.path, "/")[1]
}
"""


def write_policy(tmp: Path, params: dict[str, Any] | None = None) -> Path:
    d = tmp / "policy"
    d.mkdir(parents=True, exist_ok=True)
    (d / "test.rego").write_text(POLICY.replace("{PARAMS}", json.dumps(params or {})))
    return d
