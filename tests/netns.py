"""Real network namespaces for the sidecar and gateway tests.

Every address lives in 10.200.0.0/16 and only inside namespaces created here; the host's own
interfaces, routes and firewall are never touched (veth pairs are created in the host namespace
for an instant and moved away before any address is assigned). Names carry a per-run tag so
concurrent runs cannot collide, and ``Topology.close`` deletes everything even after a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.demo import make_tls_files
from tests.harness import REPO

KEYLESS_UID = 10001  # the uid the Dockerfile runs as and `keyless iptables` excludes


TOOLS = ("ip", "iptables", "ip6tables", "curl", "setpriv")


def skip_reason(tools: tuple[str, ...] = TOOLS) -> str | None:
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns, iptables)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"network-namespace tests need {tool!r} (CI installs it in .ci/run)"
    probe = f"klprobe{secrets.token_hex(3)}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def require_netns(tools: tuple[str, ...] = TOOLS) -> None:
    reason = skip_reason(tools)
    if reason:
        pytest.skip(reason)


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


class Topology:
    """Namespaces joined by veth pairs; ``hosts`` become each namespace's /etc/hosts."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.tag = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.hosts = hosts
        self.procs: list[subprocess.Popen[bytes]] = []

    def ns(self, role: str) -> str:
        name = f"kl{self.tag}{role}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        # `ip netns exec` bind-mounts /etc/netns/<name>/hosts over /etc/hosts for that command.
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for h, ip in self.hosts.items()))
        return name

    def link(self, a: str, a_addr: str, b: str, b_addrs: list[str], v6: tuple[str, str] | None = None) -> None:
        """A veth pair between namespaces a and b with the given addresses (v6: one per side)."""
        ia, ib = f"kv{self.tag}{len(self.namespaces)}{secrets.token_hex(1)}", f"kw{self.tag}{secrets.token_hex(2)}"
        sh("ip", "link", "add", ia[:15], "netns", a, "type", "veth", "peer", "name", ib[:15], "netns", b)
        sh("ip", "-n", a, "addr", "add", a_addr, "dev", ia[:15])
        for addr in b_addrs:
            sh("ip", "-n", b, "addr", "add", addr, "dev", ib[:15])
        if v6 is not None:
            # nodad: usable at once instead of after duplicate address detection.
            sh("ip", "-n", a, "addr", "add", v6[0], "dev", ia[:15], "nodad")
            sh("ip", "-n", b, "addr", "add", v6[1], "dev", ib[:15], "nodad")
        sh("ip", "-n", a, "link", "set", ia[:15], "up")
        sh("ip", "-n", b, "link", "set", ib[:15], "up")

    def exec(self, ns: str, *cmd: str, timeout: float = 30, env: dict[str, str] | None = None,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                             timeout=timeout, env=env if env is not None else clean_env())
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {ns}: {res.stderr.strip()}")
        return res

    def spawn(self, ns: str, *cmd: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                 env=env if env is not None else clean_env(), cwd=REPO)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for name in self.namespaces:
            # Deleting a namespace deletes its veth ends (and so their peers) and its rules.
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def clean_env() -> dict[str, str]:
    """The test's environment without any proxy or CA settings: the app is configured for nothing."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "requests_ca_bundle",
            "curl_ca_bundle"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in drop}
    env["PYTHONPATH"] = str(REPO)
    return env


class NsUpstream:
    """``tests.netns_upstream`` in a namespace; reads back what it recorded."""

    def __init__(self, topo: Topology, ns: str, directory: Path, listen: list[str], names: tuple[str, ...]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca, cert, key = make_tls_files(directory, names)
        self.events_file = directory / "events.jsonl"
        topo.spawn(ns, sys.executable, "-m", "tests.netns_upstream", "--events", str(self.events_file),
                   "--cert", str(cert), "--key", str(key), *[f"--listen={a}" for a in listen],
                   log=directory / "upstream.log")
        deadline = time.monotonic() + 20
        while not any(e["kind"] == "ready" for e in self.events()):
            if time.monotonic() > deadline:
                raise RuntimeError("upstream did not start: " + (directory / "upstream.log").read_text()[-2000:])
            time.sleep(0.1)

    def events(self) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        return [json.loads(line) for line in self.events_file.read_text().splitlines() if line.strip()]

    def count(self, kind: str, listener: str | None = None) -> int:
        return sum(1 for e in self.events() if e["kind"] == kind and (listener is None or e["listener"] == listener))

    def requests(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["kind"] == "request"]


class NsKeyless:
    """``keyless run`` inside a namespace, as the dedicated uid the iptables rules exclude."""

    def __init__(self, topo: Topology, ns: str, directory: Path, config: dict[str, Any]) -> None:
        self.topo, self.ns, self.dir, self.config = topo, ns, directory, config
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, KEYLESS_UID, KEYLESS_UID)
        self.config_file = directory / "keyless.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log_file = directory / "keyless.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca_cert(self) -> Path:
        return Path(self.config["tls"]["ca_dir"]) / "mitmproxy-ca-cert.pem"

    @property
    def audit_file(self) -> Path:
        return Path(self.config["audit"]["path"])

    # Capabilities the unprivileged Keyless process keeps (setpriv syntax).
    caps = "+dac_read_search"

    def start(self) -> NsKeyless:
        # Not root: its uid is what the REDIRECT rule skips. The interpreter may live under a
        # directory only root can traverse (/root/.pyenv), hence the one read-search capability.
        self.proc = self.topo.spawn(
            self.ns, "setpriv", f"--reuid={KEYLESS_UID}", f"--regid={KEYLESS_UID}", "--clear-groups",
            f"--inh-caps={self.caps}", f"--ambient-caps={self.caps}",
            sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config_file), "--log-level", "debug",
            log=self.log_file)
        admin = f"http://127.0.0.1:{self.config['admin']['port']}/readyz"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keyless exited {self.proc.returncode}: {self.log_file.read_text()[-3000:]}")
            if self.topo.exec(self.ns, "curl", "-sf", "-o", "/dev/null", admin).returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError("keyless did not become ready: " + self.log_file.read_text()[-3000:])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        # `ip netns exec` execs setpriv which execs python: the pid is Keyless's own.
        os.kill(self.proc.pid, sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines() if line.strip()]

    def wait_audit(self, count: int, timeout: float = 5) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.audit()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.audit()
