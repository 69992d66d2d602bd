"""What MCP awareness costs per call: microseconds of CPU for Keyless's own MCP work.

* ``parse``: one tools/call body (a typical ~300 B message with the SDK's headers) through
  ``McpGate.body``: strict JSON with duplicate-key detection, the JSON-RPC and MCP checks, the
  header/body agreement, the pin lookup and ``input.mcp``;
* ``parse_4k``: the same with 4 KiB of arguments;
* ``audit``: the record's ``mcp`` part (the arguments' keyed fingerprint);
* ``list_N``: filtering a tools/list result of N tools (JSON, then SSE), pins included, with
  an allow callback that answers at once: what Keyless adds besides the N policy decisions
  (each an ordinary decision; see docs/benchmarks.md for their cost).

CPU time of this process, best of several batches (wall-clock medians swing on a shared host).

    .venv/bin/python bench/mcp_parse.py [--n 20000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.agents.gate import McpCall, McpGate  # noqa: E402
from proxy.agents.options import McpConfig, McpServer  # noqa: E402
from proxy.model import ANONYMOUS  # noqa: E402

SERVER = McpServer("github", "mcp.example", 443, "/mcp")
HEADERS = (("content-type", "application/json"), ("accept", "application/json, text/event-stream"),
           ("mcp-protocol-version", "2025-11-25"), ("mcp-session-id", "9f1c" * 8),
           ("mcp-method", "tools/call"), ("mcp-name", "create_issue"))


def call_body(extra: int = 0) -> bytes:
    args: dict[str, Any] = {"repo": "acme/app", "title": "Crash on start", "labels": ["bug", "p1"]}
    if extra:
        args["body"] = "x" * extra
    return json.dumps({"jsonrpc": "2.0", "id": 42, "method": "tools/call",
                       "params": {"name": "create_issue", "arguments": args}}).encode()


def listing(n: int, sse: bool) -> bytes:
    tools = [{"name": f"tool_{i}", "description": f"Does thing {i} to a repository.",
              "inputSchema": {"type": "object", "properties": {"repo": {"type": "string"}}, "required": ["repo"]}}
             for i in range(n)]
    doc = json.dumps({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}})
    return f"event: message\ndata: {doc}\n\n".encode() if sse else doc.encode()


def best_us(fn: Callable[[], object], n: int, batches: int = 5) -> float:
    best = float("inf")
    for _ in range(batches):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n)
    return round(best * 1e6, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    gate = McpGate(McpConfig(servers=(SERVER,)))
    small, big = call_body(), call_body(4096)

    def parse(body: bytes) -> Callable[[], object]:
        def run() -> object:
            doc: dict[str, Any] = {}
            gate.body(McpCall(SERVER, "POST", HEADERS, pending=True), body, doc)
            return doc
        return run

    parsed = McpCall(SERVER, "POST", HEADERS, pending=True)
    gate.body(parsed, small, {})
    results: dict[str, float] = {
        "parse": best_us(parse(small), a.n),
        "parse_4k": best_us(parse(big), a.n // 4),
        "audit": best_us(lambda: McpGate.audit(parsed, ANONYMOUS), a.n),
    }

    async def allow(_name: str, _changed: bool) -> bool:
        return True

    list_call = McpCall(SERVER, "POST", (), message=None)
    gate.body(list_call, b'{"jsonrpc":"2.0","id":3,"method":"tools/list"}', {})
    loop = asyncio.new_event_loop()
    for n_tools in (10, 100):
        for sse in (False, True):
            body = listing(n_tools, sse)
            ctype = "text/event-stream" if sse else "application/json"
            results[f"list_{n_tools}_{'sse' if sse else 'json'}"] = best_us(
                lambda body=body, ctype=ctype: loop.run_until_complete(  # type: ignore[misc]
                    gate.listing(list_call, body, ctype, allow)), max(50, a.n // (n_tools * 2)))
    loop.close()
    if a.json:
        print(json.dumps(results))
    else:
        for k, v in results.items():
            print(f"{k:>16}: {v:8.2f} us")


if __name__ == "__main__":
    main()
