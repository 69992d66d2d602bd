"""Destination rules (proxy.egress), `keyless iptables` output, and their config, without root.

The end-to-end tests at the bottom run the real proxy in regular (HTTP_PROXY) mode: TLS
origination and the cleartext rule apply there too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import load_config
from proxy.egress import CleartextAllowance, Egress, EgressConfig, Origination
from proxy.errors import ConfigError, KeylessError
from proxy.iptables import RuleOptions, rules, script
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit


def _egress(**kw: object) -> Egress:
    async def resolve(host: str, port: int) -> list[str]:
        # A stand-in for the system resolver (the namespace tests use the real one).
        return {"api.example": ["10.0.0.2"], "v6.example": ["2001:db8::2"]}.get(host, [])

    return Egress(EgressConfig(**kw), [("127.0.0.1", 15001)], resolve)  # type: ignore[arg-type]


def test_plain_http_host_must_resolve_to_original_destination() -> None:
    e = _egress()
    run = asyncio.run
    assert run(e.transparent_host(dst=("10.0.0.2", 80), tls=False, sni=None, host_header="API.example:80")) \
        == "api.example"
    with pytest.raises(KeylessError) as bad:
        run(e.transparent_host(dst=("10.0.0.9", 80), tls=False, sni=None, host_header="api.example"))
    assert bad.value.code == "misdirected_request"
    with pytest.raises(KeylessError):
        run(e.transparent_host(dst=("10.0.0.9", 80), tls=False, sni=None, host_header="10.0.0.2"))
    with pytest.raises(KeylessError):
        run(e.transparent_host(dst=("10.0.0.2", 80), tls=False, sni=None, host_header="unknown.example"))
    assert run(e.transparent_host(dst=("2001:db8::2", 80), tls=False, sni=None, host_header="[2001:db8::2]:80")) \
        == "2001:db8::2"
    # TLS: the name is the SNI (the upstream certificate check binds it to the address).
    assert run(e.transparent_host(dst=("10.0.0.9", 443), tls=True, sni="api.example", host_header=None)) \
        == "api.example"
    assert run(e.transparent_host(dst=("10.0.0.9", 443), tls=True, sni=None, host_header=None)) == "10.0.0.9"


def test_credentials_never_leave_in_cleartext_unless_allowed() -> None:
    e = _egress(allow_cleartext=(CleartextAllowance("legacy.example", 8080),))
    e.check_injection(credential="k", scheme="https", host="api.example", port=443)
    e.check_injection(credential=None, scheme="http", host="api.example", port=80)
    e.check_injection(credential="k", scheme="http", host="127.0.0.1", port=9000)  # loopback: stays on the host
    e.check_injection(credential="k", scheme="http", host="localhost", port=9000)
    e.check_injection(credential="k", scheme="http", host="legacy.example", port=8080)
    for host, port in (("legacy.example", 80), ("api.example", 80), ("10.0.0.2", 80)):
        with pytest.raises(KeylessError) as refused:
            e.check_injection(credential="k", scheme="http", host=host, port=port)
        assert refused.value.code == "forbidden" and "cleartext" in refused.value.message
    with pytest.raises(KeylessError) as nosni:
        e.check_injection(credential="k", scheme="https", host="10.0.0.2", port=443, transparent_tls_without_sni=True)
    assert nosni.value.code == "misdirected_request"


def test_connect_gate() -> None:
    e = _egress(refused_ports=(25,))
    e.check_connect(("API.example", 443), {("api.example", 443)})
    for address, allowed in ((("api.example", 443), set()), (("api.example", 25), {("api.example", 25)}),
                             (("127.0.0.1", 15001), {("127.0.0.1", 15001)}), (None, set())):
        with pytest.raises(KeylessError):
            e.check_connect(address, allowed)  # type: ignore[arg-type]
    wild = Egress(EgressConfig(), [("0.0.0.0", 15001)])  # noqa: S104
    for local in ("127.0.0.1", "127.0.0.2", "localhost"):
        with pytest.raises(KeylessError):
            wild.check_connect((local, 15001), {(local, 15001)})
    # A remote host (not an address of this machine) on the same port is somebody else's API.
    wild.check_connect(("192.0.2.10", 15001), {("192.0.2.10", 15001)})
    wild.check_connect(("api.example", 15001), {("api.example", 15001)})


def test_origination_only_for_marked_cleartext_destinations() -> None:
    e = _egress(tls_origination=(Origination("api.example", 80, 443),))
    assert e.origination("API.example.", 80, "http") == Origination("api.example", 80, 443)
    assert e.origination("api.example", 8080, "http") is None
    assert e.origination("api.example", 80, "https") is None


def test_config_names_every_bad_key(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, listen={"mode": "tproxy", "drain_seconds": -1},
                      egress={"refused_ports": [0], "tls_origination": [{"port": 80, "hots": "x"}],
                              "allow_cleartext": "api.example", "typo": 1})
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "k.yaml")
    text = "\n".join(err.value.problems)
    for key in ("listen.mode", "listen.drain_seconds", "egress.refused_ports", "egress.tls_origination[0].host",
                "egress.tls_origination[0].hots", "egress.allow_cleartext", "egress.typo"):
        assert key in text, text


def test_sidecar_rules_exclude_keyless_and_loopback_before_redirecting() -> None:
    cmds = [" ".join(c) for c in rules(RuleOptions(uid=10001, gid=10001), 4)]
    redirect = next(i for i, c in enumerate(cmds) if "REDIRECT" in c)
    for needle in ("-o lo -j RETURN", "--uid-owner 10001 -j RETURN", "--gid-owner 10001 -j RETURN",
                   "-d 127.0.0.0/8 -j RETURN"):
        assert any(needle in c for c in cmds[:redirect]), needle
    assert "--dports 80,443 -j REDIRECT --to-ports 15001" in cmds[redirect]
    assert any("-p udp --dport 443 -j REJECT" in c for c in cmds)
    v6 = [" ".join(c) for c in rules(RuleOptions(), 6)]
    assert all(c.startswith("ip6tables") for c in v6) and any("icmp6-port-unreachable" in c for c in v6)
    assert "ip6tables" in script(RuleOptions(), ipv6=True) and "ip6tables" not in script(RuleOptions(), ipv6=False)


def test_gateway_rules_redirect_prerouting_and_forward_nothing() -> None:
    cmds = [" ".join(c) for c in rules(RuleOptions(gateway=True, sources=("10.1.0.0/16",), ports=None), 4)]
    assert "iptables -t nat -A PREROUTING -s 10.1.0.0/16 -p tcp -j KEYLESS" in cmds
    assert "iptables -t nat -A KEYLESS -p tcp -j REDIRECT --to-ports 15001" in cmds
    assert "iptables -A FORWARD -j REJECT --reject-with icmp-port-unreachable" in cmds
    assert not any("owner" in c for c in cmds)


def test_iptables_cli_prints_and_validates() -> None:
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "iptables", "--ipv6", "on", "--uid", "4242"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--uid-owner 4242" in out.stdout and "ip6tables" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "iptables", "--ports", "0"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--ports" in bad.stderr


TEST_POLICY = """package keyless.egress

