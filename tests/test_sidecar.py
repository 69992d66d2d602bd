"""Keyless as a transparent sidecar, proven in real network namespaces.

Topology (all addresses exist only inside the namespaces this module creates):

    app namespace  10.200.1.1 ── veth ── 10.200.1.2 api.example, legacy.example  upstream namespace
      curl / python, no proxy settings    10.200.1.3 denied.example (counts accepts only)
      Keyless as uid 10001 on :15001
      rules from `keyless iptables --apply`

The app's clients are configured with nothing but, for HTTPS, the Keyless CA; the kernel sends
their TCP 80/443 to Keyless. Tests run in file order: the last two stop Keyless.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.demo import free_port
from tests.harness import base_config
from tests.netns import KEYLESS_UID, NsKeyless, NsUpstream, Topology, clean_env, require_netns

CANARY = "canary-sidecar-7f3a9c0e51"
APP_SECRET = "app-own-secret-55aa"
API, DENIED = "10.200.1.2", "10.200.1.3"
API6 = "fd00:200:1::2"  # a unique-local address that exists only in the upstream namespace

POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "not granted"}

decision := {"allow": true, "reason": "app may call the api", "credential": "api-key"} if {
	input.identity.id == "spiffe://test/app"
	input.request.host in {"api.example", "legacy.example", "10.200.1.2"}
}

decision := {"allow": true, "reason": "an address nobody answers for", "credential": null} if {
	input.request.host == "10.200.1.4"
}
"""


@dataclass
class Sidecar:
    topo: Topology
    app: str
    upstream: NsUpstream
    keyless: NsKeyless
    tmp: Path

    @property
    def app_ca(self) -> str:
        """The CA certificate as the app sees it: published by Keyless, without the key."""
        return str(self.keyless.dir / "shared" / "ca.pem")

    def curl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.topo.exec(self.app, "curl", "-sS", "--max-time", "15", *args, timeout=timeout)


def sidecar_config(tmp: Path, upstream_ca: Path) -> dict[str, object]:
    policies = tmp / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "egress.rego").write_text(POLICY)
    (tmp / "keyless").mkdir(exist_ok=True)
    secret = tmp / "keyless" / "api-key"
    secret.write_text(CANARY + "\n")
    kdir = tmp / "keyless"
    return base_config(
        kdir,
        listen={"address": "127.0.0.1", "port": 15001, "mode": "transparent", "drain_seconds": 10},
        admin={"address": "127.0.0.1", "port": free_port()},
        tls={"ca_dir": str(kdir / "ca"), "upstream_ca": str(upstream_ca),
             "publish_ca": str(kdir / "shared" / "ca.pem")},
        trust=[{"name": "pod", "type": "source_ip",
                "workloads": [{"cidr": "10.200.1.1/32", "id": "spiffe://test/app"}]}],
        policy={"dir": str(policies)},
        credentials={"api-key": {"type": "static", "from": "file", "file": str(secret)}},
        egress={"tls_origination": [{"host": "api.example", "port": 80}]},
    )


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    require_netns()
    tmp = tmp_path_factory.mktemp("sidecar")
    topo = Topology({"api.example": API, "legacy.example": API, "denied.example": DENIED})
    try:
        app, up = topo.ns("app"), topo.ns("up")
        topo.link(app, "10.200.1.1/24", up, ["10.200.1.2/24", "10.200.1.3/24"],
                  v6=("fd00:200:1::1/64", f"{API6}/64"))
        upstream = NsUpstream(topo, up, tmp / "upstream", [API, DENIED, API6],
                              ("api.example", "legacy.example", "denied.example"))
        # The real CLI installs the rules, as the Kubernetes init container does.
        res = topo.exec(app, sys.executable, "-m", "proxy.cli", "iptables", "--apply", f"--uid={KEYLESS_UID}")
        assert res.returncode == 0, res.stderr
        keyless = NsKeyless(topo, app, tmp / "keyless", sidecar_config(tmp, upstream.ca)).start()
        yield Sidecar(topo, app, upstream, keyless, tmp)
        keyless.stop()
        out = keyless.log_file.read_text() + keyless.audit_file.read_text()
        assert CANARY not in out and APP_SECRET not in out
    finally:
        topo.close()


def test_ipv6_rules_installed_too(sidecar: Sidecar) -> None:
    v6 = sidecar.topo.exec(sidecar.app, "ip6tables", "-t", "nat", "-S", "KEYLESS", check=True).stdout
    assert "REDIRECT --to-ports 15001" in v6 and f"--uid-owner {KEYLESS_UID}" in v6


