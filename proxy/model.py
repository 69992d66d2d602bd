"""The values that flow through one request: no I/O, no mitmproxy."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Attestation:
    """One piece of verified evidence about the caller, as a trust provider saw it.

    ``facts`` are selectors in SPIRE's sense (CIDR matched, token claims, certificate SAN):
    data the policy may key on, never a verdict.
    """

    provider: str
    type: str
    id: str | None
    facts: Mapping[str, Any] = field(default_factory=dict)
    # The verified credential itself (a workload JWT), for a credential provider that presents
    # it onward (token exchange). Never in the policy input, the audit record or repr().
    evidence: str | None = field(default=None, repr=False, compare=False)

    def as_input(self) -> dict[str, Any]:
        return {"provider": self.provider, "type": self.type, "id": self.id, "facts": dict(self.facts)}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the strongest verified id plus every attestation that contributed."""

    id: str | None
    attestations: tuple[Attestation, ...] = ()
    # Revoked through `keyless revoke` (proxy/shared/revocation.py): the policy sees it, and
    # Keyless refuses the request after the decision whatever the policy says.
    revoked: bool = False

    def as_input(self) -> dict[str, Any]:
        return {"id": self.id, "attestations": [a.as_input() for a in self.attestations], "revoked": self.revoked}


ANONYMOUS = Identity(id=None)


@dataclass(frozen=True, slots=True)
class Source:
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer, parsed strictly (see ``proxy.policy.result``)."""

    allow: bool
    reason: str = ""
    credential: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    # ``cache_ttl`` and ``vary`` come from the policy (``cache_ttl`` or ``cache: {ttl, vary}``); the rest is set
    # by Keyless: the policy revision that produced it, the engine's own decision id (OPA's),
    # and whether it was served from the decision cache.
    cache_ttl: float | None = None
    # ``cache.vary``: the input paths the decision depends on; None keeps the strict cache key.
    vary: tuple[str, ...] | None = None
    revision: str | None = None
    engine_decision_id: str | None = None
    cached: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    """What was injected, described without its value: safe to log and audit."""

    name: str
    type: str
    expires_at: float | None
    fingerprint: str
    # The strings this grant put on the wire (whole header value, bare token, Basic pair,
    # SigV4 signature and session token): what ``proxy.redact`` removes from responses. Never
    # in repr(), comparisons or ``as_audit()``.
    secret_forms: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def as_audit(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "expires_at": self.expires_at,
            "fingerprint": self.fingerprint,
        }


# Fingerprints are keyed: a bare SHA-256 of a low-entropy secret (a password, a short API key)
# in every audit record would let anyone holding the log guess it offline. The key is set once
# at start from Keyless's signing key (proxy.server.prepare), so the same secret keeps the same
# fingerprint across the records (and workers) of one deployment.
_FINGERPRINT_KEY = secrets.token_bytes(32)


def set_fingerprint_key(key: bytes) -> None:
    global _FINGERPRINT_KEY
    _FINGERPRINT_KEY = key


def fingerprint(value: str | bytes) -> str:
    """A short keyed fingerprint: correlates records about one credential, reveals nothing."""
    data = value.encode() if isinstance(value, str) else value
    return "hmac-sha256:" + hmac.new(_FINGERPRINT_KEY, data, hashlib.sha256).hexdigest()[:16]


class OutboundRequest(Protocol):
    """The parts of an outgoing request that strip and inject may touch.

    mitmproxy's ``http.Request`` satisfies it; tests may pass a plain object.
    """

    @property
    def method(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def path(self) -> str: ...
    @property
    def headers(self) -> MutableMapping[str, str]: ...
    @property
    def query(self) -> MutableMapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class GrantContext:
    """What a credential provider may know about the call it is minting for."""

    identity: Identity
    decision: Decision
    scheme: str
    host: str
    port: int
    path: str = ""
    # The user's token an agent presented for an on-behalf-of exchange (proxy.agents), verified.
    user_token: str | None = field(default=None, repr=False, compare=False)

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        suffix = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{suffix}"
