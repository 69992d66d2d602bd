"""What ``policy.shadow`` costs per request: bench/hotpath.py's decide step with and without a
shadow candidate (the same policy as the enforcing one, so the candidate does equal work), with
the decision cache and without it. Interleaved rounds, medians; about 30 s on 2 cores.

    .venv/bin/python bench/shadow.py [--n 2000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hotpath import measure  # noqa: E402 - bench/ is on the path only now

STEP = "destination .. decide (attest, authority, input, Rego)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    got: dict[tuple[bool, bool], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for cache in (True, False):
            for shadow in (False, True):
                r = asyncio.run(measure(args.n, 5, jwt=False, cache=cache, shadow=shadow))
                got.setdefault((cache, shadow), []).append((r[STEP], r["total"]))
    rows = {}
    for cache in (True, False):
        base = statistics.median(d for d, _ in got[(cache, False)])
        with_shadow = statistics.median(d for d, _ in got[(cache, True)])
        total = statistics.median(t for _, t in got[(cache, False)])
        rows["cached" if cache else "uncached"] = {
            "decide_us": round(base, 1), "decide_with_shadow_us": round(with_shadow, 1),
            "shadow_cost_us": round(with_shadow - base, 1), "hot_path_total_us": round(total, 1)}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| decision | decide step us | with shadow us | shadow cost us | whole hot path us |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['decide_us']} | {r['decide_with_shadow_us']} | {r['shadow_cost_us']} | "
              f"{r['hot_path_total_us']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
