"""oauth2 and token_exchange end to end against a real oidc-provider.

curl -> Keyless (real proxy) -> HTTPS upstream that verifies the bearer token against the
provider's JWKS, as a resource server would. The provider is node-oidc-provider (tests/oauth).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Keyless, Upstream, base_config, wait_for_audit
from tests.peers import JwtVerifier, OidcProvider, keyless_signing_key, write_policy

SECRET_BASIC = "canary-oauth-basic-5f1e2d3c4b5a"
SECRET_POST = "canary-oauth-post-9a8b7c6d5e4f"
SECRET_EXCHANGE = "canary-oauth-exchange-0a1b2c3d"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


def client(client_id: str, method: str, secret: str | None = None, grant: str = "client_credentials",
           **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"client_id": client_id, "grant_types": [grant], "redirect_uris": [], "response_types": [],
                         "token_endpoint_auth_method": method, **extra}
    if secret:
        c["client_secret"] = secret
    return c


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return keyless_signing_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def oidc(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, dict[str, Any]]) -> Iterator[OidcProvider]:
    _, jwks = keys
    p = OidcProvider(tmp_path_factory.mktemp("oidc"), clients=[
        client("app-basic", "client_secret_basic", SECRET_BASIC),
        client("app-post", "client_secret_post", SECRET_POST),
        # No secret anywhere: oidc-provider verifies Keyless's client assertion with this key.
        client("app-pkjwt", "private_key_jwt", token_endpoint_auth_signing_alg="ES256", jwks=jwks),
        client("keyless-exchanger", "client_secret_basic", SECRET_EXCHANGE, grant=EXCHANGE),
    ], subject_jwks=jwks, ttl=300).start()
    yield p
    p.stop()


def curl(k: Keyless, url: str, *extra: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *extra, url], env=k.client_env(),
                         capture_output=True, text=True, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        doc = {"raw": body}
    return int(code or 0), doc


def oauth_cred(oidc: OidcProvider, client_id: str, auth: str, **extra: Any) -> dict[str, Any]:
    return {"type": "oauth2", "token_url": oidc.token_url, "client_id": client_id, "client_auth": auth, **extra}


def no_canary(k: Keyless, log: str, *values: str) -> None:
    audit = k.audit_file.read_text() if k.audit_file.exists() else ""
    for v in (SECRET_BASIC, SECRET_POST, SECRET_EXCHANGE, *values):
        assert v not in log, "a secret reached the Keyless log"
        assert v not in audit, "a secret reached the audit log"


def test_client_credentials_with_each_client_auth_method(tmp_path: Path, upstream: Upstream, oidc: OidcProvider,
                                                         keys: tuple[Path, dict[str, Any]]) -> None:
    # The API accepts tokens for two resources; the policy's params ask for the second one.
    verifier = oidc.verifier("https://api.test")
    checks: list[JwtVerifier] = [verifier, oidc.verifier("https://reports.test")]
    upstream.check = lambda rec: 200 if any(c(rec) == 200 for c in checks) else 401
    (tmp_path / "post-secret").write_text(SECRET_POST + "\n")
    cfg = base_config(tmp_path, upstream, policy={"dir": str(write_policy(tmp_path, {
        "pkjwt": {"resource": "https://reports.test", "scopes": ["write"]},
    }))}, signing={"key_file": str(keys[0])}, credentials={
        "basic": oauth_cred(oidc, "app-basic", "client_secret_basic", client_secret_env="KL_TEST_BASIC",
                            scopes=["read"], resource="https://api.test"),
        "post": oauth_cred(oidc, "app-post", "client_secret_post", client_secret_file=str(tmp_path / "post-secret"),
                           scopes=["read", "write"], resource="https://api.test"),
        "pkjwt": oauth_cred(oidc, "app-pkjwt", "private_key_jwt", scopes=["read"], resource="https://api.test"),
    })
    k = Keyless(tmp_path, cfg, env={"KL_TEST_BASIC": SECRET_BASIC}).start()
    try:
        results = {name: curl(k, upstream.url(f"/{name}/v1/items"), "-H", "Authorization: Bearer app-own-token")
                   for name in ("basic", "post", "pkjwt")}
    finally:
        log = k.stop()
    assert {n: r[0] for n, r in results.items()} == {"basic": 200, "post": 200, "pkjwt": 200}, results
    claims = {c["client_id"]: c for c in verifier.claims + checks[1].claims}
    assert claims["app-basic"]["scope"] == "read" and claims["app-basic"]["aud"] == "https://api.test"
    assert claims["app-post"]["scope"] == "read write"
    # The decision's params replaced the configured resource and scopes for this one grant.
    assert claims["app-pkjwt"]["aud"] == "https://reports.test" and claims["app-pkjwt"]["scope"] == "write"
    assert not any("app-own-token" in r.headers.get("authorization", "") for r in upstream.received)
    records = wait_for_audit(k, 3)
    assert sorted(r["credential"]["type"] for r in records) == ["oauth2"] * 3
    assert all(r["credential"]["expires_at"] > time.time() for r in records)
    tokens = [r.headers["authorization"][7:] for r in upstream.received]
    no_canary(k, log, *tokens)


def test_hundred_concurrent_cold_requests_make_one_fetch_then_thousand_hits(
        tmp_path: Path, upstream: Upstream, oidc: OidcProvider) -> None:
    upstream.check = oidc.verifier("https://api.test")
    cfg = base_config(tmp_path, upstream, policy={"dir": str(write_policy(tmp_path))}, credentials={
        "burst": oauth_cred(oidc, "app-basic", "client_secret_basic", client_secret_env="KL_TEST_BASIC",
                            scopes=["read"], resource="https://api.test"),
    })
    k = Keyless(tmp_path, cfg, env={"KL_TEST_BASIC": SECRET_BASIC}).start(log_level="info")
    before = oidc.stats()["token"]
    try:
        url = upstream.url("/burst/v1/x")
        out = subprocess.run(["curl", "-sS", "-Z", "--parallel-immediate", "--parallel-max", "100",
                              "-w", "%{http_code}\n", *(["-o", "/dev/null", url] * 100)],
                             env=k.client_env(), capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == ["200"] * 100, out.stderr[-500:]
        assert oidc.stats()["token"] - before == 1
        out = subprocess.run(["curl", "-sS", "-Z", "--parallel-max", "20", "-w", "%{http_code}\n",
                              *(["-o", "/dev/null", url] * 1000)],
                             env=k.client_env(), capture_output=True, text=True, timeout=300)
        assert out.stdout.split() == ["200"] * 1000, out.stderr[-500:]
    finally:
        k.stop()
    calls = oidc.stats()["token"] - before
    print(f"\ntoken-endpoint calls for 1,100 requests: {calls}")
    assert calls == 1
    assert len(upstream.received) == 1100


@pytest.fixture
def short_oidc(tmp_path: Path) -> Iterator[OidcProvider]:
    p = OidcProvider(tmp_path / "oidc-short", clients=[client("app-basic", "client_secret_basic", SECRET_BASIC)],
                     ttl=20).start()
    yield p
    p.stop()


def test_refresh_ahead_then_outage_after_expiry_fails_closed(tmp_path: Path, upstream: Upstream,
                                                            short_oidc: OidcProvider) -> None:
    oidc = short_oidc
    upstream.check = oidc.verifier("https://api.test")
    # 20 s tokens: refreshed in the background from 10 s, never served after 15 s. The windows
    # are wide so that a loaded CI machine does not turn the schedule around.
    cfg = base_config(tmp_path, upstream, policy={"dir": str(write_policy(tmp_path))}, credentials={
        "short": oauth_cred(oidc, "app-basic", "client_secret_basic", client_secret_env="KL_TEST_BASIC",
                            resource="https://api.test", refresh_at=0.5, timeout=1, retries=1, backoff=0.05),
    })
    k = Keyless(tmp_path, cfg, env={"KL_TEST_BASIC": SECRET_BASIC}).start()
    url = upstream.url("/short/x")
    try:
        t0 = time.monotonic()
        assert curl(k, url)[0] == 200
        assert oidc.stats()["token"] == 1
        time.sleep(max(0.0, 11 - (time.monotonic() - t0)))
        started = time.monotonic()
        assert curl(k, url)[0] == 200          # served from cache, refresh starts behind it
        served_in = time.monotonic() - started
        deadline = time.monotonic() + 3
        while oidc.stats()["token"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert oidc.stats()["token"] == 2      # refreshed before expiry
        # The issuer counts the request when it arrives; Keyless stores the token once the answer
        # is read. Give a loaded machine time for that before using the refreshed token.
        time.sleep(1.5)
        assert curl(k, url)[0] == 200
        first, second, third = (r.headers["authorization"] for r in upstream.received)
        assert first == second != third        # the refreshed token is in use from then on
        # Outage: the background refresh fails while the current token is still valid ...
        oidc.fault("http500")
        time.sleep(max(0.0, 11 - (time.monotonic() - started)))
        assert curl(k, url)[0] == 200
        # ... and once that token is near expiry Keyless refuses instead of sending it.
        time.sleep(max(0.0, 17 - (time.monotonic() - started)))
        status, body = curl(k, url)
        assert status == 503 and body["error"] == "credential_unavailable"
        assert "token endpoint answered 500" in body["message"]
    finally:
        oidc.fault(None)
        log = k.stop()
    assert served_in < 3.0
    assert len(upstream.received) == 4
    last = wait_for_audit(k, 5)[-1]
    assert last["outcome"]["error"] == "credential_unavailable" and "answered 500" in last["outcome"]["message"]
    no_canary(k, log)


@pytest.mark.parametrize("mode,reason", [
    ("http500", "token endpoint answered 500"),
    ("http400", "token endpoint answered 400 (invalid_client)"),
    ("nonjson", "not JSON"),
    ("noaccess", "token response has no access_token"),
    ("slow", "did not answer within 1s"),
    ("down", "cannot connect"),
])
def test_token_endpoint_failures_fail_closed(tmp_path: Path, upstream: Upstream, oidc: OidcProvider,
                                             mode: str, reason: str) -> None:
    from proxy.demo import free_port

    token_url = f"http://127.0.0.1:{free_port()}/token" if mode == "down" else oidc.token_url
    cfg = base_config(tmp_path, upstream, policy={"dir": str(write_policy(tmp_path))}, credentials={
        "failing": {"type": "oauth2", "token_url": token_url, "client_id": "app-basic",
                    "client_secret_env": "KL_TEST_BASIC", "timeout": 1, "retries": 1, "backoff": 0.05},
    })
    k = Keyless(tmp_path, cfg, env={"KL_TEST_BASIC": SECRET_BASIC}).start()
    try:
        oidc.fault(None if mode == "down" else mode)
        status, body = curl(k, upstream.url("/failing/x"))
    finally:
        oidc.fault(None)
        log = k.stop()
    assert status == 503 and body["error"] == "credential_unavailable", body
    assert reason in body["message"]
    assert upstream.received == []
    record = wait_for_audit(k, 1)[0]
    assert record["outcome"]["error"] == "credential_unavailable" and reason in record["outcome"]["message"]
    assert record["credential"] is None
    no_canary(k, log)


def test_token_exchange_gives_each_identity_its_own_token(tmp_path: Path, upstream: Upstream, oidc: OidcProvider,
                                                         keys: tuple[Path, dict[str, Any]]) -> None:
    upstream.check = oidc.verifier("https://ledger.test")
    cfg = base_config(tmp_path, upstream, policy={"dir": str(write_policy(tmp_path))},
                      signing={"key_file": str(keys[0])},
                      trust=[{"name": "loopback", "type": "source_ip", "workloads": [
                          {"cidr": "127.0.0.2/32", "id": "spiffe://demo.local/billing"},
                          {"cidr": "127.0.0.3/32", "id": "spiffe://demo.local/reports"}]}],
                      credentials={"exchange": {
                          "type": "token_exchange", "issuer": oidc.issuer, "client_id": "keyless-exchanger",
                          "client_secret_env": "KL_TEST_EXCHANGE", "audience": "https://ledger.test",
                          "scopes": ["read"]}})
    k = Keyless(tmp_path, cfg, env={"KL_TEST_EXCHANGE": SECRET_EXCHANGE}).start()
    before = oidc.stats()["byGrant"].get(EXCHANGE, 0)
    try:
        url = upstream.url("/exchange/v1/ledger")
        codes = [curl(k, url, "--interface", src)[0] for src in ("127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3")]
    finally:
        log = k.stop()
    assert codes == [200] * 4
    tokens = [r.headers["authorization"] for r in upstream.received]
    assert tokens[0] == tokens[2] and tokens[1] == tokens[3] and tokens[0] != tokens[1]
    subjects = [c["sub"] for c in upstream.check.claims]  # type: ignore[union-attr]
    assert subjects == ["spiffe://demo.local/billing", "spiffe://demo.local/reports"] * 2
    assert oidc.stats()["byGrant"].get(EXCHANGE, 0) - before == 2
    no_canary(k, log, *(t[7:] for t in tokens))


def test_token_exchange_presents_the_callers_own_workload_token(tmp_path: Path, upstream: Upstream,
                                                                keys: tuple[Path, dict[str, Any]]) -> None:
    from tests.issuer import Issuer, jwt_trust

    issuer = Issuer(tmp_path / "issuer").start()
    # The authorization server trusts the workload issuer's keys and Keyless's own.
    oidc = OidcProvider(tmp_path / "oidc-x", clients=[
        client("keyless-exchanger", "client_secret_basic", SECRET_EXCHANGE, grant=EXCHANGE)],
        subject_jwks={"keys": keys[1]["keys"] + issuer.jwks()["keys"]}, subject_audiences=["keyless"]).start()
    upstream.check = oidc.verifier("https://ledger.test")
    cfg = base_config(tmp_path, upstream, policy={"dir": str(write_policy(tmp_path))},
                      signing={"key_file": str(keys[0])},
                      trust=[jwt_trust(issuer), {"name": "loopback", "type": "source_ip", "workloads": [
                          {"cidr": "127.0.0.2/32", "id": "spiffe://demo.local/billing"}]}],
                      credentials={"exchange": {
                          "type": "token_exchange", "token_url": oidc.token_url, "client_id": "keyless-exchanger",
                          "client_secret_env": "KL_TEST_EXCHANGE", "audience": "https://ledger.test",
                          "subject_audience": oidc.issuer}})
    k = Keyless(tmp_path, cfg, env={"KL_TEST_EXCHANGE": SECRET_EXCHANGE}).start()
    workload_token = issuer.mint()
    try:
        url = upstream.url("/exchange/v1/ledger")
        proxy_with_token = k.proxy_url.replace("http://", f"http://workload:{workload_token}@")
        with_token = curl(k, url, "-x", proxy_with_token)
        minted = curl(k, url, "--interface", "127.0.0.2")
    finally:
        log = k.stop()
        oidc.stop()
        issuer.stop()
    assert with_token[0] == 200 and minted[0] == 200, (with_token, minted)
    subjects = [c["sub"] for c in upstream.check.claims]  # type: ignore[union-attr]
    # The first exchange presented the caller's own token; the second, a token Keyless minted.
    assert subjects == ["system:serviceaccount:payments:billing", "spiffe://demo.local/billing"]
    no_canary(k, log, workload_token, *(r.headers["authorization"][7:] for r in upstream.received))
