"""A closed-loop HTTP/1.1 load generator that speaks CONNECT + TLS through a proxy, with keep-alive.

wrk cannot tunnel through a proxy, so HTTPS through Keyless is driven by this instead: each of
``--connections`` workers opens one connection (``CONNECT`` to the proxy, then TLS to the target
name inside the tunnel), and only once every connection is established does the clock start;
then each sends one request at a time and waits for the full response, for ``--duration``
seconds. It is Python, so it has a ceiling of its own: the harness measures that ceiling by
running it directly against the upstream too (the "direct" row). Plain HTTP through a proxy is
also supported (absolute-form request target), as a fallback where wrk is not installed.

``--hold N`` opens N tunnels, sends one request on each, keeps them all open and prints
``held`` until stdin closes: the harness measures the proxy's RSS with that many idle
keep-alive connections.

Prints one JSON object: requests, errors, seconds, rps, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import sys
import time


class Conn:
    sent = 0  # requests sent by every connection: the {n} of a varied path

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        host = args.host_header or f"{args.target_host}:{args.target_port}"
        scheme = "https" if args.tls else "http"
        # Absolute-form only for plain HTTP through a proxy; inside a tunnel it is origin-form.
        target = f"{scheme}://{host}{args.path}" if args.proxy and not args.tls else args.path
        body = args.body.encode()
        self.request = (f"{args.method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: keyless-bench\r\n"
                        f"Accept: */*\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        # "{n}" in --path: a distinct path per request (/v1/invoices/1, /2, ...), as real APIs see.
        self.varied = b"{n}" in self.request

    async def open(self, ctx: ssl.SSLContext | None) -> None:
        a = self.args
        if a.proxy:
            phost, _, pport = a.proxy.rpartition(":")
            reader, writer = await asyncio.open_connection(phost, int(pport))
            if a.tls:
                auth = f"{a.target_host}:{a.target_port}"
                writer.write(f"CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
                    raise ConnectionError(f"CONNECT refused: {head[:40]!r}")
                await writer.start_tls(ctx, server_hostname=a.server_name or a.target_host)
        else:
            reader, writer = await asyncio.open_connection(
                a.target_host, a.target_port, ssl=ctx if a.tls else None,
                server_hostname=(a.server_name or a.target_host) if a.tls else None)
        self.reader, self.writer = reader, writer

    async def one(self) -> int:
        assert self.reader is not None and self.writer is not None
        if self.varied:
            Conn.sent += 1
            self.writer.write(self.request.replace(b"{n}", str(Conn.sent).encode()))
        else:
            self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tls_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    # Resumption would hide the handshake cost we want to see once per connection, not more.
    return ctx


async def run(args: argparse.Namespace) -> dict[str, object]:
    ctx = tls_context(args.cafile) if args.tls else None
    conns = [Conn(args) for _ in range(args.connections)]
    await asyncio.gather(*(c.open(ctx) for c in conns))
    for c in conns:  # warm each connection (and the proxy's per-host certificate) once
        await c.one()
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    deadline = start + args.duration

    async def worker(c: Conn) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            try:
                status = await c.one()
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker(c) for c in conns))
    seconds = time.perf_counter() - start
    for c in conns:
        c.close()
    latencies.sort()
    non2xx = sum(n for s, n in statuses.items() if not 200 <= s < 300)
    return {
        "requests": len(latencies), "errors": errors + non2xx, "seconds": round(seconds, 3),
        "rps": round(len(latencies) / seconds, 1) if seconds else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


async def hold(args: argparse.Namespace) -> dict[str, object]:
    ctx = tls_context(args.cafile) if args.tls else None
    conns = [Conn(args) for _ in range(args.hold)]
    sem = asyncio.Semaphore(64)  # open them briskly but without a SYN flood on the backlog

    async def open_one(c: Conn) -> bool:
        async with sem:
            try:
                await c.open(ctx)
                return 200 <= await c.one() < 300
            except (OSError, asyncio.IncompleteReadError, ValueError):
                return False

    ok = sum(await asyncio.gather(*(open_one(c) for c in conns)))
    print(json.dumps({"held": ok}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for c in conns:
        c.close()
    return {"held": ok}


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proxy", help="host:port of an HTTP proxy (CONNECT for --tls)")
    p.add_argument("--target-host", default="localhost")
    p.add_argument("--target-port", type=int, required=True)
    p.add_argument("--host-header")
    p.add_argument("--server-name")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--cafile")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/")
    p.add_argument("--body", default="")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--hold", type=int, default=0)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    result = asyncio.run(hold(args) if args.hold else run(args))
    if not args.hold:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
