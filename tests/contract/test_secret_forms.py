"""Every credential provider records what it injected in ``Grant.secret_forms`` (a contract over
the whole registry): each header value it set is there, and every form is something it sent.

Token caches are seeded with a known token (``TokenCache._store``, as tests/test_token_cache.py
does) so no token endpoint is needed; the providers' ``apply`` runs as in production.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import ReadOnlyCredentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mitmproxy import http

from proxy.config import parse_config
from proxy.credentials import CREDENTIALS, Runtime
from proxy.credentials.cache import Token
from proxy.model import Attestation, Decision, GrantContext, Identity
from proxy.signing import Signer
from tests.harness import REPO

CALLER = "spiffe://t/app"
TOKEN = "canary-token-" + "x" * 24


def outbound() -> http.Request:
    """A real mitmproxy request, as the pipeline hands providers (case-insensitive headers)."""
    return http.Request.make("GET", "https://api.test/v1/x", b"", {"host": "api.test"})


def configs(tmp: Path) -> dict[str, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp / "app.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    (tmp / "basic").write_text(base64.b64encode(b"svc:canary-password-1").decode())
    return {
        "static": {"type": "static", "from": "file", "file": str(tmp / "basic"), "template": "Basic {secret}"},
        "jwt": {"type": "jwt"},
        "oauth2": {"type": "oauth2", "token_url": "https://issuer.test/token", "client_id": "c",
                   "client_auth": "private_key_jwt"},
        "token_exchange": {"type": "token_exchange", "token_url": "https://issuer.test/token", "client_id": "c",
                           "client_auth": "private_key_jwt", "subject": "minted"},
        "aws_sigv4": {"type": "aws_sigv4", "role_arn": "arn:aws:iam::123456789012:role/app",
                      "endpoints": [{"host": "api.test", "service": "s3"}]},
        "github_app": {"type": "github_app", "app_id": 1, "installation_id": 2, "private_key_file": str(pem)},
        "on_behalf_of": {"type": "on_behalf_of", "token_url": "https://issuer.test/token", "client_id": "c",
                         "client_auth": "private_key_jwt"},
    }


def test_the_contract_covers_every_provider(tmp_path: Path) -> None:
    assert set(configs(tmp_path)) == set(CREDENTIALS)


@pytest.mark.parametrize("kind", sorted(CREDENTIALS))
def test_grant_names_what_was_injected(tmp_path: Path, kind: str) -> None:
    raw = {"policy": {"dir": str(REPO / "policies")}, "credentials": {"c": configs(tmp_path)[kind]}}
    config = parse_config(raw, tmp_path / "keyless.yaml")
    p = config.credentials["c"]
    provider: Any = CREDENTIALS[p.type].create("c", p.options, Runtime(Signer.create("ES256", None, "keyless")))
    identity = Identity(CALLER, (Attestation("p", "source_ip", CALLER),))
    # user_token: what an agent presents for on_behalf_of (the other providers ignore it).
    ctx = GrantContext(identity, Decision(True, "", "c", {}), "https", "api.test", 443, path="/v1/x",
                       user_token="canary-user-token-" + "z" * 20)
    cache = getattr(provider, "cache", None)
    if cache is not None:
        data = ReadOnlyCredentials("ASIAEXAMPLEKEYID0001", "secret-key", "canary-session-token-" + "y" * 20) \
            if kind == "aws_sigv4" else None
        key = provider.key_for(ctx) if hasattr(provider, "key_for") else (CALLER, "arn:aws:iam::123456789012:role/app")
        cache._store(key, Token(TOKEN if data is None else data.access_key, time.time() + 3600, data=data))
    req = outbound()
    before = dict(req.headers)
    grant = asyncio.run(provider.apply(req, ctx))
    injected = {k: v for k, v in req.headers.items() if before.get(k) != v}
    forms = grant.secret_forms
    assert forms, kind
    secret_headers = {k: v for k, v in injected.items() if k.lower() not in ("x-amz-date", "x-amz-content-sha256")}
    for value in secret_headers.values():
        assert value in forms
    sent = " ".join(injected.values())
    auth = req.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        sent += " " + base64.b64decode(auth.removeprefix("Basic ")).decode()
    for form in forms:
        assert form in sent, (kind, "a form that was never sent")
    assert all(f not in repr(grant) for f in forms)
    if kind == "static":
        assert "svc:canary-password-1" in forms and "canary-password-1" in forms
    if kind == "aws_sigv4":
        assert "canary-session-token-" + "y" * 20 in forms
