"""DNS rebinding: the address Keyless dials is the address it checked, proven with a real resolver.

One network namespace holds everything (no address exists outside it):

    lo  127.0.0.1        Keyless (as uid 10001) and curl, the app
        10.200.53.53     the DNS server this test controls (tests.netns_dns), TTL 0
        10.200.53.7      the "public" upstream: HTTPS and HTTP, records every request
        10.200.53.8      nothing listens (a dead address in a multi-address answer)
        169.254.169.254  the "metadata service": the same upstream program, counts accepts

``rebind.test`` alternates between 10.200.53.7 and 169.254.169.254 on every A query;
``mixed.test`` answers both addresses in one response (in both orders); ``dual.test`` answers
a dead address and the public one, both allowed; ``nocert.test`` points at the public address,
whose certificate does not name it. ``ip netns exec`` puts
the namespace's resolv.conf in place, so Keyless's system resolver asks our server. Before the
pin, Keyless checked one lookup and mitmproxy dialled another: every second request delivered
the credential to 169.254.169.254.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import base_config
from tests.netns import NsKeyless, NsUpstream, Topology, require_netns, sh

CANARY = "canary-rebind-3c71e9a0d4"
PUBLIC, METADATA, DNS = "10.200.53.7", "169.254.169.254", "10.200.53.53"
DEAD = "10.200.53.8"  # an address with no listener: connecting to it is refused

POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "not granted"}

decision := {"allow": true, "reason": "app may call the test api", "credential": "api-key"} if {
	input.request.host in {"rebind.test", "mixed.test", "dual.test", "nocert.test"}
}
"""


@dataclass
class Rebind:
    topo: Topology
    ns: str
    upstream: NsUpstream
    keyless: NsKeyless
    dns_events: Path

    def queries(self, name: str) -> list[dict[str, Any]]:
        lines = self.dns_events.read_text().splitlines()
        return [e for e in map(json.loads, lines) if e.get("name") == name and e["type"] == "A"]

    def curl(self, *args: str) -> list[tuple[int, str]]:
        """(status, body) for every URL in ``args``, through Keyless, from inside the namespace."""
        out = self.topo.exec(self.ns, "curl", "-sS", "--max-time", "20", "-x", "http://127.0.0.1:15001",
                             "--cacert", str(self.keyless.ca_cert), "-H", "Authorization: Bearer app-own",
                             "-w", "\n@@%{http_code}@@\n", *args, timeout=120)
        assert out.returncode == 0, out.stderr
        parts = out.stdout.split("@@")
        return [(int(parts[i + 1]), parts[i].strip()) for i in range(0, len(parts) - 1, 2)]

    def accepts(self, address: str) -> int:
        return sum(self.upstream.count("accept", f"{address}:{port}") for port in (80, 443))


@pytest.fixture(scope="module")
def rebind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rebind]:
    require_netns(("ip", "curl", "setpriv"))  # no firewall rules here
    tmp = tmp_path_factory.mktemp("rebind")
    topo = Topology({})  # /etc/hosts knows only localhost: the test names go to our DNS server
    try:
        ns = topo.ns("dns")
        # On the namespace's own loopback device: local addresses, reachable from nowhere else.
        for addr in (f"{DNS}/32", f"{PUBLIC}/32", f"{METADATA}/32", f"{DEAD}/32"):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "lo")
        (Path("/etc/netns") / ns / "resolv.conf").write_text(
            f"nameserver {DNS}\noptions timeout:2 attempts:2\n")
        dns_events = tmp / "dns.jsonl"
        topo.spawn(ns, sys.executable, "-m", "tests.netns_dns", "--events", str(dns_events), "--listen", DNS,
                   f"--name=rebind.test={PUBLIC}/{METADATA}",
                   f"--name=mixed.test={PUBLIC},{METADATA}/{METADATA},{PUBLIC}",
                   f"--name=dual.test={DEAD},{PUBLIC}", f"--name=nocert.test={PUBLIC}", log=tmp / "dns.log")
        deadline = time.monotonic() + 20
        while not (dns_events.exists() and '"ready"' in dns_events.read_text()):
            assert time.monotonic() < deadline, (tmp / "dns.log").read_text()
            time.sleep(0.1)
        # One upstream program on both addresses: the metadata one only ever counts accepts.
        upstream = NsUpstream(topo, ns, tmp / "upstream", [PUBLIC, METADATA],
                              ("rebind.test", "mixed.test", "dual.test"))
        policies = tmp / "policies"
        policies.mkdir()
        (policies / "egress.rego").write_text(POLICY)
        kdir = tmp / "keyless"
        kdir.mkdir()
        (kdir / "api-key").write_text(CANARY + "\n")
        cfg = base_config(
            kdir,
            listen={"address": "127.0.0.1", "port": 15001},
            admin={"address": "127.0.0.1", "port": 15002},
            tls={"ca_dir": str(kdir / "ca"), "upstream_ca": str(upstream.ca)},
            policy={"dir": str(policies)},
            credentials={"api-key": {"type": "static", "from": "file", "file": str(kdir / "api-key")}},
            # Plain HTTP too, so the Host header (not only SNI) is seen to keep the name.
            egress={"allow_cleartext": [{"host": "rebind.test", "port": 80}]},
        )
        keyless = NsKeyless(topo, ns, kdir, cfg).start()
        yield Rebind(topo, ns, upstream, keyless, dns_events)
        assert keyless.stop() == 0
        assert CANARY not in keyless.log_file.read_text() + keyless.audit_file.read_text()
    finally:
        topo.close()


