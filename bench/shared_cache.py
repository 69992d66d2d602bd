"""The shared credential cache (cache.redis): what a shared-cache hit costs against a local hit,
and three replicas sharing one token under load.

    PYTHONPATH=$PWD .venv/bin/python bench/shared_cache.py [--duration 6] [--json out.json]

Part 1, in one process, no proxy: a real ``redis-server`` on loopback and a ``TokenCache`` with
its ``SharedTokens``. A *local hit* is ``TokenCache.get`` answered from the dict (what every
request costs in steady state); a *shared hit* is what a replica pays on a local miss when
another replica already fetched the token: one Redis GET, AES-GCM open, JSON parse, and then
the local dict (``SharedTokens.obtain``). Medians of batches.

Part 2: three ``keyless run`` replicas (tests/harness.py), each its own ports, one oauth2
credential, plain-HTTP upstream; ``bench/loadgen.py`` drives all three at once for
``--duration`` seconds, first with ``cache.redis`` (the three share one token) and then without
(each fetches its own). Reported: total requests/s, each replica's p50/p99, token-endpoint calls.
Needs ``redis-server`` (Debian's package). Takes about 40 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.credentials.cache import CachePolicy, Token, TokenCache  # noqa: E402
from proxy.shared.config import CacheConfig, RedisOptions, SecretSource  # noqa: E402
from proxy.shared.store import SharedStore  # noqa: E402
from proxy.shared.tokens import SharedTokens  # noqa: E402
from tests.harness import Keyless, Upstream, base_config  # noqa: E402
from tests.peers import write_policy  # noqa: E402
from tests.shared_peers import CLIENT_ID, CLIENT_SECRET, RedisServer, TokenEndpoint  # noqa: E402

KEY = "bench-encryption-key-0123456789abcdef0123456789"


def per_op(fn: Any, n: int, rounds: int = 7) -> float:
    """Median seconds per call of the coroutine function ``fn`` over ``rounds`` batches of ``n``."""
    async def batch() -> float:
        started = time.perf_counter()
        for _ in range(n):
            await fn()
        return (time.perf_counter() - started) / n

    async def main() -> list[float]:
        return [await batch() for _ in range(rounds)]

    return statistics.median(asyncio.run(main()))


def hit_costs(redis: RedisServer) -> dict[str, float]:
    os.environ["KL_BENCH_KEY"], os.environ["KL_BENCH_PW"] = KEY, redis.password
    store = SharedStore(CacheConfig(RedisOptions(redis.url, password=SecretSource(env="KL_BENCH_PW"),
                                                 encryption_key=SecretSource(env="KL_BENCH_KEY"))))
    key = ("spiffe://bench/a", "read")

    async def fetch(_: tuple[str, str]) -> Token:
        now = time.time()
        return Token("bench-token-" + "x" * 40, now + 3600, obtained_at=now)

    shared: SharedTokens[tuple[str, str]] = SharedTokens(store, "oauth2(bench)\0opts")
    cache = TokenCache("oauth2(bench)", fetch, CachePolicy(), shared=shared)

    async def warm() -> None:
        await cache.get(key)  # fetched once, stored in Redis and locally

    asyncio.run(warm())

    async def local() -> None:
        await cache.get(key)

    async def shared_hit() -> None:
        token = await shared.obtain(key, lambda: fetch(key), cache.fresh)
        cache._store(key, token)

    slot = shared.slot(key)

    async def bare_get() -> None:
        await store.client().get(slot)

    local_s = per_op(local, 20000)
    # A fresh client per measurement loop: asyncio.run gives each batch set its own loop.
    store._client = None
    shared_s = per_op(shared_hit, 2000)
    store._client = None
    get_s = per_op(bare_get, 2000)
    return {"local_hit_us": round(local_s * 1e6, 3), "shared_hit_us": round(shared_s * 1e6, 1),
            "redis_get_us": round(get_s * 1e6, 1), "ratio": round(shared_s / local_s, 1),
            "shared_hits": store.counts["cache", "hit"]}


def loadgen(k: Keyless, upstream: Upstream, duration: float, connections: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "loadgen.py"), "--proxy", f"127.0.0.1:{k.config['listen']['port']}",
         "--target-host", "localhost", "--target-port", str(upstream.http_port), "--path", "/api/v1/x",
         "--connections", str(connections), "--duration", str(duration)],
        stdout=subprocess.PIPE, text=True)


def replicas_row(tmp: Path, redis: RedisServer | None, duration: float, connections: int) -> dict[str, Any]:
    endpoint = TokenEndpoint(lifetime=3600, delay=0.05).start()
    upstream = Upstream(tmp / "upstream").start()
    policy = write_policy(tmp)
    cred = {"type": "oauth2", "token_url": endpoint.url, "client_id": CLIENT_ID,
            "client_secret_env": "KL_CLIENT_SECRET"}
    env = {"KL_CLIENT_SECRET": CLIENT_SECRET, "KL_CACHE_KEY": KEY}
    extra: dict[str, Any] = {}
    if redis is not None:
        env["KL_REDIS_PW"] = redis.password
        extra["cache"] = {"redis": {"url": redis.url, "password_env": "KL_REDIS_PW",
                                    "encryption_key_env": "KL_CACHE_KEY"}}
    ks = []
    for i in range(3):
        d = tmp / f"replica{i}"
        d.mkdir()
        cfg = base_config(d, upstream, policy={"dir": str(policy)}, credentials={"api": cred}, **extra)
        ks.append(Keyless(d, cfg, env=env).start(log_level="warning"))
    try:
        results = [json.loads(p.communicate(timeout=duration + 60)[0])
                   for p in [loadgen(k, upstream, duration, connections) for k in ks]]
    finally:
        for k in ks:
            k.stop()
        upstream.stop()
        endpoint.stop()
    return {"shared": redis is not None, "rps": round(sum(r["rps"] for r in results)),
            "errors": sum(r["errors"] for r in results),
            "p50_ms": [r["p50_ms"] for r in results], "p99_ms": [r["p99_ms"] for r in results],
            "token_calls": endpoint.calls}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--connections", type=int, default=4, help="per replica")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="keyless-bench-shared-") as t:
        tmp = Path(t)
        redis = RedisServer(tmp / "redis").start()
        try:
            out: dict[str, Any] = {"hits": hit_costs(redis)}
            print(json.dumps(out["hits"]), flush=True)
            redis.flush()
            (tmp / "a").mkdir()
            out["three_replicas_shared"] = replicas_row(tmp / "a", redis, args.duration, args.connections)
            print(json.dumps(out["three_replicas_shared"]), flush=True)
            (tmp / "b").mkdir()
            out["three_replicas_local"] = replicas_row(tmp / "b", None, args.duration, args.connections)
            print(json.dumps(out["three_replicas_local"]), flush=True)
        finally:
            redis.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
