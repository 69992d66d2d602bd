"""The ``process`` trust provider: a real client process under another uid, attributed by /proc."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from proxy.trust import Caller
from proxy.trust.process import ProcessOptions, ProcessProvider, ProcReader
from tests.harness import Keyless, Upstream, base_config, wait_for_audit
from tests.issuer import allow_identified_policy

CURL = os.path.realpath(shutil.which("curl") or "/usr/bin/curl")
NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_client_under_another_uid_is_attributed(tmp_path: Path, upstream: Upstream) -> None:
    trust = [{"name": "local", "type": "process",
              "workloads": [{"id": "spiffe://demo.local/nobody-curl", "uid": NOBODY, "exe": CURL}]}]
    cfg = base_config(tmp_path, upstream, trust=trust, policy={"dir": str(allow_identified_policy(tmp_path))})
    k = Keyless(tmp_path, cfg).start()
    try:
        def curl(*prefix: str) -> str:
            out = subprocess.run([*prefix, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                  "-x", k.proxy_url, upstream.url("/v1/x", tls=False)],
                                 capture_output=True, text=True, timeout=30)
            return out.stdout

        as_nobody = curl("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        as_root = curl()
    finally:
        k.stop()
    assert (as_nobody, as_root) == ("200", "403")
    records = wait_for_audit(k, 2)
    nobody = records[0]["identity"]
    assert nobody["id"] == "spiffe://demo.local/nobody-curl"
    facts = nobody["attestations"][0]["facts"]
    assert facts["uid"] == NOBODY and facts["gid"] == NOBODY
    assert facts["user"] == pwd.getpwuid(NOBODY).pw_name
    assert facts["exe"] == CURL
    assert facts["sha256"] == hashlib.sha256(Path(CURL).read_bytes()).hexdigest()
    assert isinstance(facts["pid"], int) and isinstance(facts["start_time"], int)
    root = records[1]["identity"]
    assert root["id"] is None and root["attestations"][0]["facts"]["uid"] == 0


def _connected_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    client = socket.create_connection(srv.getsockname())
    accepted, _ = srv.accept()
    return srv, client, accepted


def test_unknown_connection_contributes_nothing(tmp_path: Path) -> None:
    # A procfs with no matching socket, as seen from another network namespace.
    (tmp_path / "net").mkdir()
    for t in ("tcp", "tcp6"):
        (tmp_path / "net" / t).write_text("  sl  local_address rem_address   st\n")
    provider = ProcessProvider("p", ProcessOptions(proc_root=tmp_path))
    got = asyncio.run(provider.attest(Caller("127.0.0.1", 40000, "127.0.0.1", 8080, connection_id="c1")))
    assert got is None


class ReusedPid(ProcReader):
    """The OS seam: a process whose start time changes while Keyless reads it (pid reuse)."""

    calls = 0

    def start_time(self, pid: int) -> int | None:
        self.calls += 1
        return self.calls


def test_pid_reuse_is_detected() -> None:
    srv, client, accepted = _connected_pair()
    pid = os.fork()
    if pid == 0:  # the child holds the client socket; the parent (the "proxy") must not
        accepted.close()
        srv.close()
        time.sleep(5)
        os._exit(0)
    client.close()
    try:
        peer, local = accepted.getpeername(), accepted.getsockname()
        honest = ProcReader(Path("/proc")).lookup(peer[0], peer[1], local)
        assert honest is not None and honest["pid"] == pid
        assert ReusedPid(Path("/proc")).lookup(peer[0], peer[1], local) is None
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        accepted.close()
        srv.close()


@pytest.mark.parametrize("client_family,connect_to", [
    (socket.AF_INET6, "::1"), (socket.AF_INET6, "::ffff:127.0.0.1"), (socket.AF_INET, "127.0.0.1")])
def test_socket_found_over_ipv6_and_dual_stack(client_family: int, connect_to: str) -> None:
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::", 0))
    srv.listen()
    client = socket.socket(client_family)
    client.connect((connect_to, srv.getsockname()[1]))
    accepted, _ = srv.accept()
    try:
        peer, local = accepted.getpeername(), accepted.getsockname()
        inode = ProcReader(Path("/proc")).socket_inode(peer[0], peer[1], (local[0], local[1]))
        assert inode == os.fstat(client.fileno()).st_ino
    finally:
        for s in (client, accepted, srv):
            s.close()
