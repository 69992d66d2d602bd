"""The ``mtls`` trust provider end to end: SVIDs from a test SPIFFE CA, presented by curl and requests."""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.trust.mtls import parse_spiffe_id
from tests.harness import Keyless, Upstream, base_config, wait_for_audit
from tests.issuer import Issuer, allow_identified_policy, jwt_trust
from tests.spiffe_ca import SpiffeCA

BILLING = "spiffe://prod/ns/payments/sa/billing"


@pytest.fixture
def cas(tmp_path: Path) -> dict[str, SpiffeCA]:
    (tmp_path / "svid").mkdir()
    return {"prod": SpiffeCA.create("prod"), "staging": SpiffeCA.create("staging"),
            "evil": SpiffeCA.create("prod")}  # claims the prod trust domain, not configured


def mtls_trust(tmp: Path, cas: dict[str, SpiffeCA]) -> dict[str, Any]:
    return {"name": "svid", "type": "mtls", "bundles": [
        {"trust_domain": "prod", "file": str(cas["prod"].bundle(tmp / "svid"))},
        {"trust_domain": "staging", "file": str(cas["staging"].bundle(tmp / "svid"))}]}


def curl(k: Keyless, url: str, cert: tuple[Path, Path] | None, *extra: str) -> tuple[str, str]:
    args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *extra]
    if cert:
        args += ["--cert", str(cert[0]), "--key", str(cert[1])]
    out = subprocess.run([*args, url], env=k.client_env(), capture_output=True, text=True, timeout=30)
    return out.stdout, out.stderr


@pytest.fixture
def keyless(tmp_path: Path, upstream: Upstream, cas: dict[str, SpiffeCA]) -> Iterator[Keyless]:
    cfg = base_config(tmp_path, upstream, trust=[mtls_trust(tmp_path, cas)],
                      policy={"dir": str(allow_identified_policy(tmp_path))})
    k = Keyless(tmp_path, cfg).start()
    yield k
    k.stop()


def test_svid_identifies_caller_with_curl_and_requests(tmp_path: Path, upstream: Upstream, keyless: Keyless,
                                                      cas: dict[str, SpiffeCA]) -> None:
    d = tmp_path / "svid"
    # The CN claims to be someone else: identity comes from the URI SAN only.
    svid = cas["prod"].issue(d, "billing", [BILLING], cn="spiffe://prod/ns/admin/sa/root")
    assert curl(keyless, upstream.url("/v1/curl"), svid)[0] == "200"
    r = requests.get(upstream.url("/v1/requests"), cert=(str(svid[0]), str(svid[1])),
                     proxies={"https": keyless.proxy_url}, verify=str(keyless.ca_cert), timeout=10)
    assert r.status_code == 200
    staging = cas["staging"].issue(d, "staging", ["spiffe://staging/ns/ci/sa/builder"])
    assert curl(keyless, upstream.url("/v1/staging"), staging)[0] == "200"
    # No certificate: no evidence, so no identity (the policy denies, it is not an attestation failure).
    assert curl(keyless, upstream.url("/v1/anonymous"), None)[0] == "403"
    records = wait_for_audit(keyless, 4)
    assert [r["identity"]["id"] for r in records] == [BILLING, BILLING, "spiffe://staging/ns/ci/sa/builder", None]
    facts = records[0]["identity"]["attestations"][0]["facts"]
    assert facts["trust_domain"] == "prod" and facts["spiffe_id"] == BILLING
    assert [r.path for r in upstream.received] == ["/v1/curl", "/v1/requests", "/v1/staging"]


