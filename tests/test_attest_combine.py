"""Combining evidence: the strongest verified id wins, disagreeing strong ids refuse."""

from __future__ import annotations

import pytest

from proxy.errors import KeylessError
from proxy.model import Attestation
from proxy.trust.combine import combine, merge_carried

SVID = Attestation("svid", "mtls", "spiffe://prod/a")
TOKEN_A = Attestation("k8s", "jwt", "spiffe://prod/a", {"expires_at": 2000})
TOKEN_B = Attestation("k8s", "jwt", "spiffe://prod/b")
ADDRESS = Attestation("net", "source_ip", "spiffe://demo/by-address")
PROC = Attestation("local", "process", None, {"uid": 0})


def test_strongest_id_wins_over_source_address() -> None:
    assert combine([ADDRESS, TOKEN_B]).id == "spiffe://prod/b"
    assert combine([ADDRESS, PROC]).id == "spiffe://demo/by-address"
    assert combine([PROC]).id is None and combine([PROC]).attestations == (PROC,)
    assert combine([]).id is None


def test_agreeing_strong_ids_combine_and_disagreeing_ones_refuse() -> None:
    assert combine([SVID, TOKEN_A, ADDRESS]).id == "spiffe://prod/a"
    with pytest.raises(KeylessError) as e:
        combine([SVID, TOKEN_B])
    assert e.value.code == "attestation_failed" and "disagree" in e.value.message


def test_carried_tunnel_identity() -> None:
    assert merge_carried([SVID], [TOKEN_A], now=1000) == [SVID, TOKEN_A]
    # A fresh attestation from the same provider replaces the carried one.
    assert merge_carried([TOKEN_B], [TOKEN_A], now=1000) == [TOKEN_B]
    with pytest.raises(KeylessError, match="expired"):
        merge_carried([], [TOKEN_A], now=2001)
