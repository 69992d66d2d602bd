"""The audit trail under real faults, end to end: a real Keyless, a real upstream, real clients.

- the audit file on a 256 KiB tmpfs that fills up mid-run: no credentialed request is forwarded
  without its record, /readyz turns not-ready, the errno is logged once, and everything (spooled
  records included) is written when space returns; the log then verifies;
- SIGTERM while a forwarded request outlives ``drain_seconds``: its ``drain_timeout`` record is
  in the log, the final checkpoint follows, and Keyless exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.harness import REPO, Keyless, Upstream, base_config

POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "not listed"}

decision := {"allow": true, "reason": "credentialed", "credential": "key"} if startswith(input.request.path, "/cred")

decision := {"allow": true, "reason": "plain"} if startswith(input.request.path, "/plain")
"""
SECRET = "canary-audit-secret-0123456789"


def setup(tmp: Path, upstream: Upstream, audit_path: Path, **audit: Any) -> Keyless:
    (tmp / "policy").mkdir()
    (tmp / "policy" / "egress.rego").write_text(POLICY)
    (tmp / "key").write_text(SECRET + "\n")
    cfg = base_config(tmp, upstream, policy={"dir": str(tmp / "policy")},
                      credentials={"key": {"type": "static", "from": "file", "file": str(tmp / "key")}},
                      audit={"path": str(audit_path), "checkpoint": {"key_file": str(tmp / "audit-key.pem"),
                                                                     "every_records": 10}, **audit})
    return Keyless(tmp, cfg)


def get(k: Keyless, url: str, timeout: float = 20) -> requests.Response:
    proxies = {"http": k.proxy_url, "https": k.proxy_url}
    return requests.get(url, proxies=proxies, verify=str(k.ca_cert), timeout=timeout)


