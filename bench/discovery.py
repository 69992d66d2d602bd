"""What static-secret discovery (proxy/governance/discover.py) costs a request, detector on and off.

``Discovery.inspect`` on real mitmproxy Request objects of a few shapes, in microseconds (median
of batches), against the same request with discovery disabled (0: the pipeline skips the call).
The shapes: a plain API call (4 headers, one query parameter), a busy one (the end-to-end test's:
tracing ids, a git SHA, an Authorization header, six query parameters), and the busy one with a
2 KiB JSON body that discovery buffers and walks. For the whole request path with discovery on
and off, run ``bench/hotpath.py`` and ``bench/hotpath.py --no-discovery`` ("strip + inject" row).

    .venv/bin/python bench/discovery.py [--n 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHA = "9fceb02d0ae598e95dc970b74767f19372d61af8"
UUID = "3f2b8c1e-9a4d-4e7b-b1c2-0d9e8f7a6b5c"
TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


def shapes() -> dict[str, tuple[str, str, dict[str, str], bytes]]:
    plain = {"Host": "api.example.com", "User-Agent": "python-requests/2.32.3", "Accept": "*/*",
             "Accept-Encoding": "gzip, deflate"}
    busy = {**plain, "Authorization": f"token {TOKEN}", "X-Request-Id": UUID, "X-Commit": SHA,
            "If-None-Match": f'W/"{SHA}"', "X-Tenant-Id": "4711"}
    query = f"?sha={SHA}&id=12345&request_id={UUID}&page=2&user_id=987654321&trace={UUID}"
    body = json.dumps({"order_id": "ord-123456", "customer": UUID, "commit": SHA,
                       "items": [{"sku": f"A-{i}", "qty": i, "note": "deliver after 5pm"} for i in range(36)]})
    return {
        "plain GET": ("GET", "/v1/items?page=2", plain, b""),
        "busy GET": ("GET", "/v1/repos/acme/app/commits" + query, busy, b""),
        f"busy POST + {len(body)} B JSON": ("POST", "/v1/orders" + query, {**busy, "Content-Type": "application/json"},
                                            body.encode()),
    }


# Token-format detectors only (no assignment-shaped patterns such as Cloudant's or IBM's, which
# are most of the cost): a `discovery.detectors` list for hot paths.
TOKEN_FORMATS = ("AWSKeyDetector", "GitHubTokenDetector", "GitLabTokenDetector", "SlackDetector", "StripeDetector",
                 "OpenAIDetector", "JwtTokenDetector", "PrivateKeyDetector", "SendGridDetector", "TwilioKeyDetector",
                 "PypiTokenDetector", "NpmDetector")


def measure(n: int, batches: int, detectors: tuple[str, ...] = ()) -> dict[str, Any]:
    from mitmproxy import http

    from proxy.config import StripConfig
    from proxy.governance.discover import Discovery
    from proxy.governance.options import DiscoveryConfig

    d = Discovery(DiscoveryConfig(detectors=detectors), StripConfig())
    out: dict[str, Any] = {}
    for name, (method, path, headers, body) in shapes().items():
        req = http.Request.make(method, "https://api.example.com" + path, body, headers)
        inspect_body = bool(body) and d.wants_body(list(req.headers.items()))
        for _ in range(200):
            d.inspect(req, body=inspect_body)
        per: list[float] = []
        for _ in range(batches):
            t = time.perf_counter()
            for _ in range(n // batches):
                d.inspect(req, body=inspect_body)
            per.append((time.perf_counter() - t) / (n // batches) * 1e6)
        # min as well as the median: on a shared machine the fastest batch is the least disturbed.
        out[name] = {"on_us": round(statistics.median(per), 1), "min_us": round(min(per), 1), "off_us": 0.0,
                     "detectors": len(d._plugins),
                     "findings": len(d.inspect(req, body=inspect_body)), "body_inspected": inspect_body}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = {"default detectors": measure(args.n, args.batches),
               "token formats only": measure(args.n, args.batches, TOKEN_FORMATS)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| request | detectors | discovery on us (median) | min | off us | findings |\n|---|---|---:|---:|---:|---:|")
    for label, rows in results.items():
        for name, r in rows.items():
            print(f"| {name}{' (body inspected)' if r['body_inspected'] else ''} | {label} ({r['detectors']}) | "
                  f"{r['on_us']} | {r['min_us']} | {r['off_us']} | {r['findings']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