def test_plain_http_app_gets_tls_origination_and_injected_credential(sidecar: Sidecar) -> None:
    before = len(sidecar.upstream.requests())
    out = sidecar.curl("-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {APP_SECRET}",
                       "http://api.example/v1/orders")
    assert out.stdout == "200", out.stderr
    got = sidecar.upstream.requests()[before:]
    assert len(got) == 1
    # The app spoke cleartext to port 80; the upstream got HTTPS on 443 with Keyless's credential.
    assert got[0]["listener"] == f"{API}:443" and got[0]["scheme"] == "https"
    assert got[0]["headers"]["authorization"] == f"Bearer {CANARY}"
    assert APP_SECRET not in str(got[0]["headers"])


def test_https_curl_trusting_keyless_ca(sidecar: Sidecar) -> None:
    before = len(sidecar.upstream.requests())
    out = sidecar.curl("-o", "/dev/null", "-w", "%{http_code}", "--cacert", sidecar.app_ca,
                       "-H", f"Authorization: Bearer {APP_SECRET}", "https://api.example/v1/invoices")
    assert out.stdout == "200", out.stderr
    got = sidecar.upstream.requests()[before:]
    assert [g["headers"]["authorization"] for g in got] == [f"Bearer {CANARY}"]
    rec = sidecar.keyless.wait_audit(1)[-1]
    assert rec["request"]["host"] == "api.example" and rec["request"]["destination"] == {"address": API, "port": 443}
    assert rec["identity"]["id"] == "spiffe://test/app" and rec["credential"]["name"] == "api-key"


def test_python_requests_without_proxy_settings(sidecar: Sidecar) -> None:
    before = len(sidecar.upstream.requests())
    code = ("import requests, sys; r = requests.get('https://api.example/v1/py', verify=sys.argv[1], "
            "headers={'Authorization': 'Bearer " + APP_SECRET + "'}, timeout=15); print(r.status_code)")
    out = sidecar.topo.exec(sidecar.app, sys.executable, "-c", code, sidecar.app_ca)
    assert out.stdout.strip() == "200", out.stderr
    got = sidecar.upstream.requests()[before:]
    assert [g["headers"]["authorization"] for g in got] == [f"Bearer {CANARY}"]


def test_keyless_own_connections_are_not_redirected(sidecar: Sidecar) -> None:
    # The uid-owner RETURN rule matched Keyless's upstream connections (otherwise they would
    # have looped into Keyless and been refused there as undecided).
    listing = sidecar.topo.exec(sidecar.app, "iptables", "-t", "nat", "-L", "KEYLESS", "-v", "-x", "-n",
                                check=True).stdout
    row = next(line for line in listing.splitlines() if f"owner UID match {KEYLESS_UID}" in line)
    assert int(row.split()[0]) > 0, listing


def test_denied_destination_sees_zero_connections(sidecar: Sidecar) -> None:
    for url in ("http://denied.example/v1/x", "https://denied.example/v1/x"):
        out = sidecar.curl("-o", "/dev/null", "-w", "%{http_code}", "--cacert", sidecar.app_ca, url)
        assert out.stdout == "403", out.stderr
    assert sidecar.upstream.count("accept", f"{DENIED}:80") == 0
    assert sidecar.upstream.count("accept", f"{DENIED}:443") == 0


def test_unreachable_destination_is_a_json_refusal_not_a_page(sidecar: Sidecar) -> None:
    # 10.200.1.4 is on the link but no host answers for it: the connect fails (no route to host).
    before = len(sidecar.keyless.audit())
    out = sidecar.curl("-i", "http://10.200.1.4/v1/x")
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 502"), out.stdout[:300]
    answer = json.loads(body)
    assert answer["error"] == "upstream_unreachable"
    records = sidecar.keyless.audit()[before:]
    assert [r["decision_id"] for r in records] == [answer["decision_id"]]
    assert records[0]["outcome"]["error"] == "upstream_unreachable" and records[0]["outcome"]["status"] == 502


def test_host_header_must_resolve_to_the_original_destination(sidecar: Sidecar) -> None:
    # The app dials denied.example's address but claims to be calling api.example.
    out = sidecar.curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: api.example", f"http://{DENIED}/v1/x")
    assert out.stdout == "421", out.stderr
    assert sidecar.upstream.count("accept", f"{DENIED}:80") == 0


def test_no_credential_on_a_cleartext_hop(sidecar: Sidecar) -> None:
    before = len(sidecar.upstream.requests())
    out = sidecar.curl("-w", "\n%{http_code}", "http://legacy.example/v1/x")
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "403" and "cleartext" in body, out.stdout
    assert len(sidecar.upstream.requests()) == before


def test_raw_tcp_on_a_redirected_port_is_closed_and_audited(sidecar: Sidecar) -> None:
    accepts = sidecar.upstream.count("accept", f"{API}:80")
    code = (
        "import socket\n"
        f"s = socket.create_connection(('{API}', 80), timeout=10)\n"
        "s.sendall(b'SSH-2.0-OpenSSH_9.2 not http\\r\\n')\n"
        "try:\n    data = s.recv(100)\nexcept ConnectionResetError:\n    data = b''\n"
        "print('closed' if data == b'' else 'got ' + repr(data))\n"
    )
    out = sidecar.topo.exec(sidecar.app, sys.executable, "-c", code)
    assert out.stdout.strip() == "closed", out.stdout + out.stderr
    time.sleep(0.3)
    assert sidecar.upstream.count("accept", f"{API}:80") == accepts
    recs = [r for r in sidecar.keyless.audit() if r["request"].get("scheme") == "tcp"]
    assert recs and recs[-1]["outcome"]["error"] == "bad_request"
    assert recs[-1]["request"]["host"] == API and recs[-1]["request"]["port"] == 80