def verify_log(k: Keyless, path: Path) -> subprocess.CompletedProcess[str]:
    key = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "key", "-c", str(k.config_file)],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    return subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify", str(path), "--key", key],
                          capture_output=True, text=True, cwd=REPO)


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    where = Path(tempfile.mkdtemp(prefix="keyless-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "-l", str(where)])
        where.rmdir()


def fill(fs: Path) -> Path:
    """Fill ``fs`` to the last byte: whole pages first, then single bytes."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def test_full_disk_refuses_credentials_until_space_returns(tmp_path: Path, tiny_fs: Path) -> None:
    upstream = Upstream(tmp_path / "up").start()
    audit_path = tiny_fs / "audit.log"
    k = setup(tmp_path, upstream, audit_path, spool_records=50)
    k.start()
    try:
        for i in range(5):
            assert get(k, upstream.url(f"/cred/before/{i}", tls=False)).status_code == 200
        filler = fill(tiny_fs)
        statuses: list[int] = []
        codes: set[str] = set()
        for i in range(40):
            r = get(k, upstream.url(f"/cred/full/{i}", tls=False))
            statuses.append(r.status_code)
            if r.status_code != 200:
                body = r.json()
                codes.add(body["error"])
                assert r.headers["Keyless-Decision-Id"] == body["decision_id"]
        # The page the file's tail sat in may take a few more records; then writes fail and
        # every credentialed request after the first failed write is refused.
        assert codes == {"audit_unavailable"}, statuses
        first_refused = statuses.index(503)
        assert all(s == 503 for s in statuses[first_refused:]), statuses
        ready = requests.get(k.admin_url + "/readyz", timeout=5)
        assert ready.status_code == 503
        sink = ready.json()["audit"]["sinks"][0]
        assert sink["up"] is False and sink["error"].startswith("ENOSPC")
        # The tail page's slack took part of a line: that partial write was truncated away.
        assert sink["rollbacks"] >= 1
        log = k.log_file.read_text()
        assert log.count("cannot write: ENOSPC") == 1 and str(audit_path) in log
        # Space returns: the spool drains within a tick, readiness and forwarding come back.
        filler.unlink()
        deadline = time.monotonic() + 10
        while requests.get(k.admin_url + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "audit sink did not recover"
            time.sleep(0.2)
        assert "recovered" in k.log_file.read_text()
        assert get(k, upstream.url("/cred/after", tls=False)).status_code == 200
    finally:
        assert k.proc is not None
        k.stop()
    assert k.proc.returncode == 0
    text = audit_path.read_text()
    assert text.endswith("\n") and SECRET not in text
    records = k.audit()
    by_id = {r["decision_id"]: r for r in records}
    forwarded = [rec for rec in upstream.received if rec.path.startswith("/cred")]
    assert all(rec.headers.get("authorization") == f"Bearer {SECRET}" for rec in forwarded)
    # Every request that reached the upstream with the credential has its record.
    credentialed = [r for r in records if r["credential"] is not None and r["outcome"]["status"] == 200]
    assert len(credentialed) == len(forwarded) == 5 + first_refused + 1
    refused = [r for r in records if r["outcome"]["error"] == "audit_unavailable"]
    assert len(refused) == 40 - first_refused and all(r["credential"] is None for r in refused)
    assert len(by_id) == len(records) == 5 + 40 + 1
    out = verify_log(k, audit_path)
    assert out.returncode == 0, out.stderr
    upstream.stop()


def test_sigterm_cuts_a_long_request_with_its_record(tmp_path: Path) -> None:
    started = threading.Event()

    def slow(rec: Any) -> int:
        if rec.path == "/cred/slow":
            started.set()
            time.sleep(4)
        return 200

    upstream = Upstream(tmp_path / "up", check=slow).start()
    audit_path = tmp_path / "audit.log"
    k = setup(tmp_path, upstream, audit_path)
    k.config["listen"]["drain_seconds"] = 1.0
    k.config_file.write_text(__import__("yaml").safe_dump(k.config))
    k.start()
    assert get(k, upstream.url("/cred/quick", tls=False)).status_code == 200
    result: dict[str, Any] = {}

    def call() -> None:
        with contextlib.suppress(requests.RequestException):
            result["r"] = get(k, upstream.url("/cred/slow", tls=False), timeout=10)

    t = threading.Thread(target=call)
    t.start()
    assert started.wait(10)
    assert k.proc is not None
    began = time.monotonic()
    k.proc.terminate()
    assert k.proc.wait(15) == 0
    assert time.monotonic() - began < 3.5, "drain did not end at drain_seconds"
    t.join(10)
    records = k.audit(chain_records=True)
    slow_rec = [r for r in records if (r.get("request") or {}).get("path") == "/cred/slow"]
    assert len(slow_rec) == 1
    rec = slow_rec[0]
    assert rec["outcome"]["error"] == "drain_timeout" and rec["credential"]["name"] == "key"
    assert records[-1]["type"] == "checkpoint" and records[-1]["note"].splitlines()[3] == "final"
    assert "r" not in result or result["r"].status_code != 200
    out = verify_log(k, audit_path)
    assert out.returncode == 0, out.stderr
    upstream.stop()


def test_workers_keep_one_chain_each_in_the_shared_file(tmp_path: Path) -> None:
    upstream = Upstream(tmp_path / "up").start()
    audit_path = tmp_path / "audit.log"
    k = setup(tmp_path, upstream, audit_path)
    k.config["listen"]["workers"] = 2
    k.config_file.write_text(__import__("yaml").safe_dump(k.config))
    k.start()
    for i in range(30):
        assert get(k, upstream.url(f"/cred/w/{i}", tls=False)).status_code == 200
    assert k.proc is not None
    k.stop()
    assert k.proc.returncode == 0
    records = k.audit()
    assert len(records) == 30
    chains = {r["chain"] for r in records}
    finals = [r for r in k.audit(chain_records=True) if r.get("type") == "checkpoint"
              and r["note"].splitlines()[3] == "final"]
    assert {r["chain"] for r in finals} == chains
    out = verify_log(k, audit_path)
    assert out.returncode == 0 and f"in {len(chains)} chain(s)" in out.stdout, out.stderr
    upstream.stop()
