"""The benchmark's upstream: a minimal keep-alive HTTP/1.1 server on loopback, plain and TLS.

It answers every request with the same small JSON body and does no other work, so that the
"direct" row measures the load generator and the kernel rather than a web framework. It is a
stand-in for a real API (which would be slower and so hide proxy overhead): the upstream is
not what is being measured. Runs as its own process so it never shares a GIL with the proxy
or the load generator.

    python bench/upstream.py --http-port 9001 --https-port 9002 --cert c.pem --key k.pem
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys

BODY = b'{"ok":true}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
# Paths under /v1/json4k get a ~4 KiB JSON body: what Keyless scans for a reflected credential.
BODY_4K = (b'{"items":[' + b",".join(b'{"id":%d,"name":"item-%d","tags":["a","b"]}' % (i, i) for i in range(95))
           + b"]}")
RESPONSE_4K = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(BODY_4K)).encode() + b"\r\n\r\n" + BODY_4K)


class Http11(asyncio.Protocol):
    """Pipelining-safe: parses as many complete requests as the buffer holds."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            total = end + 4 + length
            if len(self.buf) < total:
                break
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            self.buf = self.buf[total:]
            out.append(RESPONSE_4K if b"/v1/json4k" in target else RESPONSE)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Http11, "127.0.0.1", args.http_port, backlog=4096)]
    if args.https_port:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        servers.append(await loop.create_server(Http11, "127.0.0.1", args.https_port, ssl=ctx, backlog=4096))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--https-port", type=int, default=0)
    p.add_argument("--cert")
    p.add_argument("--key")
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
