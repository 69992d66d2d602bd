"""The decision cache (only with cache_ttl, never across identities) and posture context."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from proxy.policy.cache import CachingEngine
from proxy.policy.embedded import EmbeddedEngine
from proxy.policy.options import PostureOptions
from proxy.policy.posture import Posture
from proxy.policy.reload import DirLoader, ReloadingEngine
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit
from tests.policy_helpers import BundleServer, wait_until, write_atomically
from tests.test_policy_opa import BILLING, doc

QUERY = "data.keyless.egress.decision"
CACHING_POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "nobody", "cache_ttl": 60}

decision := {"allow": true, "reason": sprintf("%s may %s %s", [input.identity.id, input.request.method,
	input.request.path]), "credential": "demo-api", "cache_ttl": 60} if {
	input.identity.id == "spiffe://t/a"
}

decision := {"allow": true, "reason": "c is never cached"} if input.identity.id == "spiffe://t/c"
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _engine(tmp: Path) -> EmbeddedEngine:
    d = tmp / "cachepol"
    d.mkdir(exist_ok=True)
    (d / "egress.rego").write_text(CACHING_POLICY)
    return EmbeddedEngine.from_dir(d, QUERY)


def test_cache_only_with_cache_ttl_and_keyed_by_everything(tmp_path: Path) -> None:
    clock = Clock()
    cache = CachingEngine(_engine(tmp_path), clock=clock)
    a, b, c = doc("spiffe://t/a"), doc("spiffe://t/b"), doc("spiffe://t/c")

    async def run() -> None:
        first = await cache.decide(a)
        again = await cache.decide(a)
        assert first.allow and not first.cached and again.cached and again.reason == first.reason
        # B asks the same thing right after A: B gets B's own decision, never A's.
        other = await cache.decide(b)
        assert not other.allow and not other.cached and other.reason == "nobody"
        # Every part of the key matters.
        variants = []
        for change in ({"method": "POST"}, {"path": "/v1/other"}, {"port": 8443}, {"host": "127.0.0.1"},
                       {"scheme": "http"}, {"query": {"page": ["3"]}}):
            v = copy.deepcopy(a)
            v["request"].update(change)
            variants.append(v)
        facts = copy.deepcopy(a)
        facts["identity"]["attestations"][0]["facts"] = {"cidr": "10.0.0.0/8"}
        variants.append(facts)
        source = copy.deepcopy(a)
        source["source"]["address"] = "127.0.0.2"
        variants.append(source)
        dialled = copy.deepcopy(a)
        dialled["destination"] = {"address": "10.1.2.3", "port": 443}
        variants.append(dialled)
        for v in variants:
            assert not (await cache.decide(v)).cached
        # No cache_ttl, no caching.
        assert not (await cache.decide(c)).cached and not (await cache.decide(c)).cached
        # Expiry.
        clock.now += 61
        assert not (await cache.decide(a)).cached

    asyncio.run(run())
    assert cache.hits == 1


def test_cache_never_serves_one_identity_anothers_decision(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    cache = CachingEngine(engine, max_entries=16)  # small: eviction is exercised too
    rng = random.Random(5)
    ids = ["spiffe://t/a", "spiffe://t/b", "spiffe://t/c", None]

    async def run() -> None:
        for _ in range(600):
            d = doc(rng.choice(ids), rng.choice(["GET", "POST"]), path=rng.choice(["/v1/x", "/v1/y", "/v2"]))
            got, want = await cache.decide(d), engine.decide_sync(d)
            assert (got.allow, got.reason, got.credential) == (want.allow, want.reason, want.credential)

    asyncio.run(run())
    assert cache.hits > 100


def test_a_new_revision_empties_the_cache(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    policies = tmp_path / "cachepol"
    reloading = ReloadingEngine(engine, DirLoader(policies, 0.1), run_tests=True)
    cache = CachingEngine(reloading)
    reloading.on_swap.append(cache.clear)

    async def run() -> None:
        reloading.loader.changed()  # type: ignore[union-attr]  # take the current fingerprint
        assert not (await cache.decide(doc("spiffe://t/a"))).cached
        assert (await cache.decide(doc("spiffe://t/a"))).cached
        write_atomically(policies / "egress.rego", CACHING_POLICY.replace("%s may", "%s now may"))
        assert await reloading.check_once()
        d = await cache.decide(doc("spiffe://t/a"))
        assert not d.cached and " now may " in d.reason

    asyncio.run(run())


def test_posture_staleness_is_visible(tmp_path: Path) -> None:
    f = tmp_path / "posture.json"
    f.write_text(json.dumps({"generated_at": "2026-11-22T10:00:00Z", "workloads": {BILLING: {"status": "pass"}}}))
    clock = Clock()
    posture = Posture(PostureOptions(file=f, max_age=300), clock=clock)
    assert posture.lookup(BILLING)["stale"] is True  # nothing loaded yet
    posture.refresh()
    generated = datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp()
    clock.now = generated + 10
    fresh = posture.lookup(BILLING)
    assert fresh == {"workload": {"status": "pass"}, "stale": False, "age_seconds": 10.0}
    assert posture.lookup("spiffe://unknown")["workload"] is None
    clock.now = generated + 301
    assert posture.lookup(BILLING)["stale"] is True
    write_atomically(f, "{not json")
    posture.refresh()  # a broken export keeps the old data (which ages into staleness)
    assert posture.failures == 1 and posture.lookup(BILLING)["workload"] == {"status": "pass"}


def test_posture_polled_from_an_http_endpoint() -> None:
    server = BundleServer()  # any real HTTP server on loopback will do; this one serves one body
    server.publish(json.dumps({"workloads": {BILLING: {"status": "fail"}}}).encode())
    posture = Posture(PostureOptions(url=server.url, max_age=60))
    posture.refresh()
    assert posture.lookup(BILLING)["workload"] == {"status": "fail"}
    assert posture.lookup(BILLING)["stale"] is False


def _get(k: Keyless, url: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", url], env=k.client_env(),
                         capture_output=True, text=True, timeout=30)
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body)


def test_failing_posture_is_refused_end_to_end(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "key").write_text("canary-posture-key-9\n")
    f = tmp_path / "posture.json"
    f.write_text(json.dumps({"workloads": {BILLING: {"status": "fail", "critical_vulns": 3}}}))
    cfg = base_config(tmp_path, upstream,
                      credentials={"demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")},
                                   "workload-jwt": {"type": "jwt"}},
                      policy={"dir": str(REPO / "policies"),
                              "posture": {"file": str(f), "poll_interval": 0.1, "max_age": 600}})
    k = Keyless(tmp_path, cfg).start()
    try:
        status, body = _get(k, upstream.url("/v1/invoices"))
        assert status == 403 and body["error"] == "forbidden" and "posture" in body["message"]
        write_atomically(f, json.dumps({"workloads": {BILLING: {"status": "pass", "critical_vulns": 0}}}))
        wait_until(lambda: _get(k, upstream.url("/v1/invoices"))[0] == 200, what="posture passing")
    finally:
        k.stop()
    records = wait_for_audit(k, 2)
    assert records[0]["decision"]["reason"] == "workload posture is failing"
    assert records[-1]["outcome"]["status"] == 200


def test_a_new_opa_revision_empties_the_cache(tmp_path: Path) -> None:
    from proxy.policy.opa import OpaEngine
    from proxy.policy.options import OpaOptions
    from tests.policy_helpers import OpaProcess

    for rev in ("r1", "r2"):
        d = tmp_path / rev
        d.mkdir()
        (d / "egress.rego").write_text(CACHING_POLICY.replace("%s may", f"{rev}: %s may"))
        (d / ".manifest").write_text(json.dumps({"revision": rev}))
    opa = OpaProcess(tmp_path / "r1").start()
    second = OpaProcess(tmp_path / "r2", opa.port)

    async def run() -> None:
        engine = OpaEngine(OpaOptions(url=opa.url, timeout_ms=2000), QUERY)
        cache = CachingEngine(engine)
        try:
            first = await cache.decide(doc("spiffe://t/a"))
            assert first.revision == "r1" and (await cache.decide(doc("spiffe://t/a"))).cached
            opa.stop()
            second.start()
            # Keyless learns OPA's new revision from its next answer (any miss) and empties the cache.
            assert (await cache.decide(doc("spiffe://t/b"))).revision == "r2"
            again = await cache.decide(doc("spiffe://t/a"))
            assert not again.cached and again.reason.startswith("r2: ")
        finally:
            await engine.aclose()

    try:
        asyncio.run(run())
    finally:
        opa.stop()
        second.stop()


def test_cache_end_to_end_never_serves_a_to_b(tmp_path: Path, upstream: Upstream) -> None:
    policies = tmp_path / "cachepol"
    policies.mkdir()
    (policies / "egress.rego").write_text(CACHING_POLICY)
    (tmp_path / "key").write_text("canary-cache-key-5\n")
    cfg = base_config(tmp_path, upstream, policy={"dir": str(policies)},
                      trust=[{"name": "loopback", "type": "source_ip", "workloads": [
                          {"cidr": "127.0.0.1/32", "id": "spiffe://t/a"},
                          {"cidr": "127.0.0.2/32", "id": "spiffe://t/b"}]}],
                      credentials={"demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")}})
    k = Keyless(tmp_path, cfg).start()

    def call(source: str) -> int:
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--interface", source,
                              upstream.url("/v1/invoices")], env=k.client_env(), capture_output=True, text=True,
                             timeout=30)
        return int(out.stdout)

    try:
        assert [call("127.0.0.1"), call("127.0.0.1"), call("127.0.0.2"), call("127.0.0.1"), call("127.0.0.2")] == [
            200, 200, 403, 200, 403]
        cache = requests.get(k.admin_url + "/readyz", timeout=5).json()["policy"]["cache"]
    finally:
        k.stop()
    records = wait_for_audit(k, 5)
    assert [(r["identity"]["id"], r["decision"]["allow"], r["decision"]["cached"]) for r in records] == [
        ("spiffe://t/a", True, False), ("spiffe://t/a", True, True), ("spiffe://t/b", False, False),
        ("spiffe://t/a", True, True), ("spiffe://t/b", False, True)]
    assert cache["hits"] == 3


class _Answers:
    """An engine whose answers (and revisions) the test scripts: it stands in for OPA's replies."""

    query = QUERY

    def __init__(self) -> None:
        self.revision = "v1"
        self.gates: list[asyncio.Event] = []
        self.next: list[Any] = []

    async def decide(self, input_doc: dict[str, Any]) -> Any:
        from dataclasses import replace

        from proxy.model import Decision

        revision, gate = self.next.pop(0)
        if gate is not None:
            await gate.wait()
        return replace(Decision(allow=True, reason=revision, cache_ttl=60), revision=revision)


