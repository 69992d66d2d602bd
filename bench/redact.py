"""What scanning responses for a reflected credential costs per request: microseconds each.

Runs Keyless's two response hooks (``KeylessAddon.responseheaders`` + ``response``, i.e. header
redaction, the body plan and the body scan) on real mitmproxy flows carrying a ~4 KiB JSON body
with a typical set of response headers, for a static Bearer credential, and compares them with
the same hooks on a flow with no credential (nothing to scan). CPU time of this process, best
of several batches: on a shared machine wall-clock medians swing several-fold. Cases: no reflection (the common
case), the credential echoed in a header and the body (httpbin /anything), the echo gzip-encoded;
plus the streaming redactor's throughput on a 4 MiB text body in 16 KiB chunks.

    .venv/bin/python bench/redact.py [--n 5000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOKEN = "bench-static-secret-0123456789abcdef"  # noqa: S105 - a benchmark canary


def body(echo: bool) -> bytes:
    headers = {"Accept": "*/*", "User-Agent": "bench/1.0", "X-Request-Id": "0" * 32}
    if echo:
        headers["Authorization"] = f"Bearer {TOKEN}"
    doc = {"headers": headers, "items": [{"id": i, "name": f"item-{i}", "tags": ["a", "b"]} for i in range(60)]}
    out = json.dumps(doc, indent=1).encode()
    return out + b" " * max(0, 4096 - len(out))


def make_addon(tmp: Path) -> Any:
    """The real addon over a real Pipeline (default policy, no network), with a sink that drops
    records: the benchmark measures the response hooks, not the disk."""
    from proxy.addon import KeylessAddon
    from proxy.config import parse_config
    from proxy.pipeline import Pipeline
    from proxy.server import prepare

    class NullSink:
        def emit(self, event: Any) -> None:
            pass

    raw = {"listen": {"port": 1}, "tls": {"ca_dir": str(tmp / "ca")}, "policy": {"dir": str(REPO / "policies")},
           "credentials": {}, "audit": {"path": str(tmp / "audit.log")}}
    cfg = parse_config(raw, tmp / "keyless.yaml")
    prep = prepare(cfg)
    return KeylessAddon(Pipeline(cfg, prep.engine, prep.signer, NullSink(), prep.trust, prep.credentials))


def flow(addon: Any, raw: bytes, *, credential: bool, echo_header: bool, encoding: str | None) -> Any:
    from mitmproxy.test import tflow

    from proxy.addon import _STATE
    from proxy.model import Grant
    from proxy.redact import header_forms

    f = tflow.tflow(resp=True)
    ex = addon.pipeline.begin(("127.0.0.1", 1))
    if credential:
        ex.grant = Grant("api", "static", None, "fp", header_forms(f"Bearer {TOKEN}", TOKEN))
    f.metadata[_STATE] = ex
    h = f.response.headers
    for name, value in (("Content-Type", "application/json"), ("Date", "Tue, 01 Dec 2026 08:00:00 GMT"),
                        ("Server", "bench"), ("Cache-Control", "no-store"), ("X-Request-Id", "0" * 32),
                        ("Strict-Transport-Security", "max-age=63072000"), ("Vary", "Accept-Encoding")):
        h[name] = value
    if echo_header:
        h["X-Echo-Authorization"] = f"Bearer {TOKEN}"
    data = gzip.compress(raw) if encoding == "gzip" else raw
    if encoding:
        h["Content-Encoding"] = encoding
    f.response.raw_content = data
    h["Content-Length"] = str(len(data))
    return f


def hooks_us(addon: Any, n: int, batches: int, **kw: Any) -> float:
    raw = body(kw.pop("echo_body"))
    results = []

    async def run(flows: list[Any]) -> float:
        started = time.process_time()
        for f in flows:
            await addon.responseheaders(f)
            await addon.response(f)
        return time.process_time() - started

    for _ in range(batches):
        flows = [flow(addon, raw, **kw) for _ in range(n)]
        results.append(asyncio.run(run(flows)) / n * 1e6)
    return min(results)


def stream_mib_s(batches: int) -> float:
    from proxy.redact import Redactor, header_forms
    from proxy.reflect import BodyStream, decoder_for

    text = (b"an ordinary line of streamed log output\n" * 110_000)[: 4 * 1024 * 1024]
    chunks = [text[i:i + 16384] for i in range(0, len(text), 16384)]
    results = []
    for _ in range(batches):
        stream = BodyStream(Redactor.for_forms(header_forms(f"Bearer {TOKEN}", TOKEN)), decoder_for(None), None)
        started = time.process_time()
        for c in chunks:
            for _piece in stream(c):
                pass
        list(stream(b""))
        results.append(len(text) / (1024 * 1024) / (time.process_time() - started))
    return max(results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        addon = make_addon(Path(d))
        cases = {
            "no credential (nothing to scan)": {"credential": False, "echo_header": False, "echo_body": False,
                                                "encoding": None},
            "credential, no reflection": {"credential": True, "echo_header": False, "echo_body": False,
                                          "encoding": None},
            "credential echoed in header + body": {"credential": True, "echo_header": True, "echo_body": True,
                                                   "encoding": None},
            "credential, no reflection, gzip": {"credential": True, "echo_header": False, "echo_body": False,
                                                "encoding": "gzip"},
            "credential echoed, gzip": {"credential": True, "echo_header": True, "echo_body": True,
                                        "encoding": "gzip"},
        }
        rows = {name: hooks_us(addon, a.n, a.batches, **kw) for name, kw in cases.items()}
    stream = stream_mib_s(a.batches)
    if a.json:
        print(json.dumps({"hooks_us_per_response": rows, "stream_redactor_mib_per_s": stream}, indent=2))
        return 0
    base = rows["no credential (nothing to scan)"]
    print("response hooks on a ~4 KiB JSON body, CPU microseconds per response (best of batches):")
    for name, us in rows.items():
        print(f"  {name:38s} {us:8.1f} us   (+{us - base:.1f})")
    print(f"streaming redactor, 4 MiB text in 16 KiB chunks: {stream:.0f} MiB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
