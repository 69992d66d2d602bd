"""Keyless's own signing key: mints JWTs and publishes the public half as a JWKS.

The key comes from ``signing.key_file`` (PEM, so replicas and restarts share it) or is generated
in memory at start. Verifiers fetch ``/jwks.json`` from the admin listener, so an in-memory key
simply rotates on restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any, cast

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from proxy.errors import ConfigError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class Signer:
    def __init__(self, algorithm: str, key: PrivateKey, issuer: str) -> None:
        self.algorithm = algorithm
        self.issuer = issuer
        self._key = key
        self.public_jwk = _public_jwk(algorithm, key)
        self.kid = self.public_jwk["kid"]

    @classmethod
    def create(cls, algorithm: str, key_file: Path | None, issuer: str) -> Signer:
        if key_file is None:
            return cls(algorithm, _generate(algorithm), issuer)
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError([f"signing.key_file: cannot load private key from {key_file} ({_why(e)})"]) from None
        expected = {"ES256": ec.EllipticCurvePrivateKey, "RS256": rsa.RSAPrivateKey,
                    "EdDSA": ed25519.Ed25519PrivateKey}[algorithm]
        if not isinstance(key, expected):
            raise ConfigError([f"signing.key_file: key type does not match algorithm {algorithm}"])
        return cls(algorithm, cast(PrivateKey, key), issuer)

    def mint(self, subject: str, audience: str | list[str], ttl: float,
             extra: dict[str, Any] | None = None, issuer: str | None = None) -> tuple[str, float]:
        """A signed JWT for ``subject`` and its expiry (epoch seconds)."""
        now = int(time.time())
        exp = now + int(ttl)
        claims: dict[str, Any] = {
            **(extra or {}),
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.kid})
        return token, float(exp)

    def derived_key(self, purpose: bytes) -> bytes:
        """A secret derived from the signing key, stable for as long as the key is."""
        der = self._key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        return hmac.new(der, b"keyless:" + purpose, hashlib.sha256).digest()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk]}

    def __repr__(self) -> str:
        return f"Signer(algorithm={self.algorithm!r}, kid={self.kid!r})"


def _generate(algorithm: str) -> PrivateKey:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ed25519.Ed25519PrivateKey.generate()


def _public_jwk(algorithm: str, key: PrivateKey) -> dict[str, Any]:
    impl = {"ES256": ECAlgorithm, "RS256": RSAAlgorithm, "EdDSA": OKPAlgorithm}[algorithm]
    jwk: dict[str, Any] = json.loads(impl.to_jwk(key.public_key()))  # type: ignore[attr-defined]
    # RFC 7638 thumbprint over the required members, so the kid is stable for a given key.
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
    members = {k: jwk[k] for k in required[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    jwk["kid"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    jwk["alg"] = algorithm
    jwk["use"] = "sig"
    return jwk


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0]
