"""A real upstream for the network-namespace tests, run inside the upstream namespace.

``python -m tests.netns_upstream --events FILE --cert C --key K --listen ADDR ...`` serves HTTP
on port 80 and HTTPS on 443 of every ``--listen`` address (aiohttp), and also counts UDP
datagrams on port 443. Every TCP accept, every request (headers included) and every datagram is
appended to FILE as one JSON line, so a test can assert that a denied destination saw zero
connections, not merely zero requests. ``/slow?seconds=N`` answers after N seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from typing import Any

from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--listen", action="append", required=True)
    args = p.parse_args()
    out = open(args.events, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def record(**event: Any) -> None:
        out.write(json.dumps(event) + "\n")

    async def handle(request: web.Request) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        record(kind="request", listener=f"{sockname[0]}:{sockname[1]}" if sockname else None,
               scheme=request.scheme, method=request.method, host=request.host, path=request.path,
               headers={k.lower(): v for k, v in request.headers.items()})
        if request.path == "/slow":
            await asyncio.sleep(float(request.query.get("seconds", "2")))
        return web.json_response({"ok": True, "path": request.path})

    class Udp(asyncio.DatagramProtocol):
        def __init__(self, where: str) -> None:
            self.where = where

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            record(kind="udp", listener=self.where, size=len(data))

    async def run() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        runner = web.AppRunner(web.Application(handler_args=None), access_log=None)
        runner.app.router.add_route("*", "/{tail:.*}", handle)
        await runner.setup()
        loop = asyncio.get_running_loop()
        server = runner.server
        assert server is not None

        def counting(where: str) -> Any:
            def factory() -> Any:
                record(kind="accept", listener=where)
                return server()
            return factory

        for addr in args.listen:
            await loop.create_server(counting(f"{addr}:80"), addr, 80)
            await loop.create_server(counting(f"{addr}:443"), addr, 443, ssl=ctx)
            await loop.create_datagram_endpoint(lambda a=addr: Udp(f"{a}:443"), local_addr=(addr, 443))
        record(kind="ready")
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
