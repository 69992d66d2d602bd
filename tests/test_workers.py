"""``listen.workers``: several real Keyless processes on one port, one CA, one key, one audit log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from proxy.config import parse_config
from proxy.demo import free_port
from proxy.errors import ConfigError
from tests.harness import Keyless, Upstream, base_config, wait_for_audit


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def established_on(pid: int, port: int, state: str = "01") -> int:
    """How many TCP sockets in ``state`` (01 ESTABLISHED, 0A LISTEN) on local ``port`` ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == state and f[9] in inodes:
                count += 1
    return count


def get_through(proxy_port: int, url: str, host: str) -> socket.socket:
    """One absolute-form GET on a fresh connection, which is left open (keep-alive)."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    s.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return s


def test_two_workers_share_port_ca_key_and_audit_log(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "key").write_text("canary-workers-0123456789\n")
    cfg = base_config(tmp_path, upstream, credentials={
        "demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")}})
    cfg["listen"]["workers"] = 2
    k = Keyless(tmp_path, cfg).start()
    port = cfg["listen"]["port"]
    held: list[socket.socket] = []
    try:
        assert k.proc is not None
        workers = children(k.proc.pid)
        assert len(workers) == 2
        # /readyz answered from one worker; wait until both have bound the proxy port.
        deadline = time.monotonic() + 15
        while not all(established_on(w, port, "0A") for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The kernel spreads new connections over both workers (SO_REUSEPORT hashes the
        # 4-tuple): with 24 connections held open, both must hold some.
        host = f"127.0.0.1:{upstream.http_port}"
        held = [get_through(port, f"http://{host}/v1/w{i}", host) for i in range(24)]
        time.sleep(0.2)
        per_worker = [established_on(w, port) for w in workers]
        assert sum(per_worker) == 24 and all(n > 0 for n in per_worker), per_worker
        # HTTPS through both workers: one CA for all of them, or clients would reject some.
        env = k.client_env()
        for i in range(16):
            r = requests.get(upstream.url(f"/v1/tls{i}", host="127.0.0.1"),
                             proxies={"https": k.proxy_url}, verify=env["REQUESTS_CA_BUNDLE"], timeout=10)
            assert r.status_code == 200
        # Every worker serves the admin port with the same signing key.
        kids = {tuple(k["kid"] for k in requests.get(k.admin_url + "/jwks.json", timeout=5,
                                                       headers={"Connection": "close"}).json()["keys"])
                for _ in range(12)}
        assert len(kids) == 1
    finally:
        for s in held:
            s.close()
        log = k.stop()
    records = wait_for_audit(k, 40)
    assert len(records) == 40  # every line whole, parsed as JSON by audit()
    assert all(r["outcome"]["status"] == 200 for r in records)
    assert len({r["decision_id"] for r in records}) == 40
    assert sum(1 for r in upstream.received if r.headers["authorization"] == "Bearer canary-workers-0123456789") == 40
    assert "canary-workers" not in log and "canary-workers" not in k.audit_file.read_text()
    # SIGTERM to the supervisor stops every worker.
    for w in workers:
        assert not Path(f"/proc/{w}").exists() or "Z" in Path(f"/proc/{w}/stat").read_text().split()[2]


def test_worker_death_stops_the_rest(tmp_path: Path, upstream: Upstream) -> None:
    cfg = base_config(tmp_path, upstream)
    cfg["listen"]["workers"] = 2
    k = Keyless(tmp_path, cfg).start()
    try:
        assert k.proc is not None
        first, second = children(k.proc.pid)
        os.kill(first, 9)
        assert k.proc.wait(15) == 1
        deadline = time.monotonic() + 5
        while Path(f"/proc/{second}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{second}").exists()
    finally:
        log = k.stop()
    assert "exited with -9; stopping the others" in log


def test_workers_config_errors(tmp_path: Path) -> None:
    raw = {"listen": {"port": 0, "workers": 2}, "admin": {"port": 0}, "tls": {"ca_dir": str(tmp_path)},
           "policy": {"dir": str(Path(__file__).parent.parent / "policies")}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "k.yaml")
    assert any(p.startswith("listen.port:") for p in e.value.problems)
    assert any(p.startswith("admin.port:") for p in e.value.problems)
    raw["listen"] = {"port": free_port(), "workers": 0}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "k.yaml")
    assert any(p.startswith("listen.workers:") for p in e.value.problems)


def test_audit_lines_stay_whole_across_processes(tmp_path: Path) -> None:
    """Two processes appending large records at once: every line parses."""
    path = tmp_path / "audit.log"
    # Separate interpreters rather than os.fork(): pytest's process has threads (upstream servers).
    writer = ("import sys\nfrom proxy.audit import JsonLinesSink\n"
              "from proxy.audit.event import AuditEvent, Outcome, RequestRecord\n"
              "from proxy.model import ANONYMOUS, Source\n"
              "sink = JsonLinesSink(sys.argv[1])\n"
              "for i in range(300):\n"
              "    sink.emit(AuditEvent(f'{sys.argv[2]}-{i}', '', Source('', 0), ANONYMOUS,\n"
              "        RequestRecord('GET', 'https', 'h', 443, '/' + 'x' * 20000), None, '', '', None,\n"
              "        Outcome(200), 0.0))\n"
              "sink.close()\n")
    repo = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path), str(n)], cwd=repo) for n in range(2)]
    for proc in procs:
        assert proc.wait(60) == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 600
    seen = sorted(tuple(map(int, d["decision_id"].split("-"))) for d in map(json.loads, lines))
    assert seen == [(n, i) for n in range(2) for i in range(300)]