def test_untrusted_or_malformed_svids_are_refused(tmp_path: Path, upstream: Upstream, keyless: Keyless,
                                                 cas: dict[str, SpiffeCA]) -> None:
    d = tmp_path / "svid"
    bad = {
        "untrusted CA with a valid-looking SPIFFE ID": cas["evil"].issue(d, "evil", [BILLING]),
        "two URI SANs": cas["prod"].issue(d, "two", [BILLING, "spiffe://prod/ns/admin/sa/root"]),
        "wrong trust domain for the bundle": cas["staging"].issue(d, "cross", [BILLING]),
        "expired": cas["prod"].issue(d, "expired", [BILLING], not_before=datetime.timedelta(hours=-3)),
        "not yet valid": cas["prod"].issue(d, "future", [BILLING], not_before=datetime.timedelta(hours=2)),
        "not a SPIFFE ID": cas["prod"].issue(d, "https", ["https://prod/ns/payments/sa/billing"]),
        "no digitalSignature": cas["prod"].issue(d, "ku", [BILLING], key_usage_sign=False),
    }
    for name, svid in bad.items():
        code, err = curl(keyless, upstream.url("/v1/x"), svid)
        assert code == "407", (name, err)
    assert upstream.received == []
    records = wait_for_audit(keyless, len(bad))
    assert [r["outcome"]["error"] for r in records] == ["attestation_failed"] * len(bad)
    messages = [r["outcome"]["message"] for r in records]
    assert "not signed by a trusted bundle" in messages[0]
    assert "2 URI SANs" in messages[1]
    assert "not in trust domain staging" in messages[2]


def test_certificate_and_token_must_agree(tmp_path: Path, upstream: Upstream, cas: dict[str, SpiffeCA]) -> None:
    issuer = Issuer(tmp_path / "issuer").start()
    try:
        k8s = jwt_trust(issuer, name="k8s", issuer_options={
            "preset": "kubernetes", "id": "spiffe://prod/ns/{namespace}/sa/{service_account}"})
        cfg = base_config(tmp_path, upstream, trust=[mtls_trust(tmp_path, cas), k8s, base_config(tmp_path)["trust"][0]],
                          policy={"dir": str(allow_identified_policy(tmp_path))})
        k = Keyless(tmp_path, cfg).start()
        svid = cas["prod"].issue(tmp_path / "svid", "billing", [BILLING])

        def token(sa: str) -> str:
            return issuer.mint(sub=f"system:serviceaccount:payments:{sa}", **{"kubernetes.io": {
                "namespace": "payments", "serviceaccount": {"name": sa, "uid": "u-1"}, "pod": {"name": "p-1"}}})

        try:
            same = curl(k, upstream.url("/v1/same"), svid, "-x", f"http://w:{token('billing')}@127.0.0.1:"
                        f"{k.config['listen']['port']}")
            other = curl(k, upstream.url("/v1/other"), svid, "-x", f"http://w:{token('intruder')}@127.0.0.1:"
                         f"{k.config['listen']['port']}")
        finally:
            k.stop()
        assert same[0] == "200" and other[0] == "407", (same, other)
        records = wait_for_audit(k, 2)
        types = sorted(a["type"] for a in records[0]["identity"]["attestations"])
        assert types == ["jwt", "mtls", "source_ip"]
        assert records[0]["identity"]["id"] == BILLING  # not the source_ip id: the strongest evidence wins
        assert "disagree" in records[1]["outcome"]["message"]
    finally:
        issuer.stop()


@pytest.mark.parametrize("uri,ok", [
    ("spiffe://prod/ns/payments/sa/billing", True), ("spiffe://prod", True),
    ("spiffe://Prod/x", False), ("spiffe://prod/x/", False), ("spiffe://prod//x", False),
    ("spiffe://prod/./x", False), ("spiffe://prod/../x", False), ("spiffe://prod:443/x", False),
    ("spiffe://user@prod/x", False), ("spiffe://prod/x?y=1", False), ("spiffe://prod/x#f", False),
    ("SPIFFE://prod/x", False), ("spiffe:///x", False),
])
def test_spiffe_id_syntax(uri: str, ok: bool) -> None:
    assert (parse_spiffe_id(uri) is not None) is ok
