"""A DNS server the rebinding tests control, run inside a test namespace.

``python -m tests.netns_dns --events FILE --listen ADDR --name NAME=IP[,IP...][/IP[,IP...]...]``
answers A queries for NAME over UDP and TCP port 53 with TTL 0, cycling through the answer
sets separated by ``/`` (one set per A query: ``a.test=10.0.0.1/10.0.0.2`` alternates, and
``m.test=10.0.0.1,10.0.0.2`` always answers both). AAAA queries for a known name get an empty
NOERROR answer (the name exists, it has no IPv6 address); anything else gets NXDOMAIN. Every
query is appended to FILE as one JSON line with the addresses answered, so a test can count
how many times Keyless resolved a name.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import struct
from collections.abc import Iterator

from dnslib import QTYPE, RCODE, RR, A, DNSRecord


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--name", action="append", required=True)
    args = p.parse_args()
    out = open(args.events, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    cycles: dict[str, Iterator[list[str]]] = {}
    for spec in args.name:
        name, _, sets = spec.partition("=")
        cycles[name.lower().rstrip(".")] = itertools.cycle([s.split(",") for s in sets.split("/")])

    def answer(data: bytes, transport: str) -> bytes:
        query = DNSRecord.parse(data)
        reply = query.reply()
        qname = str(query.q.qname).lower().rstrip(".")
        qtype = QTYPE[query.q.qtype]
        given: list[str] = []
        if qname not in cycles:
            reply.header.rcode = RCODE.NXDOMAIN
        elif qtype == "A":
            given = next(cycles[qname])
            for ip in given:
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(ip), ttl=0))
        out.write(json.dumps({"name": qname, "type": qtype, "answer": given, "transport": transport}) + "\n")
        return bytes(reply.pack())

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.DatagramTransport)
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(answer(data, "udp"), addr)

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                reply = answer(await reader.readexactly(size), "tcp")
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(Udp, local_addr=(args.listen, 53))
        await asyncio.start_server(tcp, args.listen, 53)
        out.write(json.dumps({"ready": True}) + "\n")
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
