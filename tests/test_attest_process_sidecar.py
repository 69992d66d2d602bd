"""The ``process`` provider in a transparent sidecar: the kernel redirects the app's traffic and
Keyless names the process behind each connection. Real network namespaces, real iptables rules
(from ``keyless iptables --apply``), a real client process under another uid.

    app namespace 10.200.3.1 ── veth ── 10.200.3.2 api.example   upstream namespace
      curl as uid 65534 and as root, no proxy settings
      Keyless as uid 10001 (+CAP_SYS_PTRACE to read other users' /proc/<pid>/fd) on :15001
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from proxy.demo import free_port
from tests.harness import base_config
from tests.netns import KEYLESS_UID, NsKeyless, NsUpstream, Topology, require_netns

API = "10.200.3.2"
NOBODY = 65534
CURL = os.path.realpath(shutil.which("curl") or "/usr/bin/curl")

POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "not granted"}

decision := {"allow": true, "reason": "nobody's curl may call the api"} if {
	input.identity.id == "spiffe://test/nobody-curl"
}
"""


class PtraceKeyless(NsKeyless):
    """NsKeyless with CAP_SYS_PTRACE: what reading another uid's /proc/<pid>/fd takes."""

    caps = "+dac_read_search,+sys_ptrace"


def test_transparent_sidecar_attributes_the_calling_process(tmp_path: Path) -> None:
    require_netns()
    topo = Topology({"api.example": API})
    try:
        app, up = topo.ns("app"), topo.ns("up")
        topo.link(app, "10.200.3.1/24", up, [f"{API}/24"])
        upstream = NsUpstream(topo, up, tmp_path / "upstream", [API], ("api.example",))
        res = topo.exec(app, sys.executable, "-m", "proxy.cli", "iptables", "--apply", f"--uid={KEYLESS_UID}")
        assert res.returncode == 0, res.stderr
        (tmp_path / "policies").mkdir()
        (tmp_path / "policies" / "egress.rego").write_text(POLICY)
        kdir = tmp_path / "keyless"
        cfg = base_config(
            kdir, listen={"address": "127.0.0.1", "port": 15001, "mode": "transparent"},
            admin={"address": "127.0.0.1", "port": free_port()}, tls={"ca_dir": str(kdir / "ca")},
            trust=[{"name": "local", "type": "process",
                    "workloads": [{"id": "spiffe://test/nobody-curl", "uid": NOBODY, "exe": CURL}]}],
            policy={"dir": str(tmp_path / "policies")})
        keyless = PtraceKeyless(topo, app, kdir, cfg).start()
        try:
            def curl(*prefix: str) -> str:
                out = topo.exec(app, *prefix, "curl", "-sS", "--max-time", "15", "-o", "/dev/null",
                                "-w", "%{http_code}", "http://api.example/v1/x")
                return out.stdout

            as_nobody = curl("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
            as_root = curl()
        finally:
            keyless.stop()
        assert (as_nobody, as_root) == ("200", "403")
        records = keyless.wait_audit(2)
        assert records[0]["identity"]["id"] == "spiffe://test/nobody-curl"
        facts = records[0]["identity"]["attestations"][0]["facts"]
        assert (facts["uid"], facts["exe"]) == (NOBODY, CURL)
        assert records[1]["identity"]["attestations"][0]["facts"]["uid"] == 0
        assert len(upstream.requests()) == 1
    finally:
        topo.close()
