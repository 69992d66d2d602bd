"""Per-step cost of Keyless's own work on one request, without the network: microseconds each.

Runs the same calls ``proxy.addon`` makes for a request (describe, attest, authority check,
policy input, decide, strip + inject, audit) on real mitmproxy Request objects, with the real
embedded engine, the default policy and a file audit sink, many times over, and reports the
median of several batches per step. By default the decision is cached: the policy is the default
one wrapped to add ``cache_ttl`` (as bench/run.py's cached rows); ``--no-cache`` wraps it to remove
``cache_ttl``, so Rego is evaluated on every request.
This is where the profile's per-request costs come from in docs/benchmarks.md; the end-to-end
harness (bench/run.py) shows what they add up to.

    .venv/bin/python bench/hotpath.py [--n 3000] [--json]
    .venv/bin/python bench/hotpath.py --hooks    # the addon's four hooks, one whole request
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def build(tmp: Path, cache: bool, shadow: bool = False, discovery: bool = True) -> Any:
    from run import CACHED_DECISION, UNCACHED_DECISION, cached_policy_dir  # bench/run.py

    from proxy.audit import JsonLinesSink
    from proxy.config import parse_config
    from proxy.pipeline import Pipeline
    from proxy.server import prepare

    (tmp / "key").write_text("hotpath-static-secret\n")
    policy = {"dir": str(cached_policy_dir(tmp / "policy")),
              "decision": CACHED_DECISION if cache else UNCACHED_DECISION}
    raw = {
        "listen": {"port": 1}, "tls": {"ca_dir": str(tmp / "ca")}, "policy": policy,
        "trust": [{"name": "loopback", "type": "source_ip",
                   "workloads": [{"cidr": "127.0.0.0/8", "id": "spiffe://demo.local/billing"}]}],
        "credentials": {"demo-api": {"type": "static", "from": "file", "file": str(tmp / "key")},
                        "workload-jwt": {"type": "jwt"}},
        "audit": {"path": str(tmp / "audit.log")},
        # Static-secret discovery runs inside forward ("strip + inject"): --no-discovery for its cost.
        "discovery": {"enabled": discovery},
    }
    cfg = parse_config(raw, tmp / "keyless.yaml")
    prep = prepare(cfg)
    pipeline = Pipeline(cfg, prep.engine, prep.signer, JsonLinesSink(cfg.audit.path), prep.trust, prep.credentials)
    if shadow:
        # policy.shadow naming the same policy: the candidate costs what the enforcing one does.
        from proxy.governance.shadow import build_shadow

        pipeline.shadow = build_shadow(Path(policy["dir"]), "embedded", policy["decision"], cfg.policy.extras)
    return pipeline


async def measure(n: int, batches: int, jwt: bool, cache: bool = True, shadow: bool = False,
                  discovery: bool = True) -> dict[str, float]:
    from mitmproxy import http

    from proxy.addon import view
    from proxy.pipeline import Connection

    tmp = Path(tempfile.mkdtemp(prefix="keyless-hotpath-"))
    pipeline = build(tmp, cache, shadow, discovery)
    method, path = ("POST", "/v1/reports/x") if jwt else ("GET", "/v1/bench?page=2")
    headers = {"Host": "127.0.0.1:9000", "User-Agent": "keyless-bench", "Accept": "*/*",
               "Authorization": "Bearer app-own"}
    conn = Connection("c1", ("127.0.0.1", 50000), ("127.0.0.1", 8080), tls=False, sni=None)
    times: dict[str, list[float]] = {}

    def clock(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        times.setdefault(name, []).append(t1 - t0)
        return t1

    def no_upgrade(host: str, port: int) -> None:
        raise AssertionError("no tls_origination in this config")

    from proxy.limits import WireLimits, inspect_http1_head
    from proxy.wirepatch import wire_refusal

    limits = WireLimits()
    head = (f"{method} http://127.0.0.1:9000{path} HTTP/1.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()

    async def one() -> None:
        req = http.Request.make(method, "http://127.0.0.1:9000" + path, b"{}" if jwt else b"", headers)
        t = time.perf_counter()
        # proxy/wirepatch.py: the HTTP/1 head inspection and the HTTP/2 field check; a request
        # pays one of the two, so this is an upper bound.
        inspect_http1_head(head, limits)
        wire_refusal(req, limits)
        t = clock("wire limits (head + fields)", t)
        ex = pipeline.begin(conn.peer)
        v = view(req)
        t = clock("exchange + request view", t)
        await pipeline.decide(ex, conn, v)
        t = clock("destination .. decide (attest, authority, input, Rego)", t)
        await pipeline.forward(ex, conn, req, no_upgrade)
        t = clock("strip + inject", t)
        pipeline.finish(ex, 200)
        clock("audit (JSON line to file)", t)

    for _ in range(200):
        await one()
    times.clear()
    per_batch: dict[str, list[float]] = {}
    for _ in range(batches):
        times.clear()
        for _ in range(n // batches):
            await one()
        for k, v in times.items():
            per_batch.setdefault(k, []).append(statistics.mean(v) * 1e6)
    out = {k: round(statistics.median(v), 1) for k, v in per_batch.items()}
    out["total"] = round(sum(out.values()), 1)
    return out


def measure_hooks(n: int, rounds: int, discovery: bool = True) -> float:
    """The addon's four hooks for one cached GET (requestheaders, request, responseheaders,
    response: decision, strip, inject, response scan, audit record), in CPU microseconds per
    request: the fastest of ``rounds`` batches of ``n``, flows built before the clock starts."""
    import gc

    from mitmproxy import http
    from mitmproxy.test import tflow

    from proxy.addon import KeylessAddon

    addon = KeylessAddon(build(Path(tempfile.mkdtemp(prefix="keyless-hooks-")), True, False, discovery))
    client, server = tflow.tflow().client_conn, tflow.tflow().server_conn
    client.timestamp_tls_setup, client.sni, client.peername = None, None, ("127.0.0.1", 50000)
    server.peername = ("127.0.0.1", 9000)
    answer = http.Response.make(200, b'{"ok":true}', {"content-type": "application/json", "content-length": "11"})

    def flow() -> http.HTTPFlow:
        f = tflow.tflow()
        f.client_conn, f.server_conn = client, server
        f.request = http.Request.make("GET", "http://127.0.0.1:9000/v1/bench", b"",
                                      {"Host": "127.0.0.1:9000", "User-Agent": "keyless-bench", "Accept": "*/*"})
        return f

    async def batch(count: int) -> float:
        flows = [(flow(), answer.copy()) for _ in range(count)]
        gc.collect()
        gc.disable()
        t = time.process_time()
        for f, r in flows:
            await addon.requestheaders(f)
            await addon.request(f)
            f.response = r
            await addon.responseheaders(f)
            await addon.response(f)
        spent = time.process_time() - t
        gc.enable()
        if flows[-1][0].response is None or flows[-1][0].response.status_code != 200:
            raise SystemExit("the benchmark request was refused: fix the bench config")
        return spent / count * 1e6

    asyncio.run(batch(200))
    return round(min(asyncio.run(batch(n)) for _ in range(rounds)), 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-cache", action="store_true",
                   help="the default policy without cache_ttl: Rego runs every time")
    p.add_argument("--no-discovery", action="store_true", help="discovery.enabled: false (bench/discovery.py)")
    p.add_argument("--shadow", action="store_true", help="policy.shadow naming the same policy (bench/shadow.py)")
    p.add_argument("--hooks", action="store_true",
                   help="instead: the addon's hooks for a whole cached request, in process (CPU us, best batch)")
    args = p.parse_args()
    if args.hooks:
        us = measure_hooks(max(1, args.n // args.batches), 3 * args.batches, not args.no_discovery)
        print(json.dumps({"hooks_us": us}) if args.json else f"addon hooks per cached request: {us} us (CPU)")
        return 0
    results = {name: asyncio.run(measure(args.n, args.batches, jwt, not args.no_cache, args.shadow,
                                         not args.no_discovery))
               for name, jwt in
               (("static", False), ("jwt", True))}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    steps: list[str] = list(results["static"])
    print("| step | static us | jwt us |\n|---|---:|---:|")
    for s in steps:
        print(f"| {s} | {results['static'][s]} | {results['jwt'].get(s, '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
