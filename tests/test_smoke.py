"""The shortest end-to-end path: curl through Keyless to a real HTTPS upstream."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness import Keyless, Upstream, base_config, wait_for_audit


def test_curl_gets_injected_static_key(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "key").write_text("canary-static-0123456789\n")
    cfg = base_config(tmp_path, upstream, credentials={
        "demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")},
        "workload-jwt": {"type": "jwt"},
    })
    k = Keyless(tmp_path, cfg).start()
    try:
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                              "-H", "Authorization: Bearer app-own", upstream.url("/v1/invoices")],
                             env=k.client_env(), capture_output=True, text=True, timeout=30)
        assert out.stdout == "200", out.stderr
    finally:
        log = k.stop()
    assert len(upstream.received) == 1
    assert upstream.received[0].headers["authorization"] == "Bearer canary-static-0123456789"
    records = wait_for_audit(k, 1)
    assert len(records) == 1 and records[0]["credential"]["name"] == "demo-api"
    assert "canary-static" not in log and "canary-static" not in k.audit_file.read_text()
