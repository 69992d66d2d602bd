"""Trust providers: each turns evidence about a connection into an Attestation.

A provider never decides access; it states verified facts (SPIRE's selectors) and the policy
decides. ``attest`` returns None when the provider has nothing to say about this caller and
raises ``KeylessError("attestation_failed", ...)`` when evidence is present but invalid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from proxy.confread import Section
from proxy.model import Attestation


@dataclass(frozen=True, slots=True)
class Caller:
    """What Keyless knows about the connection a request arrived on."""

    address: str
    port: int


class TrustProvider(Protocol):
    name: str
    type: str

    async def attest(self, caller: Caller) -> Attestation | None:
        """Called once per request (before the policy) with the caller's connection facts."""
        ...


class TrustSpec(NamedTuple):
    parse: Callable[[Section], Any]
    create: Callable[[str, Any], TrustProvider]


def _registry() -> dict[str, TrustSpec]:
    from proxy.trust import source_ip

    return {"source_ip": TrustSpec(source_ip.parse, source_ip.SourceIpProvider)}


TRUST_PROVIDERS: dict[str, TrustSpec] = _registry()
