"""An SDK tool call's latency through Keyless against the same call direct (informal).

One MCP session each way (the official SDK's client and MCPServer, JSON responses, the docs'
example policy, a static credential), 20 warm-up calls, then 200 timed ``create_issue`` calls;
the medians of two interleaved rounds. On a shared host the spread is wide: read the difference,
not the absolute numbers. Uses the test peers (tests/mcp_peers.py); about 20 seconds.

    PYTHONPATH=$PWD .venv/bin/python bench/mcp_e2e.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from tests.harness import Keyless  # noqa: E402
from tests.issuer import Issuer  # noqa: E402
from tests.mcp_peers import McpPeer  # noqa: E402
from tests.test_mcp import mcp_config, static_credential  # noqa: E402


async def calls(url: str, proxy: str | None, headers: dict[str, str], n: int) -> list[float]:
    extra = {"proxy": proxy} if proxy else {}
    async with (httpx2.AsyncClient(headers=headers, timeout=30, **extra) as http,  # type: ignore[arg-type]
                streamable_http_client(url, http_client=http) as (read, write),
                ClientSession(read, write) as s):
        await s.initialize()
        for _ in range(20):
            await s.call_tool("create_issue", {"repo": "acme/app", "title": "t"})
        out = []
        for _ in range(n):
            started = time.perf_counter()
            await s.call_tool("create_issue", {"repo": "acme/app", "title": "t"})
            out.append((time.perf_counter() - started) * 1000)
        return out


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    users = Issuer(tmp / "users").start()
    peer = McpPeer(json_response=True).start()
    k = Keyless(tmp, mcp_config(tmp, peer, users, static_credential(tmp))).start(log_level="warning")
    try:
        headers = {"Keyless-User-Token": users.mint(sub="alice")}
        for rnd in range(2):
            direct = statistics.median(asyncio.run(calls(peer.url, None, headers, 200)))
            proxied = statistics.median(asyncio.run(calls(peer.url, k.proxy_url, headers, 200)))
            print(f"round {rnd}: direct {direct:.2f} ms, through keyless {proxied:.2f} ms (medians)")
    finally:
        k.stop()
        peer.stop()
        users.stop()


if __name__ == "__main__":
    main()