def test_cache_never_rolls_back_to_a_revision_replaced_mid_flight() -> None:
    inner = _Answers()
    cache = CachingEngine(inner)  # type: ignore[arg-type]
    a, b = doc("spiffe://t/a"), doc("spiffe://t/b")

    async def main() -> None:
        gate = asyncio.Event()
        inner.next = [("v1", gate), ("v2", None)]
        slow = asyncio.create_task(cache.decide(a))    # asked under v1, answered late
        await asyncio.sleep(0)
        assert (await cache.decide(b)).reason == "v2"  # v2 seen: the cache moves on
        gate.set()
        assert (await slow).reason == "v1"             # the late answer still serves its request
        inner.next = [("v2", None)]
        again = await cache.decide(a)                  # ... but was not cached, nor rolled back
        assert again.reason == "v2" and not again.cached

    asyncio.run(main())


def test_no_caching_without_a_revision_and_posture_age_not_in_the_key() -> None:
    inner = _Answers()
    inner.revision = "unknown"
    cache = CachingEngine(inner)  # type: ignore[arg-type]
    inner.next = [("unknown", None), ("unknown", None)]
    asyncio.run(cache.decide(doc("spiffe://t/a")))
    assert not asyncio.run(cache.decide(doc("spiffe://t/a"))).cached

    inner2 = _Answers()
    cache2 = CachingEngine(inner2)  # type: ignore[arg-type]
    inner2.next = [("v1", None)]
    first, second = doc("spiffe://t/a"), doc("spiffe://t/a")
    first["context"]["posture"] = {"status": "pass", "stale": False, "age_seconds": 1.0}
    second["context"]["posture"] = {"status": "pass", "stale": False, "age_seconds": 1.7}
    asyncio.run(cache2.decide(first))
    assert asyncio.run(cache2.decide(second)).cached
