"""Identity is never read from headers the app controls; they are stripped before forwarding."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness import Keyless, Upstream, base_config, wait_for_audit

SPOOFS = {
    "X-Forwarded-For": "10.1.2.3",
    "Forwarded": "for=10.1.2.3;by=keyless",
    "X-Real-IP": "10.1.2.3",
    "X-Forwarded-Client-Cert": 'By=spiffe://prod/keyless;URI=spiffe://prod/ns/payments/sa/billing',
    "X-Spiffe-Id": "spiffe://prod/ns/payments/sa/billing",
    "Client-Cert": ":MIIB:",
}

# Allows whoever is identified and echoes the header names the policy was shown.
POLICY = """package keyless.egress

import rego.v1

shown := sort([k | input.request.headers[k]])

default decision := {"allow": false, "reason": "anonymous"}

decision := {"allow": true, "reason": sprintf("%s saw %v", [input.identity.id, shown])} if {
	input.identity.id != null
}
"""


def test_spoofed_identity_headers_are_ignored_and_stripped(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "p.rego").write_text(POLICY)
    trust = [{"name": "net", "type": "source_ip", "workloads": [
        {"cidr": "10.0.0.0/8", "id": "spiffe://prod/ns/payments/sa/billing"},
        {"cidr": "127.0.0.2/32", "id": "spiffe://demo.local/loopback-2"}]}]
    k = Keyless(tmp_path, base_config(tmp_path, upstream, trust=trust, policy={"dir": str(tmp_path / "policy")}))
    k.start()
    headers = [a for name, value in SPOOFS.items() for a in ("-H", f"{name}: {value}")]
    try:
        def curl(*extra: str) -> str:
            out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *headers, *extra,
                                  upstream.url("/v1/x")], env=k.client_env(), capture_output=True, text=True,
                                 timeout=30)
            return out.stdout

        from_loopback_1 = curl()  # 127.0.0.1 is not mapped: the headers must not make it billing
        from_loopback_2 = curl("--interface", "127.0.0.2")
    finally:
        k.stop()
    assert (from_loopback_1, from_loopback_2) == ("403", "200")
    records = wait_for_audit(k, 2)
    assert records[0]["identity"]["id"] is None
    assert records[1]["identity"]["id"] == "spiffe://demo.local/loopback-2"
    shown = records[1]["decision"]["reason"].lower()
    assert "user-agent" in shown, shown  # the policy did see the ordinary headers
    assert all(name.lower() not in shown for name in SPOOFS), shown
    assert len(upstream.received) == 1
    assert not {n.lower() for n in SPOOFS} & upstream.received[0].headers.keys()