def test_tls_without_sni_to_an_ip_gets_no_credential(sidecar: Sidecar) -> None:
    # The policy grants the bare address, yet an IP literal over TLS has no name to verify.
    before = len(sidecar.upstream.requests())
    out = sidecar.curl("-o", "/dev/null", "-w", "%{http_code}", "--cacert", sidecar.app_ca, f"https://{API}/v1/x")
    assert out.stdout == "421", out.stderr
    assert len(sidecar.upstream.requests()) == before


def test_ipv6_is_redirected_too_and_fails_closed(sidecar: Sidecar) -> None:
    # Keyless listens on 127.0.0.1 only: redirected IPv6 connections are refused, not let through.
    out = sidecar.curl("-g", "-o", "/dev/null", "-w", "%{http_code}", f"http://[{API6}]/v1/x")
    assert out.returncode == 7, out
    assert sidecar.upstream.count("accept", f"{API6}:80") == 0
    listing = sidecar.topo.exec(sidecar.app, "ip6tables", "-t", "nat", "-L", "KEYLESS", "-v", "-x", "-n",
                                check=True).stdout
    row = next(line for line in listing.splitlines() if "REDIRECT" in line)
    assert int(row.split()[0]) > 0, listing  # refused because it was redirected, not for lack of a route


def test_quic_udp_443_is_rejected(sidecar: Sidecar) -> None:
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
        f"s.connect(('{API}', 443))\n"
        "try:\n    s.send(b'\\xc0quic-initial'); s.recv(10); print('answered')\n"
        # A REJECT in OUTPUT fails the send itself (EPERM); ICMP unreachable fails the next call.
        "except (ConnectionRefusedError, PermissionError):\n    print('refused')\n"
        "except TimeoutError:\n    print('timeout')\n"
    )
    out = sidecar.topo.exec(sidecar.app, sys.executable, "-c", code)
    assert out.stdout.strip() == "refused", out.stdout + out.stderr
    assert sidecar.upstream.count("udp") == 0


def test_sigterm_lets_an_inflight_request_finish(sidecar: Sidecar) -> None:
    k = sidecar.keyless
    before = len(sidecar.upstream.requests())
    slow = subprocess.Popen(
        ["ip", "netns", "exec", sidecar.app, "curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w",
         "%{http_code}", "--cacert", sidecar.app_ca, "https://api.example/slow?seconds=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.monotonic() + 10
    while len(sidecar.upstream.requests()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sidecar.upstream.requests()) == before + 1, "slow request never reached the upstream"
    audited = len(k.audit())
    started = time.monotonic()
    k.signal(signal.SIGTERM)
    # Wait (bounded) until the listener is closed; a bare connect sends no request anywhere.
    probe = ("import socket, time\nend = time.monotonic() + 8\n"
             "while time.monotonic() < end and socket.socket().connect_ex(('127.0.0.1', 15001)) == 0:\n"
             "    time.sleep(0.05)\n")
    sidecar.topo.exec(sidecar.app, sys.executable, "-c", probe, timeout=15)
    # Draining: new connections are refused (by the kernel: nothing listens), never bypassed.
    late = sidecar.curl("-o", "/dev/null", "-w", "%{http_code}", "http://api.example/v1/late")
    assert late.returncode == 7 and late.stdout == "000", late
    out, err = slow.communicate(timeout=20)
    assert out == "200", err
    assert k.proc is not None
    assert k.proc.wait(15) == 0
    assert time.monotonic() - started >= 2  # it waited for the request instead of cutting it
    recs = k.audit()[audited:]
    assert [r["request"]["path"] for r in recs] == ["/slow"] and recs[0]["outcome"]["status"] == 200
    assert sidecar.upstream.requests()[-1]["path"] == "/slow"


def test_with_keyless_down_connections_fail_instead_of_bypassing(sidecar: Sidecar) -> None:
    k = sidecar.keyless
    if k.proc is not None and k.proc.poll() is None:
        k.signal(signal.SIGKILL)
        k.proc.wait(10)
    accepts = sidecar.upstream.count("accept")
    for url in ("http://api.example/v1/x", "https://api.example/v1/x"):
        out = sidecar.curl("-k", "-o", "/dev/null", "-w", "%{http_code}", url)
        assert out.returncode == 7, out  # curl: failed to connect
    assert sidecar.upstream.count("accept") == accepts

