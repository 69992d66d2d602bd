"""A real OIDC issuer for tests: an aiohttp HTTPS server with discovery and a JWKS, and real keys.

It stands in for Kubernetes' API server, GitHub's and GitLab's token services, which cannot run
here: it serves the same two documents they serve (``/.well-known/openid-configuration`` and the
JWKS it points to) and signs tokens with real RSA and EC keys. It counts its hits, can be taken
down (HTTP 503) and can be made slow, so tests can observe how Keyless treats the issuer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.demo import free_port, make_tls_files
from tests.harness import ThreadedSite


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        jwk: dict[str, Any] = algo.to_jwk(self.private.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig", alg=self.alg)
        return jwk


def rsa_key(kid: str = "rsa-1") -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str = "ec-1") -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Issuer:
    tls_dir: Path
    keys: list[SigningKey] = field(default_factory=lambda: [rsa_key(), ec_key()])
    port: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {"discovery": 0, "jwks": 0})
    down: bool = False
    delay: float = 0.0
    _site: ThreadedSite = field(default_factory=ThreadedSite)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "upstream-ca.pem"

    def start(self) -> Issuer:
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        _, cert, key = make_tls_files(self.tls_dir)
        self.port = free_port()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)

        async def answer(kind: str, body: dict[str, Any]) -> web.Response:
            self.hits[kind] += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.down:
                return web.Response(status=503)
            return web.json_response(body)

        async def discovery(_: web.Request) -> web.Response:
            return await answer("discovery", {"issuer": self.url, "jwks_uri": self.url + "/jwks"})

        async def jwks(_: web.Request) -> web.Response:
            return await answer("jwks", self.jwks())

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        self._site.serve(app, (self.port, ctx))
        return self

    def stop(self) -> None:
        self._site.stop()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.url, "sub": "system:serviceaccount:payments:billing",
                                  "aud": "keyless", "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(self, key: SigningKey | None = None, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        key = key or self.keys[0]
        return jwt.encode(self.claims(**claims), key.private, algorithm=key.alg,
                          headers={"kid": key.kid, **(headers or {})})


def jwt_trust(issuer: Issuer, name: str = "tokens", **options: Any) -> dict[str, Any]:
    """A ``jwt`` trust provider entry for keyless.yaml that trusts ``issuer``."""
    entry: dict[str, Any] = {"issuer": issuer.url, "audiences": ["keyless"], "ca_file": str(issuer.ca_file),
                             **options.pop("issuer_options", {})}
    return {"name": name, "type": "jwt", "algorithms": ["RS256", "ES256"], "issuers": [entry], **options}


ALLOW_IDENTIFIED = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "caller has no attested workload identity"}

decision := {"allow": true, "reason": sprintf("identified as %s", [input.identity.id])} if {
	input.identity.id != null
}
"""


def allow_identified_policy(tmp: Path) -> Path:
    """A policy that lets any attested caller through, so tests observe attestation alone."""
    d = tmp / "policy"
    d.mkdir(exist_ok=True)
    (d / "allow.rego").write_text(ALLOW_IDENTIFIED)
    return d