def _by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["decision_id"]: r for r in records}


def test_an_alternating_answer_never_reaches_the_refused_address(rebind: Rebind) -> None:
    n = 50
    results: list[tuple[int, str]] = []
    for i in range(n):
        # A new curl each time: a new client connection, so a new upstream connection and a dial.
        results += rebind.curl(f"https://rebind.test/v1/{i}")
    assert len(results) == n
    assert rebind.accepts(METADATA) == 0
    ok = [body for status, body in results if status == 200]
    refused = [json.loads(body) for status, body in results if status != 200]
    # Each request resolved exactly once (no second lookup by the connection), so the answers
    # alternate request by request: half were checked against the metadata address.
    assert len(rebind.queries("rebind.test")) == n
    assert len(ok) == n // 2 and len(refused) == n // 2
    got = [r for r in rebind.upstream.requests() if r["host"] == "rebind.test"]
    assert len(got) == n // 2 and all(r["listener"] == f"{PUBLIC}:443" for r in got)
    assert all(r["headers"]["authorization"] == f"Bearer {CANARY}" for r in got)
    records = _by_id(rebind.keyless.wait_audit(n))
    for body in refused:
        assert body["error"] == "forbidden" and METADATA in body["message"]
        rec = records[body["decision_id"]]
        assert rec["outcome"]["error"] == "forbidden" and rec["outcome"]["status"] == 403
        assert rec["credential"] is None and "upstream_address" not in rec["request"]
    allowed = [r for r in records.values() if r["outcome"]["status"] == 200]
    assert len(allowed) == n // 2
    assert all(r["request"]["upstream_address"] == {"address": PUBLIC, "port": 443} for r in allowed)


def test_keep_alive_reuses_only_the_checked_connection(rebind: Rebind) -> None:
    """One client connection, many requests: one checked lookup, one upstream connection, reused."""
    before, asked = rebind.accepts(PUBLIC), len(rebind.queries("rebind.test"))
    urls = [f"https://rebind.test/keepalive/{i}" for i in range(10)]
    results = rebind.curl("--http1.1", *urls)
    assert len(results) == 10 and rebind.accepts(METADATA) == 0
    statuses = [s for s, _ in results]
    # The first lookup may answer the metadata address (refused, nothing kept); the next one
    # answers the public address, and the client connection reuses that pin (egress.PIN_REUSE).
    first_ok = statuses.index(200)
    assert first_ok <= 1 and statuses[first_ok:] == [200] * (10 - first_ok), statuses
    assert len(rebind.queries("rebind.test")) - asked == first_ok + 1
    # The name is put back on the connection after the dial, so mitmproxy's reuse (which matches
    # the request's host and port) still works: one upstream connection for the whole tunnel.
    assert rebind.accepts(PUBLIC) - before == 1


def test_plain_http_keeps_the_host_header_and_the_pin(rebind: Rebind) -> None:
    results: list[tuple[int, str]] = []
    for i in range(6):
        results += rebind.curl(f"http://rebind.test/plain/{i}")
    assert rebind.accepts(METADATA) == 0
    assert sorted(s for s, _ in results) == [200] * 3 + [403] * 3
    got = [r for r in rebind.upstream.requests() if r["path"].startswith("/plain/")]
    assert len(got) == 3 and all(r["listener"] == f"{PUBLIC}:80" and r["host"] == "rebind.test" for r in got)
    assert all(r["headers"]["authorization"] == f"Bearer {CANARY}" for r in got)


