"""Decision latency per engine and the decision-cache hit cost (figures in docs/policy.md).

    .venv/bin/python scripts/policy_latency.py [-n 10000]

Measures, per decision: each embedded engine of the registry (regorus's RVM, the default, and
its interpreter; in process); the OPA engine over HTTP with a pooled keep-alive connection
against tests/opa_standin.py (a stand-in for OPA that evaluates with regopy, since no opa binary
exists here: the figure is Keyless's client side plus one local HTTP round trip plus the
stand-in's evaluation); a cache hit (key + lookup); and a distinct invoice id per request, which
the default policy's cache.vary turns into hits.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.policy.cache import CachingEngine  # noqa: E402
from proxy.policy.embedded import EmbeddedEngine  # noqa: E402
from proxy.policy.engines import DEFAULT_EMBEDDED, ENGINES  # noqa: E402
from proxy.policy.input import path_template  # noqa: E402
from proxy.policy.opa import OpaEngine  # noqa: E402
from proxy.policy.options import OpaOptions  # noqa: E402
from tests.policy_helpers import OpaProcess  # noqa: E402
from tests.test_policy_opa import TABLE  # noqa: E402

QUERY = "data.keyless.egress.decision"


def summary(name: str, ns: list[int]) -> str:
    us = sorted(n / 1000 for n in ns)
    p99 = us[int(len(us) * 0.99) - 1]
    return f"{name:<34} n={len(us):>6}  median {statistics.median(us):8.1f} us  p99 {p99:8.1f} us"


async def timed(engine: Any, n: int) -> list[int]:
    out = []
    for i in range(n):
        doc = TABLE[i % len(TABLE)]
        t = time.perf_counter_ns()
        await engine.decide(doc)
        out.append(time.perf_counter_ns() - t)
    return out


async def main(n: int) -> None:
    for name, spec in ENGINES.items():
        if spec.compile is None:
            continue
        embedded = EmbeddedEngine.from_dir(REPO / "policies", QUERY, name)
        await timed(embedded, 500)
        default = " (default)" if name == DEFAULT_EMBEDDED else ""
        print(summary(f"embedded {name}{default}", await timed(embedded, n)))

    opa_proc = OpaProcess(REPO / "policies").start()
    try:
        opa = OpaEngine(OpaOptions(url=opa_proc.url, timeout_ms=2000), QUERY)
        await timed(opa, 500)
        print(summary("opa REST (stand-in, keep-alive)", await timed(opa, n)))
        print(f"{'':<34} connections used: {opa_proc.stats()['connections']}")
        await opa.aclose()
    finally:
        opa_proc.stop()

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "egress.rego").write_text((REPO / "policies/egress.rego").read_text())
        # The default policy with an hour's ttl on its allowed decisions.
        (d / "bench.rego").write_text(
            "package keyless.bench\n\nimport rego.v1\n\nimport data.keyless.egress\n\n"
            'decision := object.union(egress.decision, {"cache": {"ttl": 3600}}) if egress.decision.allow\n'
            "else := egress.decision\n")
        cached_engine = EmbeddedEngine.from_dir(d, "data.keyless.bench.decision")
        cache = CachingEngine(cached_engine)
        await timed(cache, 500)
        hits_before = cache.hits
        ns = await timed(cache, n)
        print(summary("embedded + cache (hits and misses)", ns))
        hit_ns = []
        for i in range(n):
            doc = TABLE[i % 3]  # allowed decisions carry cache_ttl: all hits
            t = time.perf_counter_ns()
            await cache.decide(doc)
            hit_ns.append(time.perf_counter_ns() - t)
        print(summary("cache hit only", hit_ns))
        print(f"{'':<34} hits {cache.hits - hits_before}, misses {cache.misses}")

    # A distinct invoice id per request: the strict key would miss every time; the default
    # policy's allow varies on request.path_template, so all but the first are hits.
    varied = CachingEngine(EmbeddedEngine.from_dir(REPO / "policies", QUERY))
    base = TABLE[0]
    docs = []
    for i in range(n):
        path = f"/v1/invoices/{i}"
        docs.append({**base, "request": {**base["request"], "path": path, "path_template": path_template(path)}})
    ns = []
    for d in docs:
        t = time.perf_counter_ns()
        await varied.decide(d)
        ns.append(time.perf_counter_ns() - t)
    print(summary("distinct ids, default policy (vary)", ns))
    print(f"{'':<34} hits {varied.hits}, misses {varied.misses}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=10000)
    asyncio.run(main(p.parse_args().n))
