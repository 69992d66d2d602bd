"""Turn what mitmproxy saw on a connection into a ``Caller`` (kept out of the hook for testing)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.errors import KeylessError
from proxy.model import Attestation
from proxy.trust import Caller


def caller_evidence(*, peer: Any, local: Any, connection_id: str | None, proxy_authorization: Sequence[str],
                    certificates: Sequence[x509.Certificate], carried: tuple[Attestation, ...] = ()) -> Caller:
    if len(proxy_authorization) > 1:
        # Two credentials for the proxy: which one counts would depend on who parses first.
        raise KeylessError("attestation_failed", "more than one Proxy-Authorization header")
    return Caller(
        address=str(peer[0]), port=int(peer[1]),
        local_address=str(local[0]) if local else None, local_port=int(local[1]) if local else None,
        proxy_authorization=proxy_authorization[0] if proxy_authorization else None,
        client_certs=tuple(c.public_bytes(Encoding.DER) for c in certificates),
        connection_id=connection_id, carried=carried,
    )
