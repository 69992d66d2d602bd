"""Three Keyless replicas sharing tokens and revocations through a real redis-server.

Real things throughout: Debian's ``redis-server`` on a loopback port (with a password, no
persistence), three ``keyless run`` processes (each its own ports, the same ``cache`` config),
curl as the client, the harness's recording upstream, and a token endpoint stand-in
(tests/shared_peers.py) that counts calls and rejects a reused refresh token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.harness import REPO, Keyless, Upstream, base_config
from tests.peers import write_policy
from tests.shared_peers import CLIENT_ID, CLIENT_SECRET, RedisServer, TokenEndpoint

ENC_KEY = "canary-encryption-key-0123456789abcdef0123"
ADMIN_TOKEN = "canary-admin-token-5a4b3c2d1e"
BILLING = "spiffe://demo.local/billing"
PAYMENTS = "spiffe://demo.local/payments"   # revocation-sensitive, from 127.0.0.2


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    r = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield r
    r.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    yield redis_server
    if redis_server.proc is None:
        redis_server.start()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    u = Upstream(tmp_path / "upstream").start()
    yield u
    u.stop()


def replicas(tmp: Path, redis: RedisServer, upstream: Upstream, credential: dict[str, Any],
             n: int = 3, **revocation: Any) -> list[Keyless]:
    """``n`` replicas with identical credentials and cache config, each its own ports and files."""
    cache = {"redis": {"url": redis.url, "password_env": "KL_REDIS_PW", "encryption_key_env": "KL_CACHE_KEY",
                       "lock_ttl": 10, "wait": 5},
             "revocation": {"admin_token_env": "KL_ADMIN_TOKEN", "poll_interval": 0.2, "max_staleness": 1.0,
                            "sensitive": [PAYMENTS], **revocation}}
    trust = [{"name": "loopback", "type": "source_ip",
              "workloads": [{"cidr": "127.0.0.2/32", "id": PAYMENTS}, {"cidr": "127.0.0.0/8", "id": BILLING}]}]
    policy = write_policy(tmp)
    env = {"KL_REDIS_PW": redis.password, "KL_CACHE_KEY": ENC_KEY, "KL_ADMIN_TOKEN": ADMIN_TOKEN,
           "KL_CLIENT_SECRET": CLIENT_SECRET}
    out = []
    for i in range(n):
        d = tmp / f"replica{i}"
        d.mkdir()
        cfg = base_config(d, upstream, policy={"dir": str(policy)}, trust=trust,
                          credentials={"api": dict(credential)}, cache=cache)
        out.append(Keyless(d, cfg, env=env))
    for k in out:
        k.start(log_level="info")
    return out


def unexpired_only(upstream: Upstream, endpoint: TokenEndpoint) -> None:
    """The upstream answers 401 to a token it does not know or that has expired on arrival."""
    def check(rec: Any) -> int:
        auth = rec.headers.get("authorization", "")
        return 200 if any(f"Bearer {i.value}" == auth and i.expires_at > time.time() for i in endpoint.issued) \
            else 401
    upstream.check = check


def oauth(endpoint: TokenEndpoint, **extra: Any) -> dict[str, Any]:
    return {"type": "oauth2", "token_url": endpoint.url, "client_id": CLIENT_ID,
            "client_secret_env": "KL_CLIENT_SECRET", **extra}


def burst(ks: list[Keyless], url: str, per_replica: int, parallel: int = 300,
          source: str | None = None) -> list[str]:
    """``per_replica`` requests to each replica at once (three curls, ``parallel`` each)."""
    procs = [subprocess.Popen(
        ["curl", "-sS", "-Z", "--parallel-immediate", "--parallel-max", str(parallel), "-w", "%{http_code}\n",
         *(["--interface", source] if source else []), *(["-o", "/dev/null", url] * per_replica)],
        env=k.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in ks]
    codes: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        codes += out.split()
    return codes


def one(k: Keyless, url: str, source: str | None = None) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *(["--interface", source] if source else []), url],
                         env=k.client_env(), capture_output=True, text=True, timeout=30)
    body, _, code = out.stdout.rpartition("\n")
    try:
        return int(code or 0), json.loads(body) if body else {}
    except ValueError:
        return int(code or 0), {"raw": body}


def stop_all(ks: list[Keyless]) -> str:
    return "".join(k.stop() for k in ks)


def no_canary(ks: list[Keyless], log: str, redis: RedisServer | None, values: list[str]) -> None:
    """No token value (or other secret) in Redis key names or values, logs or audit records."""
    secrets = [*values, CLIENT_SECRET, ENC_KEY, ADMIN_TOKEN]
    audit = "".join(k.audit_file.read_text() for k in ks if k.audit_file.exists())
    keys, blob = redis.dump() if redis is not None else ([], b"")
    for v in secrets:
        assert v not in log, "a secret reached a Keyless log"
        assert v not in audit, "a secret reached an audit record"
        assert not any(v in key for key in keys), "a secret is in a Redis key name"
        assert v.encode() not in blob, "a secret is stored in Redis in the clear"


def test_thousand_concurrent_requests_across_three_replicas_make_one_token_call(
        tmp_path: Path, redis: RedisServer, upstream: Upstream) -> None:
    endpoint = TokenEndpoint(lifetime=3600, delay=0.3).start()
    ks = replicas(tmp_path, redis, upstream, oauth(endpoint))
    try:
        codes = burst(ks, upstream.url("/api/v1/x", tls=False), per_replica=334)
        assert codes == ["200"] * 1002
        assert endpoint.calls == 1, f"{endpoint.calls} token-endpoint calls for one lifetime"
        metrics = requests.get(ks[0].admin_url + "/metrics", timeout=5).text
        assert "keyless_redis_up 1.0" in metrics
        keys, _ = redis.dump()
        assert any(k.startswith("keyless:tok:") for k in keys), keys
    finally:
        log = stop_all(ks)
        endpoint.stop()
    tokens = {r.headers.get("authorization") for r in upstream.received}
    assert tokens == {f"Bearer {endpoint.issued[0].value}"}
    assert len(upstream.received) == 1002
    no_canary(ks, log, redis, [i.value for i in endpoint.issued])


def test_one_token_call_per_lifetime_across_replicas(tmp_path: Path, redis: RedisServer, upstream: Upstream) -> None:
    # A 6 s token is refreshed at 4.5 s: two bursts a lifetime apart cost exactly two calls.
    endpoint = TokenEndpoint(lifetime=6, delay=0.2).start()
    unexpired_only(upstream, endpoint)
    ks = replicas(tmp_path, redis, upstream, oauth(endpoint))
    try:
        url = upstream.url("/api/v1/x", tls=False)
        assert burst(ks, url, per_replica=50, parallel=50) == ["200"] * 150
        first = endpoint.call_times[0]
        assert endpoint.calls == 1 and time.time() < first + 4.5, "the first burst took longer than the test allows"
        time.sleep(max(0.0, first + 4.8 - time.time()))
        assert burst(ks, url, per_replica=50, parallel=50) == ["200"] * 150
        assert time.time() < first + 9.0
    finally:
        log = stop_all(ks)
        endpoint.stop()
    assert endpoint.calls == 2, f"{endpoint.calls} token calls over two lifetimes"
    assert len({r.headers["authorization"] for r in upstream.received}) == 2
    no_canary(ks, log, redis, [i.value for i in endpoint.issued])


def test_rotating_refresh_token_is_never_spent_twice(tmp_path: Path, redis: RedisServer, upstream: Upstream) -> None:
    # A 3 s access token: each replica reaches the refresh point about every 2 s, all three at once.
    endpoint = TokenEndpoint(lifetime=3, delay=0.2).start()
    unexpired_only(upstream, endpoint)
    rt_file = tmp_path / "refresh-token"
    rt_file.write_text(endpoint.refresh_token + "\n")
    ks = replicas(tmp_path, redis, upstream, oauth(endpoint, grant="refresh_token", refresh_token_file=str(rt_file)))
    codes: list[str] = []
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            codes += burst(ks, upstream.url("/api/v1/x", tls=False), per_replica=30, parallel=30)
        rotations = len(endpoint.spent)
        # The operator re-consents: the issuer's chain starts again from a token written to the
        # file. Whichever replica refreshes next starts the new chain; the others follow it.
        endpoint.spent.add(endpoint.refresh_token)
        endpoint.refresh_token = "canary-rt-operator-" + str(time.time())
        rt_file.write_text(endpoint.refresh_token)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            codes += burst(ks, upstream.url("/api/v1/x", tls=False), per_replica=30, parallel=30)
    finally:
        log = stop_all(ks)
        endpoint.stop()
    assert endpoint.invalid_grants == 0, "a refresh token was presented twice"
    assert rotations >= 3 and len(endpoint.spent) >= rotations + 2, "the access token was not refreshed"
    assert set(codes) == {"200"}, {c: codes.count(c) for c in set(codes)}
    # Every access token the upstream saw was still valid when it arrived.
    issued = {f"Bearer {i.value}" for i in endpoint.issued}
    assert {r.headers["authorization"] for r in upstream.received} <= issued
    no_canary(ks, log, redis, [i.value for i in endpoint.issued] + sorted(endpoint.spent) + [endpoint.refresh_token])


def test_refresh_token_double_spend_is_what_the_lock_prevents(tmp_path: Path, upstream: Upstream) -> None:
    """The control: the same three replicas without Redis spend the first refresh token three times."""
    endpoint = TokenEndpoint(lifetime=3600, delay=0.2).start()
    rt_file = tmp_path / "refresh-token"
    rt_file.write_text(endpoint.refresh_token)
    ks = []
    for i in range(3):
        d = tmp_path / f"alone{i}"
        d.mkdir()
        cfg = base_config(d, upstream, policy={"dir": str(write_policy(tmp_path))}, credentials={"api": oauth(
            endpoint, grant="refresh_token", refresh_token_file=str(rt_file))})
        ks.append(Keyless(d, cfg, env={"KL_CLIENT_SECRET": CLIENT_SECRET}).start(log_level="info"))
    try:
        codes = burst(ks, upstream.url("/api/v1/x", tls=False), per_replica=5, parallel=5)
    finally:
        stop_all(ks)
        endpoint.stop()
    assert endpoint.invalid_grants == 2 and codes.count("503") == 10


def test_revocation_on_one_replica_denies_on_all_three_within_a_second(
        tmp_path: Path, redis: RedisServer, upstream: Upstream) -> None:
    endpoint = TokenEndpoint(lifetime=3600, delay=0.0).start()
    ks = replicas(tmp_path, redis, upstream, oauth(endpoint))
    url = upstream.url("/api/v1/x", tls=False)
    try:
        assert [one(k, url)[0] for k in ks] == [200, 200, 200]
        bad = requests.post(ks[0].admin_url + "/revocations", json={"identity": BILLING},
                            headers={"Authorization": "Bearer wrong"}, timeout=5)
        assert bad.status_code == 401
        revoked_at = time.monotonic()
        r = requests.post(ks[0].admin_url + "/revocations", timeout=5,
                          json={"identity": BILLING, "reason": "incident 42", "ttl": 600},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 201, r.text
        denied: dict[int, float] = {}
        while len(denied) < 3 and time.monotonic() - revoked_at < 3:
            for i, k in enumerate(ks):
                if i not in denied:
                    code, doc = one(k, url)
                    if code == 403:
                        assert doc["error"] == "identity_revoked" and "incident 42" in doc["message"]
                        denied[i] = time.monotonic() - revoked_at
        print(f"\ndenied on each replica after {sorted(round(v, 3) for v in denied.values())} s")
        assert len(denied) == 3 and max(denied.values()) < 1.0, denied
        # The policy allowed it (tests/peers.py allows any identity): Keyless denied it after.
        record = ks[2].audit()[-1]
        assert record["identity"]["revoked"] is True and record["input"]["identity"]["revoked"] is True
        assert record["decision"]["allow"] is True and record["outcome"]["error"] == "identity_revoked"
        assert record["credential"] is None
        # Another identity is not affected.
        assert one(ks[1], url, source="127.0.0.2")[0] == 200
        # Lifted from the command line, with one replica's config: all three serve again.
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "-c", str(ks[1].config_file), "--lift",
                              "--identity", BILLING], env=ks[1].env, capture_output=True, text=True, timeout=30,
                             cwd=REPO)
        assert out.returncode == 0 and "lifted" in out.stdout, out.stderr
        time.sleep(1.0)
        assert [one(k, url)[0] for k in ks] == [200, 200, 200]
        # And revoked from the command line too, with an expiry.
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "-c", str(ks[0].config_file),
                              "--identity", BILLING, "--reason", "cli", "--ttl", "2s"], env=ks[0].env,
                             capture_output=True, text=True, timeout=30, cwd=REPO)
        assert out.returncode == 0, out.stderr
        time.sleep(1.0)
        assert [one(k, url)[0] for k in ks] == [403, 403, 403]
        time.sleep(1.5)  # expired
        assert [one(k, url)[0] for k in ks] == [200, 200, 200]
        metrics = requests.get(ks[0].admin_url + "/metrics", timeout=5).text
        assert 'keyless_revocation_denials_total{reason="revoked"}' in metrics
        assert 'keyless_revocation_changes_total{change="revoked"} 2.0' in metrics
        assert 'keyless_revocation_changes_total{change="lifted"} 1.0' in metrics
    finally:
        log = stop_all(ks)
        endpoint.stop()
    assert "identity spiffe://demo.local/billing is revoked" in log
    no_canary(ks, log, redis, [i.value for i in endpoint.issued])


def test_revocation_purges_the_identitys_shared_tokens(tmp_path: Path, redis: RedisServer, upstream: Upstream) -> None:
    """token_exchange tokens are per identity: a revocation deletes them from Redis and from every
    replica's memory, so after the lift the identity gets a freshly exchanged token."""
    endpoint = TokenEndpoint(lifetime=3600, delay=0.0).start()
    ks = replicas(tmp_path, redis, upstream, {
        "type": "token_exchange", "token_url": endpoint.url, "client_id": CLIENT_ID,
        "client_secret_env": "KL_CLIENT_SECRET", "audience": "https://api.test", "subject": "minted"})
    url = upstream.url("/api/v1/x", tls=False)
    try:
        assert [one(k, url)[0] for k in ks] == [200, 200, 200]
        assert [one(k, url, source="127.0.0.2")[0] for k in ks] == [200, 200, 200]
        assert sorted(endpoint.subjects) == [BILLING, PAYMENTS]   # one exchange per identity, shared
        keys, _ = redis.dump()
        assert sum(k.startswith("keyless:tok:") for k in keys) == 2
        r = requests.post(ks[1].admin_url + "/revocations", json={"identity": BILLING, "ttl": 60},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
        assert r.status_code == 201
        time.sleep(0.5)
        keys, _ = redis.dump()
        assert sum(k.startswith("keyless:tok:") for k in keys) == 1   # the other identity's stays
        assert [one(k, url)[0] for k in ks] == [403, 403, 403]
        requests.post(ks[1].admin_url + "/revocations/lift", json={"identity": BILLING},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5).raise_for_status()
        time.sleep(0.5)
        assert [one(k, url)[0] for k in ks] == [200, 200, 200]
        listing = requests.get(ks[2].admin_url + "/revocations", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                               timeout=5).json()
    finally:
        log = stop_all(ks)
        endpoint.stop()
    # Dropped everywhere: the first request after the lift exchanged again, once for all three.
    assert sorted(endpoint.subjects) == [BILLING, BILLING, PAYMENTS]
    assert listing == {"revocations": []}
    assert "1 cached token(s) dropped" in log
    no_canary(ks, log, redis, [i.value for i in endpoint.issued])


def test_redis_stopped_mid_run(tmp_path: Path, redis: RedisServer, upstream: Upstream) -> None:
    # A 6 s token: refreshed at 4.5 s, so during the outage every replica must fetch once itself.
    endpoint = TokenEndpoint(lifetime=6, delay=0.1).start()
    unexpired_only(upstream, endpoint)
    ks = replicas(tmp_path, redis, upstream, oauth(endpoint))
    url = upstream.url("/api/v1/x", tls=False)
    codes: list[str] = []
    sensitive: list[int] = []
    try:
        assert burst(ks, url, per_replica=50) == ["200"] * 150
        assert endpoint.calls == 1
        first = endpoint.call_times[0]
        redis.stop()
        stopped_calls = endpoint.calls
        # Until just before the self-fetched tokens would need refreshing again.
        while time.time() < first + 8.5:
            codes += burst(ks, url, per_replica=10, parallel=10)
            sensitive.append(one(ks[0], url, source="127.0.0.2")[0])
        during = endpoint.calls - stopped_calls
        metrics = requests.get(ks[0].admin_url + "/metrics", timeout=5).text
        redis.start()
        time.sleep(1.0)
        after = [one(k, url, source="127.0.0.2")[0] for k in ks]
    finally:
        log = stop_all(ks)
        endpoint.stop()
    assert set(codes) == {"200"}, {c: codes.count(c) for c in set(codes)}
    assert 1 <= during <= 3, f"{during} token calls from 3 replicas during the outage"
    # No token past its expiry reached the upstream.
    expiry = {f"Bearer {i.value}": i.expires_at for i in endpoint.issued}
    assert all(r.headers["authorization"] in expiry for r in upstream.received)
    # The revocation-sensitive identity failed closed once the state went stale, and recovered.
    assert 503 in sensitive and after == [200, 200, 200]
    assert 'keyless_redis_state_changes_total{state="down"} 1.0' in metrics
    assert "keyless_redis_up 0.0" in metrics and "keyless_revocation_state_known 0.0" in metrics
    assert "redis is down" in log and "revocation state is unknown" in log and "redis is up" in log
    no_canary(ks, log, redis, [i.value for i in endpoint.issued])