import rego.v1

decision := {"allow": true, "reason": "test", "credential": "k"}
"""


def test_regular_mode_tls_origination(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "key").write_text("canary-orig-4c1d\n")
    cfg = base_config(tmp_path, upstream, credentials={"k": {"type": "static", "from": "file",
                                                              "file": str(tmp_path / "key")}},
                      egress={"tls_origination": [{"host": "localhost", "port": upstream.http_port,
                                                   "upstream_port": upstream.https_port}]})
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "egress.rego").write_text(TEST_POLICY)
    cfg["policy"] = {"dir": str(tmp_path / "pol")}
    k = Keyless(tmp_path, cfg).start()
    try:
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                              upstream.url("/v1/x", tls=False)], env=k.client_env(), capture_output=True,
                             text=True, timeout=30)
        assert out.stdout == "200", out.stderr
    finally:
        k.stop()
    assert [(r.scheme, r.headers["authorization"]) for r in upstream.received] == [("https", "Bearer canary-orig-4c1d")]
    assert wait_for_audit(k, 1)[0]["request"]["upstream"] == f"https://localhost:{upstream.https_port}"


def test_regular_mode_refuses_credential_on_cleartext_hop(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "key").write_text("canary-clear-88e1\n")
    cfg = base_config(tmp_path, upstream, credentials={"k": {"type": "static", "from": "file",
                                                              "file": str(tmp_path / "key")}})
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "egress.rego").write_text(TEST_POLICY)
    cfg["policy"] = {"dir": str(tmp_path / "pol")}
    k = Keyless(tmp_path, cfg).start()
    try:
        # A name that is not loopback: the hop would leave the machine in cleartext.
        out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "http://api.invalid/v1/x"],
                             env=k.client_env(), capture_output=True, text=True, timeout=30)
    finally:
        log = k.stop()
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "403" and "cleartext" in body
    assert wait_for_audit(k, 1)[0]["outcome"]["error"] == "forbidden"
    assert "canary-clear" not in log + k.audit_file.read_text()


def test_refused_networks_stop_metadata_and_link_local_destinations() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        # A stand-in for DNS: a name that points at the instance metadata service.
        return {"metadata.example": ["169.254.169.254"], "api.example": ["10.0.0.2"],
                "localhost": ["127.0.0.1"]}.get(host, [])

    e = Egress(EgressConfig(), [("127.0.0.1", 15001)], resolve)
    for address in (("metadata.example", 80), ("169.254.169.254", 80), ("fe80::1", 443)):
        with pytest.raises(KeylessError) as refused:
            asyncio.run(e.check_addresses(address))
        assert refused.value.code == "forbidden" and "refused_networks" in refused.value.message
    asyncio.run(e.check_addresses(("api.example", 443)))
    asyncio.run(e.check_addresses(("localhost", 80)))


def test_refused_networks_end_to_end(tmp_path: Path, upstream: Upstream) -> None:
    """A policy-allowed destination inside egress.refused_networks gets no connection at all."""
    (tmp_path / "key").write_text("refused-net-canary\n")
    cfg = base_config(tmp_path, upstream, egress={"extra_refused_networks": ["127.0.0.1/32"]}, credentials={
        "demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")},
        "workload-jwt": {"type": "jwt"}})
    k = Keyless(tmp_path, cfg).start()
    try:
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-x", k.proxy_url,
                              f"http://127.0.0.1:{upstream.http_port}/v1/x"], capture_output=True, text=True,
                             timeout=30)
        body, status = out.stdout.rsplit("\n", 1)
        # Refused before the credential is minted or a connection exists: Keyless's own JSON answer.
        assert status == "403" and json.loads(body)["error"] == "forbidden"
        records = wait_for_audit(k, 1)
    finally:
        k.stop()
    assert upstream.received == []
    assert records[-1]["outcome"]["error"] == "forbidden" and records[-1]["outcome"]["status"] == 403
    assert "refused_networks" in records[-1]["outcome"]["message"]


def test_embedded_ipv4_forms_own_listener_names_and_localhost_are_checked() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        # A stand-in for DNS: a public-looking name that points back at this host.
        return {"loops.example": ["127.0.0.1"], "localhost": ["127.0.0.1"]}.get(host, [])

    e = Egress(EgressConfig(), [("127.0.0.1", 15001)], resolve)
    for v6 in ("::a9fe:a9fe", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "::ffff:169.254.169.254"):
        with pytest.raises(KeylessError):
            asyncio.run(e.check_addresses((v6, 80)))
    with pytest.raises(KeylessError) as own:
        asyncio.run(e.check_addresses(("loops.example", 15001)))
    assert "own listener" in own.value.message
    asyncio.run(e.check_addresses(("loops.example", 9000)))  # loopback, another port: fine
    strict = Egress(EgressConfig(refused_networks=(ipaddress.ip_network("127.0.0.0/8"),)),
                    [("127.0.0.1", 15001)], resolve)
    with pytest.raises(KeylessError):
        asyncio.run(strict.check_addresses(("localhost", 9000)))


def test_workers_and_transparent_mode_are_refused_together(tmp_path: Path) -> None:
    from proxy.config import parse_config

    raw = {"listen": {"port": 15001, "mode": "transparent", "workers": 2}, "tls": {"ca_dir": str(tmp_path)},
           "policy": {"dir": str(REPO / "policies")}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "k.yaml")
    assert any(p.startswith("listen.workers:") for p in e.value.problems)
