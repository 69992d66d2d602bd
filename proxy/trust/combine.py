"""Combine every provider's attestation into one Identity.

``identity.id`` is the strongest verified id: a certificate (``mtls``) or a signed token
(``jwt``) outranks the local kernel's word (``process``), which outranks a source address
(``source_ip``). Two verified ids of the strongest kind that disagree (the certificate says A,
the token says B) refuse the request: picking one would let a caller borrow the other's name.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from proxy.errors import KeylessError
from proxy.model import ANONYMOUS, Attestation, Identity

STRENGTH: Mapping[str, int] = {"mtls": 3, "jwt": 3, "process": 2, "source_ip": 1}


def combine(attestations: Iterable[Attestation]) -> Identity:
    found = tuple(attestations)
    if not found:
        return ANONYMOUS
    with_id = [a for a in found if a.id is not None]
    if not with_id:
        return Identity(None, found)
    top = max(STRENGTH.get(a.type, 0) for a in with_id)
    strongest = [a for a in with_id if STRENGTH.get(a.type, 0) == top]
    ids = {a.id for a in strongest}
    if len(ids) > 1:
        who = ", ".join(f"{a.provider} says {a.id}" for a in strongest)
        raise KeylessError("attestation_failed", f"verified identities disagree ({who})")
    return Identity(strongest[0].id, found)


def merge_carried(fresh: list[Attestation], carried: Iterable[Attestation],
                  now: float | None = None) -> list[Attestation]:
    """Add what the tunnel's CONNECT proved, unless the same provider has just said something newer.

    A tunnel keeps its token's identity only while the token is valid: past ``exp`` the request
    is refused rather than served under a credential that no longer proves anything.
    """
    now = time.time() if now is None else now
    seen = {a.provider for a in fresh}
    kept = [a for a in carried if a.provider not in seen]
    for a in kept:
        exp = a.facts.get("expires_at")
        if isinstance(exp, int | float) and now > exp:
            raise KeylessError("attestation_failed", "the token that opened this tunnel has expired; reconnect",
                               f"{a.type}({a.provider})")
    return fresh + kept