def test_a_mixed_answer_refuses_the_name(rebind: Rebind) -> None:
    before = rebind.accepts(PUBLIC)
    results: list[tuple[int, str]] = []
    for i in range(4):  # both orders: public first, then metadata first
        results += rebind.curl(f"https://mixed.test/v1/{i}")
    assert rebind.accepts(METADATA) == 0 and rebind.accepts(PUBLIC) == before
    assert [s for s, _ in results] == [403] * 4
    for _, body in results:
        refusal = json.loads(body)
        assert refusal["error"] == "forbidden" and METADATA in refusal["message"]
    assert not [r for r in rebind.upstream.requests() if r["host"] == "mixed.test"]
    assert [len(q["answer"]) for q in rebind.queries("mixed.test")] == [2] * 4


def test_a_multi_address_answer_falls_back_only_to_checked_addresses(rebind: Rebind) -> None:
    """The dial tries the pin's addresses in order, as asyncio does for a name, and nothing else."""
    results: list[tuple[int, str]] = []
    for i in range(3):
        results += rebind.curl(f"https://dual.test/v1/{i}")
    assert [s for s, _ in results] == [200] * 3, results
    got = [r for r in rebind.upstream.requests() if r["host"] == "dual.test"]
    assert len(got) == 3 and all(r["listener"] == f"{PUBLIC}:443" for r in got)
    assert len(rebind.queries("dual.test")) == 3 and rebind.accepts(METADATA) == 0
    records = rebind.keyless.wait_audit(len(rebind.keyless.audit()))
    dual = [r for r in records if r["request"]["host"] == "dual.test"]
    assert [r["request"]["upstream_address"]["address"] for r in dual] == [PUBLIC] * 3


def test_the_upstream_certificate_is_still_verified_against_the_name(rebind: Rebind) -> None:
    """The dial goes to an address, but TLS still checks the name: a certificate without it fails."""
    before = rebind.accepts(PUBLIC)
    results = rebind.curl("https://nocert.test/v1/x")
    assert results[0][0] == 502 and rebind.accepts(PUBLIC) == before + 1  # connected, then refused the cert
    assert not [r for r in rebind.upstream.requests() if r["host"] == "nocert.test"]


def _addon(tmp: Path) -> Any:
    from proxy.addon import KeylessAddon
    from proxy.audit import JsonLinesSink
    from proxy.config import parse_config
    from proxy.pipeline import Pipeline
    from proxy.server import prepare

    cfg = parse_config(base_config(tmp), tmp / "keyless.yaml")
    prep = prepare(cfg)
    return KeylessAddon(Pipeline(cfg, prep.engine, prep.signer, JsonLinesSink(cfg.audit.path), prep.trust,
                                 prep.credentials))


def test_server_connect_hands_mitmproxy_the_pin_and_puts_the_name_back(tmp_path: Path) -> None:
    """The hooks in process, on mitmproxy's own connection objects (no network, no namespace)."""
    import socket

    from mitmproxy.connection import ConnectionState
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData
    from mitmproxy.test import tflow

    from proxy.egress import PIN_SUFFIX, Pin

    addon = _addon(tmp_path)

    async def run() -> None:
        client = tflow.tclient_conn()
        client.sni = None
        addon.pipeline._allowed[client.id] = {("api.test", 443): Pin("api.test", 443, ("192.0.2.7", "192.0.2.8"))}
        server = tflow.tserver_conn()
        server.address, server.tls, server.sni = ("api.test", 443), True, None
        data = ServerConnectionHookData(server=server, client=client)
        await addon.server_connect(data)
        assert server.error is None
        dial, port = server.address
        assert dial.endswith(PIN_SUFFIX) and port == 443 and server.sni == "api.test"  # TLS keeps the name
        # What asyncio.open_connection(*server.address) would try: the pin, in order, nothing else.
        infos = await asyncio.get_running_loop().getaddrinfo(dial, port, type=socket.SOCK_STREAM)
        assert [i[4][0] for i in infos] == ["192.0.2.7", "192.0.2.8"]
        server.peername, server.state = ("192.0.2.7", 443), ConnectionState.OPEN
        addon.server_connected(data)
        assert server.address == ("api.test", 443) and len(addon.pipeline.egress.dial_names) == 0
        # A destination no allowed request asked for is never dialled, pin or not.
        other = tflow.tserver_conn()
        other.address = ("other.test", 443)
        await addon.server_connect(ServerConnectionHookData(server=other, client=client))
        assert other.error is not None and other.address == ("other.test", 443)

    asyncio.run(run())
