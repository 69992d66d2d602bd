"""Keyless as an egress gateway for other hosts, proven in real network namespaces.

    app 10.200.2.1 ──veth── 10.200.2.254 gateway 10.200.3.254 ──veth── 10.200.3.2 upstream
    (default route via the gateway)  Keyless :15001, `keyless iptables --gateway --apply`

The app routes its egress through the gateway and is configured with nothing but the Keyless
CA; the gateway attests it by source address and the policy sees the original destination.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proxy.demo import free_port
from tests.harness import base_config
from tests.netns import NsKeyless, NsUpstream, Topology, require_netns

CANARY = "canary-gateway-91b2d4e6f0"
API = "10.200.3.2"

POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "not granted"}

decision := {"allow": true, "reason": "gateway client may call the api", "credential": "api-key"} if {
	input.identity.id == "spiffe://test/gw-app"
	input.request.host == "api.example"
	input.destination.address == "10.200.3.2"
}
"""


@dataclass
class Gateway:
    topo: Topology
    app: str
    gw: str
    upstream: NsUpstream
    keyless: NsKeyless


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    require_netns()
    tmp = tmp_path_factory.mktemp("gateway")
    topo = Topology({"api.example": API})
    try:
        app, gw, up = topo.ns("app"), topo.ns("gw"), topo.ns("up")
        topo.link(app, "10.200.2.1/24", gw, ["10.200.2.254/24"])
        topo.link(gw, "10.200.3.254/24", up, [f"{API}/24"])
        topo.exec(app, "ip", "route", "add", "default", "via", "10.200.2.254", check=True)
        # Forwarding on, so that it is the FORWARD REJECT rule (not a sysctl) that stops bypasses.
        topo.exec(gw, "sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
        upstream = NsUpstream(topo, up, tmp / "upstream", [API], ("api.example",))
        res = topo.exec(gw, sys.executable, "-m", "proxy.cli", "iptables", "--gateway", "--apply",
                        "--source=10.200.2.0/24")
        assert res.returncode == 0, res.stderr
        policies = tmp / "policies"
        policies.mkdir()
        (policies / "egress.rego").write_text(POLICY)
        kdir = tmp / "keyless"
        kdir.mkdir()
        (kdir / "api-key").write_text(CANARY + "\n")
        cfg = base_config(
            kdir,
            listen={"address": "0.0.0.0", "port": 15001, "mode": "transparent"},  # noqa: S104
            admin={"address": "127.0.0.1", "port": free_port()},
            tls={"ca_dir": str(kdir / "ca"), "upstream_ca": str(upstream.ca)},
            trust=[{"name": "clients", "type": "source_ip",
                    "workloads": [{"cidr": "10.200.2.1/32", "id": "spiffe://test/gw-app"}]}],
            policy={"dir": str(policies)},
            credentials={"api-key": {"type": "static", "from": "file", "file": str(kdir / "api-key")}},
        )
        keyless = NsKeyless(topo, gw, kdir, cfg).start()
        yield Gateway(topo, app, gw, upstream, keyless)
        assert keyless.stop() == 0
        assert CANARY not in keyless.log_file.read_text() + keyless.audit_file.read_text()
    finally:
        topo.close()


def test_gateway_attests_by_source_and_injects(gateway: Gateway) -> None:
    k = gateway.keyless
    out = gateway.topo.exec(gateway.app, "curl", "-sS", "--max-time", "15", "-o", "/dev/null", "-w", "%{http_code}",
                            "--cacert", str(k.ca_cert), "-H", "Authorization: Bearer app-own",
                            "https://api.example/v1/gw")
    assert out.stdout == "200", out.stderr
    got = gateway.upstream.requests()
    assert [g["headers"]["authorization"] for g in got] == [f"Bearer {CANARY}"]
    rec = k.wait_audit(1)[-1]
    assert rec["identity"]["id"] == "spiffe://test/gw-app" and rec["source"]["address"] == "10.200.2.1"
    assert rec["request"]["destination"] == {"address": API, "port": 443}


def test_gateway_forwards_nothing_it_did_not_proxy(gateway: Gateway) -> None:
    # Port 8443 is not redirected: the FORWARD REJECT rule refuses it instead of routing it.
    out = gateway.topo.exec(gateway.app, "curl", "-sS", "--max-time", "10", "-k", f"https://{API}:8443/")
    assert out.returncode == 7, out
    listing = gateway.topo.exec(gateway.gw, "iptables", "-L", "FORWARD", "-v", "-x", "-n", check=True).stdout
    assert int(next(line for line in listing.splitlines() if "REJECT" in line).split()[0]) > 0
