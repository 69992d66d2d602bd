"""The ``jwt`` trust provider end to end: a real issuer, the real proxy, curl and requests."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from tests.harness import Keyless, Upstream, base_config, wait_for_audit
from tests.issuer import Issuer, allow_identified_policy, ec_key, jwt_trust, rsa_key


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[Issuer]:
    i = Issuer(tmp_path / "issuer").start()
    yield i
    i.stop()


def start(tmp: Path, upstream: Upstream, *trust: dict[str, Any]) -> Keyless:
    cfg = base_config(tmp, upstream, trust=list(trust), policy={"dir": str(allow_identified_policy(tmp))})
    return Keyless(tmp, cfg).start()


def via(k: Keyless, token: str, user: str = "workload") -> dict[str, str]:
    proxy = k.proxy_url.replace("http://", f"http://{user}:{token}@")
    return {"http": proxy, "https": proxy}


def assert_no_secret(k: Keyless, log: str, *secrets: str) -> None:
    audit = k.audit_file.read_text() if k.audit_file.exists() else ""
    for s in secrets:
        assert s not in log and s not in audit


def test_curl_with_token_in_proxy_url_attests_the_tunnel(tmp_path: Path, upstream: Upstream, issuer: Issuer) -> None:
    k = start(tmp_path, upstream, jwt_trust(issuer))
    token = issuer.mint()
    try:
        out = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code}", "-x", via(k, token)["https"],
             "-H", "X-Forwarded-For: 10.9.9.9", "-H", "Forwarded: for=10.9.9.9", upstream.url("/v1/a"),
             upstream.url("/v1/b")],
            env=k.client_env(), capture_output=True, text=True, timeout=30)
        assert out.stdout == "200200", out.stderr
    finally:
        log = k.stop()
    assert len(upstream.received) == 2
    for r in upstream.received:
        assert "proxy-authorization" not in r.headers
        assert "x-forwarded-for" not in r.headers and "forwarded" not in r.headers
    records = wait_for_audit(k, 2)
    assert [r["outcome"]["status"] for r in records] == [200, 200]
    ident = records[0]["identity"]
    assert ident["id"] == f"{issuer.url}#system:serviceaccount:payments:billing"
    att = next(a for a in ident["attestations"] if a["type"] == "jwt")
    assert att["facts"]["issuer"] == issuer.url and att["facts"]["audience"] == "keyless"
    assert "x-forwarded-for" in records[0]["stripped"]
    assert_no_secret(k, log, token, token.split(".")[2])


def test_requests_with_ec_token_and_bearer_over_plain_http(tmp_path: Path, upstream: Upstream,
                                                          issuer: Issuer) -> None:
    k = start(tmp_path, upstream, jwt_trust(issuer))
    token = issuer.mint(key=issuer.keys[1], sub="ec-workload")
    try:
        with requests.Session() as s:
            s.proxies = via(k, token)
            for _ in range(3):  # one tunnel, three requests: attested once, identity kept
                # verify= per request: a session's verify loses to REQUESTS_CA_BUNDLE in the environment.
                assert s.get(upstream.url("/v1/x"), timeout=10, verify=str(k.ca_cert)).status_code == 200
        plain = requests.get(upstream.url("/v1/plain", tls=False), timeout=10,
                             proxies={"http": k.proxy_url}, headers={"Proxy-Authorization": f"Bearer {token}"})
        assert plain.status_code == 200
    finally:
        log = k.stop()
    records = wait_for_audit(k, 4)
    assert {r["identity"]["id"] for r in records} == {f"{issuer.url}#ec-workload"}
    assert all("proxy-authorization" not in r.headers for r in upstream.received)
    assert_no_secret(k, log, token)


def attacks(issuer: Issuer) -> dict[str, str]:
    """Tokens that must all be refused, by name."""
    now = int(time.time())
    rsa = issuer.keys[0]
    pub_pem = rsa.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    attacker = rsa_key("rsa-1")  # same kid as the issuer's key, different key
    attacker_ec = ec_key("attacker")
    unsigned = (base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
                .rstrip(b"=").decode() + "." + base64.urlsafe_b64encode(json.dumps(issuer.claims()).encode())
                .rstrip(b"=").decode() + ".")
    # HS256 keyed with the issuer's public key (the classic algorithm-confusion forgery).
    hs_header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT","kid":"rsa-1"}').rstrip(b"=")
    hs_body = base64.urlsafe_b64encode(json.dumps(issuer.claims()).encode()).rstrip(b"=")
    import hashlib
    import hmac
    sig = hmac.new(pub_pem, hs_header + b"." + hs_body, hashlib.sha256).digest()
    hs_pub = (hs_header + b"." + hs_body + b"." + base64.urlsafe_b64encode(sig).rstrip(b"=")).decode()
    return {
        "alg none": unsigned,
        "HS256 keyed with the public key": hs_pub,
        "missing exp": issuer.mint(exp=None),
        "missing aud": issuer.mint(aud=None),
        "missing iat": issuer.mint(iat=None),
        "missing sub": issuer.mint(sub=None),
        "wrong audience": issuer.mint(aud="someone-else"),
        "issuer prefix trick": issuer.mint(iss=issuer.url + ".evil.example"),
        "issuer with path suffix": issuer.mint(iss=issuer.url + "/x"),
        "issuer as prefix of ours": issuer.mint(iss=issuer.url[:-1]),
        "expired beyond skew": issuer.mint(iat=now - 3600, exp=now - 120),
        "not yet valid beyond skew": issuer.mint(nbf=now + 600),
        "issued in the future": issuer.mint(iat=now + 600, exp=now + 1200),
        "signed by another key with our kid": jwt.encode(issuer.claims(), attacker.private, algorithm="RS256",
                                                         headers={"kid": "rsa-1"}),
        "jku pointing at the attacker": jwt.encode(
            issuer.claims(), attacker_ec.private, algorithm="ES256",
            headers={"kid": "attacker", "jku": "https://attacker.example/jwks"}),
        "embedded jwk header": jwt.encode(
            issuer.claims(), attacker_ec.private, algorithm="ES256",
            headers={"kid": "attacker", "jwk": attacker_ec.public_jwk()}),
        "unknown crit header": issuer.mint(headers={"crit": ["exp-ext"], "exp-ext": 1}),
        "algorithm not in allowlist": jwt.encode(issuer.claims(), rsa.private, algorithm="PS256",
                                                 headers={"kid": "rsa-1"}),
        "unknown issuer": issuer.mint(iss="https://other.example"),
        "not a jwt": "definitely-not-a-token",
    }


def test_forged_and_invalid_tokens_are_refused(tmp_path: Path, upstream: Upstream, issuer: Issuer) -> None:
    k = start(tmp_path, upstream, jwt_trust(issuer, clock_skew=30))
    cases = attacks(issuer)
    try:
        # A token just past exp but within the skew still passes (the skew is bounded, not zero).
        now = int(time.time())
        ok = issuer.mint(iat=now - 100, exp=now - 10)
        assert requests.get(upstream.url("/v1/ok", tls=False), proxies=via(k, ok), timeout=10).status_code == 200
        for name, token in cases.items():
            r = requests.get(upstream.url("/v1/attack", tls=False), proxies=via(k, token), timeout=10)
            assert r.status_code == 407, name
            assert r.json()["error"] == "attestation_failed", name
            assert r.headers["Proxy-Authenticate"].startswith("Bearer")
        # The same refusal on a CONNECT: the tunnel is never opened.
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_connect}", "-x",
                              via(k, cases["wrong audience"])["https"], upstream.url("/v1/tunnel")],
                             env=k.client_env(), capture_output=True, text=True, timeout=30)
        assert out.stdout == "407", out.stderr
    finally:
        log = k.stop()
    assert [r.path for r in upstream.received] == ["/v1/ok"]
    records = wait_for_audit(k, len(cases) + 2)
    refused = [r for r in records if r["outcome"]["error"] == "attestation_failed"]
    assert len(refused) == len(cases) + 1
    messages = {r["outcome"]["message"] for r in refused}
    assert any("expired" in m for m in messages) and any("audience" in m for m in messages)
    assert any("not yet valid" in m for m in messages) and any("not allowed" in m for m in messages)
    for token in cases.values():
        assert_no_secret(k, log, token)


def test_random_kid_flood_does_not_hammer_the_issuer(tmp_path: Path, upstream: Upstream, issuer: Issuer) -> None:
    k = start(tmp_path, upstream, jwt_trust(issuer, kid_miss_cooldown=30))
    try:
        good = issuer.mint()
        assert requests.get(upstream.url("/v1/a", tls=False), proxies=via(k, good), timeout=10).status_code == 200
        before = dict(issuer.hits)
        for _ in range(50):
            forged = issuer.mint(key=rsa_key(kid=f"random-{time.monotonic_ns()}"))
            r = requests.get(upstream.url("/v1/b", tls=False), proxies=via(k, forged), timeout=10)
            assert r.status_code == 407
        # One refresh for the whole flood (the cooldown), however many unknown kids arrive.
        assert issuer.hits["jwks"] - before["jwks"] <= 1, issuer.hits
        assert requests.get(upstream.url("/v1/c", tls=False), proxies=via(k, good), timeout=10).status_code == 200
    finally:
        k.stop()


def test_issuer_down_serves_stale_keys_then_fails_closed(tmp_path: Path, upstream: Upstream,
                                                         issuer: Issuer) -> None:
    k = start(tmp_path, upstream, jwt_trust(issuer, refresh_interval=1, max_stale=4, kid_miss_cooldown=0.5))
    token = issuer.mint()

    def status() -> int:
        return requests.get(upstream.url("/v1/x", tls=False), proxies=via(k, token), timeout=10).status_code

    try:
        assert status() == 200
        fetched = time.monotonic()
        issuer.down = True
        time.sleep(1.5)
        assert status() == 200  # stale but within max_stale: served from cache
        time.sleep(max(0.0, fetched + 4.5 - time.monotonic()))
        assert status() == 407  # past max_stale: fail closed
        issuer.down = False
        time.sleep(0.6)
        assert status() == 200  # the issuer is back: keys refreshed on demand
    finally:
        log = k.stop()
    records = wait_for_audit(k, 4)
    assert "stale" in (records[2]["outcome"]["message"] or "")
    assert "cannot refresh keys" in log


def test_slow_issuer_does_not_delay_other_callers(tmp_path: Path, upstream: Upstream, issuer: Issuer) -> None:
    other = Issuer(tmp_path / "issuer2").start()
    try:
        cfg = jwt_trust(issuer, kid_miss_cooldown=0)
        cfg["issuers"].append({"issuer": other.url, "audiences": ["keyless"], "ca_file": str(other.ca_file)})
        k = start(tmp_path, upstream, cfg)
        fast_token = other.mint(sub="fast")
        try:
            for t in (issuer.mint(), fast_token):  # warm both key caches
                assert requests.get(upstream.url("/v1/w", tls=False), proxies=via(k, t), timeout=10).status_code == 200
            # The slow issuer rotates in a new key: a token with the new kid makes Keyless fetch.
            new = rsa_key("rsa-2")
            issuer.keys.append(new)
            issuer.delay = 2.0
            slow_result: list[tuple[int, float]] = []

            def slow() -> None:
                t0 = time.monotonic()
                r = requests.get(upstream.url("/v1/slow", tls=False), proxies=via(k, issuer.mint(key=new)),
                                 timeout=20)
                slow_result.append((r.status_code, time.monotonic() - t0))

            th = threading.Thread(target=slow)
            th.start()
            time.sleep(0.3)
            latencies = []
            for _ in range(5):
                t0 = time.monotonic()
                r = requests.get(upstream.url("/v1/fast", tls=False), proxies=via(k, fast_token), timeout=10)
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200
            th.join(20)
            assert slow_result and slow_result[0][0] == 200 and slow_result[0][1] >= 1.5, slow_result
            assert max(latencies) < 0.5, latencies
            print(f"fast-path latency during slow issuer fetch: max {max(latencies) * 1000:.1f} ms")
        finally:
            k.stop()
    finally:
        other.stop()


def test_presets_and_key_sources(tmp_path: Path, upstream: Upstream, issuer: Issuer) -> None:
    # A second issuer that is never reachable: its keys come from a local JWKS file.
    offline = Issuer(tmp_path / "offline", port=6443)
    (tmp_path / "jwks.json").write_text(json.dumps(offline.jwks()))
    trust = jwt_trust(issuer, issuer_options={"preset": "github"})
    trust["issuers"].append({"issuer": offline.url, "preset": "kubernetes", "audiences": ["keyless"],
                             "jwks_file": str(tmp_path / "jwks.json")})
    gitlab = Issuer(tmp_path / "gitlab", port=7443)
    (tmp_path / "gitlab.json").write_text(json.dumps(gitlab.jwks()))
    trust["issuers"].append({"issuer": gitlab.url, "preset": "gitlab", "audiences": ["keyless"],
                             "jwks_file": str(tmp_path / "gitlab.json")})
    k = start(tmp_path, upstream, trust)
    gl = gitlab.mint(sub="project_path:acme/infra:ref_type:branch:ref:main", project_path="acme/infra",
                     project_id="7", ref="main", ref_protected="true", pipeline_source="push")
    gh = issuer.mint(sub="repo:acme/deploy:ref:refs/heads/main", repository="acme/deploy", repository_id="42",
                     ref="refs/heads/main", workflow="deploy", environment="prod", actor="octocat")
    k8s = offline.mint(key=offline.keys[1], **{"kubernetes.io": {
        "namespace": "ci", "serviceaccount": {"name": "builder", "uid": "u-1"}, "pod": {"name": "b-1", "uid": "p"}}})
    k8s_without_claims = offline.mint()
    try:
        codes = [requests.get(upstream.url("/v1/p", tls=False), proxies=via(k, t), timeout=10).status_code
                 for t in (gh, k8s, k8s_without_claims, gl)]
    finally:
        k.stop()
    assert codes == [200, 200, 407, 200]
    records = wait_for_audit(k, 4)
    gl_facts = records[3]["identity"]["attestations"][0]["facts"]
    assert (gl_facts["preset"], gl_facts["project_path"], gl_facts["ref_protected"]) == ("gitlab", "acme/infra", "true")
    gh_facts = records[0]["identity"]["attestations"][0]["facts"]
    assert gh_facts["preset"] == "github" and gh_facts["repository"] == "acme/deploy"
    assert gh_facts["ref"] == "refs/heads/main" and gh_facts["environment"] == "prod"
    assert records[0]["identity"]["id"] == f"{issuer.url}#repo:acme/deploy:ref:refs/heads/main"
    k8s_facts = records[1]["identity"]["attestations"][0]["facts"]
    assert (k8s_facts["namespace"], k8s_facts["service_account"], k8s_facts["pod"]) == ("ci", "builder", "b-1")
    assert "lacks 'namespace'" in records[2]["outcome"]["message"]
    assert issuer.hits["discovery"] == 1


def test_config_problems_are_reported_at_once(tmp_path: Path) -> None:
    from proxy.config import parse_config
    from proxy.errors import ConfigError
    from tests.harness import REPO

    raw = {"policy": {"dir": str(REPO / "policies")}, "trust": [{
        "name": "t", "type": "jwt", "algorithms": ["RS256", "HS256"], "max_stale": 10, "refresh_interval": 60,
        "issuers": [{"issuer": "http://idp.example", "audiences": ["a"], "jwks_url": "https://idp.example/k",
                     "jwks_file": str(tmp_path / "missing.json"), "id": "{nope}"},
                    {"preset": "kubernetes", "audiences": ["a"]},
                    {"preset": "github"}]}]}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "keyless.yaml")
    problems = e.value.problems
    text = "\n".join(problems)
    assert "trust[0].algorithms: 'HS256' is not allowed" in text
    assert "trust[0].max_stale: must be at least refresh_interval" in text
    assert "trust[0].issuers[0].issuer: must be an https:// URL" in text
    assert "trust[0].issuers[0]: set only one of discovery, jwks_url, jwks_file" in text
    assert "trust[0].issuers[0].jwks_file: file not found" in text
    assert "trust[0].issuers[0].id: unknown placeholder 'nope'" in text
    assert "trust[0].issuers[1].issuer: is required" in text
    assert "trust[0].issuers[2].audiences: is required" in text


def test_tunnel_keeps_identity_only_while_its_token_is_valid(tmp_path: Path, upstream: Upstream,
                                                             issuer: Issuer) -> None:
    k = start(tmp_path, upstream, jwt_trust(issuer, clock_skew=0))
    token = issuer.mint(exp=int(time.time()) + 2)
    try:
        with requests.Session() as s:
            s.proxies = via(k, token)
            first = s.get(upstream.url("/v1/first"), timeout=10, verify=str(k.ca_cert)).status_code
            time.sleep(2.5)
            second = s.get(upstream.url("/v1/second"), timeout=10, verify=str(k.ca_cert))
    finally:
        k.stop()
    assert first == 200 and second.status_code == 407, second.text
    assert "tunnel has expired" in second.json()["message"]
    assert [r.path for r in upstream.received] == ["/v1/first"]
