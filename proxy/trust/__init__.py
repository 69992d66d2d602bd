"""Trust providers: each turns evidence about a connection into an Attestation.

A provider never decides access; it states verified facts (SPIRE's selectors) and the policy
decides. ``attest`` returns None when the provider has nothing to say about this caller and
raises ``KeylessError("attestation_failed", ...)`` when evidence is present but invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from proxy.model import Attestation
from proxy.plugins import PluginSpec


@dataclass(frozen=True, slots=True)
class Caller:
    """What Keyless knows about the connection a request arrived on.

    Only evidence the app cannot forge by writing a header: the TCP peer, the TLS client
    certificate chain mitmproxy received, and ``Proxy-Authorization`` (a header addressed to the
    proxy itself, stripped before forwarding). ``carried`` holds what the CONNECT request that
    opened this tunnel proved, so a tunnel authenticated once keeps its identity.
    """

    address: str
    port: int
    # The proxy's own end of the connection: with (address, port) it names the client's socket.
    local_address: str | None = None
    local_port: int | None = None
    # repr=False: the value is a bearer token.
    proxy_authorization: str | None = field(default=None, repr=False)
    # DER, leaf first, exactly as presented; nothing about it is trusted yet.
    client_certs: tuple[bytes, ...] = field(default=(), repr=False)
    connection_id: str | None = None
    carried: tuple[Attestation, ...] = ()


class TrustProvider(Protocol):
    name: str
    type: str

    async def attest(self, caller: Caller) -> Attestation | None:
        """Called once per request (before the policy) with the caller's connection facts."""
        ...


TrustSpec = PluginSpec[TrustProvider]


def _registry() -> dict[str, TrustSpec]:
    from proxy.trust import jwt, mtls, process, source_ip

    return {
        "source_ip": PluginSpec(source_ip.parse, source_ip.SourceIpProvider),
        "jwt": PluginSpec(jwt.parse, jwt.JwtProvider),
        "mtls": PluginSpec(mtls.parse, mtls.MtlsProvider),
        "process": PluginSpec(process.parse, process.ProcessProvider),
    }


TRUST_PROVIDERS: dict[str, TrustSpec] = _registry()
