"""``process``: the local process that owns the caller's socket (sidecar and host deployments).

When the app and Keyless share a network namespace, the kernel knows which process opened the
connection: ``/proc/net/tcp{,6}`` maps the connection's two endpoints to a socket inode, and
``/proc/<pid>/fd`` maps the inode to the processes holding it. This is SPIRE's ``unix`` workload
attestor, reached through the TCP connection instead of a Unix socket's peer credentials.

Facts: pid, uid, gid, user, exe, SHA-256 of the executable (cached by device, inode, size and
mtime), container id (from the cgroup path) and the process start time. PID reuse is guarded the
way SPIRE does: the start time is read before and after collecting facts, and the socket must
still belong to the process afterwards; any change and the provider says nothing. Where no socket
matches (the caller is in another network namespace or host) it also says nothing: no guessing.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import pwd
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.confread import Section
from proxy.model import Attestation
from proxy.trust import Caller

_CONTAINER_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")
_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class ProcessWorkload:
    """Selectors that, when all given ones match, name the process ``id``."""

    id: str
    uid: int | None = None
    user: str | None = None
    exe: str | None = None
    sha256: str | None = None
    container_id: str | None = None

    def matches(self, facts: dict[str, Any]) -> bool:
        wanted = {"uid": self.uid, "user": self.user, "exe": self.exe, "sha256": self.sha256,
                  "container_id": self.container_id}
        return all(facts.get(k) == v for k, v in wanted.items() if v is not None)


@dataclass(frozen=True, slots=True)
class ProcessOptions:
    proc_root: Path = Path("/proc")
    workloads: tuple[ProcessWorkload, ...] = ()


def parse(s: Section) -> ProcessOptions:
    root = s.path_value("proc_root", Path("/proc"))
    if not (root / "net" / "tcp").exists():
        s.error(f"{root}/net/tcp not found: the process provider needs Linux procfs", "proc_root")
    rows: list[ProcessWorkload] = []
    raw = s.raw.get("workloads")
    s.has("workloads")
    if raw is not None and not isinstance(raw, list):
        s.error("must be a list of {id, uid, user, exe, sha256, container_id}", "workloads")
        raw = []
    for i, item in enumerate(raw or []):
        w = Section(item, s.key_path(f"workloads[{i}]"), s.problems, s.base_dir)
        row = ProcessWorkload(
            id=w.text("id"), uid=w.integer("uid", None, lo=0, hi=2**32 - 1), user=w.text("user", None),
            exe=w.text("exe", None), sha256=w.text("sha256", None), container_id=w.text("container_id", None))
        if all(v is None for v in (row.uid, row.user, row.exe, row.sha256, row.container_id)):
            w.error("needs at least one selector (uid, user, exe, sha256, container_id)")
        w.done()
        if row.id:
            rows.append(row)
    return ProcessOptions(root, tuple(rows))


def _hex_v4(ip: ipaddress.IPv4Address) -> str:
    return ip.packed[::-1].hex().upper()


def _hex_v6(ip: ipaddress.IPv6Address) -> str:
    # The kernel prints the address as four host-order (little-endian) 32-bit words.
    b = ip.packed
    return "".join(b[i:i + 4][::-1].hex() for i in range(0, 16, 4)).upper()


def _endpoints(address: str, port: int) -> list[tuple[str, str]]:
    """The spellings of address:port in /proc/net/tcp and /proc/net/tcp6."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    out: list[tuple[str, str]] = []
    if isinstance(ip, ipaddress.IPv4Address):
        out.append(("tcp", f"{_hex_v4(ip)}:{port:04X}"))
        out.append(("tcp6", f"{_hex_v6(ipaddress.IPv6Address('::ffff:' + str(ip)))}:{port:04X}"))
    else:
        out.append(("tcp6", f"{_hex_v6(ip)}:{port:04X}"))
    return out


class ProcReader:
    """Blocking reads of one procfs tree; run in a worker thread, never on the event loop."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._hashes: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self._lock = threading.Lock()  # lookups run in worker threads, concurrently

    def socket_inode(self, address: str, port: int, peer: tuple[str, int] | None) -> int | None:
        local = _endpoints(address, port)
        remote = {e for _, e in _endpoints(*peer)} if peer else None
        for table in ("tcp", "tcp6"):
            want = {e for t, e in local if t == table}
            try:
                lines = (self.root / "net" / table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                if len(cols) < 10 or cols[1] not in want:
                    continue
                if remote is not None and cols[2] not in remote:
                    continue
                inode = int(cols[9])
                if inode:
                    return inode
        return None

    def holders(self, inode: int) -> list[int]:
        target = f"socket:[{inode}]"
        me = os.getpid()
        pids: list[int] = []
        for entry in os.scandir(self.root):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                fds = os.scandir(os.path.join(entry.path, "fd"))
            except OSError:
                continue
            with fds:
                for fd in fds:
                    try:
                        if os.readlink(fd.path) == target:
                            pids.append(int(entry.name))
                            break
                    except OSError:
                        continue
        return sorted(pids)

    def start_time(self, pid: int) -> int | None:
        try:
            text = (self.root / str(pid) / "stat").read_text()
        except OSError:
            return None
        # The command name may contain spaces and parentheses: fields resume after the last ')'.
        fields = text[text.rfind(")") + 2:].split()
        return int(fields[19]) if len(fields) > 19 else None

    def still_holds(self, pid: int, inode: int) -> bool:
        target = f"socket:[{inode}]"
        try:
            with os.scandir(self.root / str(pid) / "fd") as fds:
                for fd in fds:
                    try:
                        if os.readlink(fd.path) == target:
                            return True
                    except OSError:
                        continue
        except OSError:
            pass
        return False

    def facts(self, pid: int) -> dict[str, Any] | None:
        base = self.root / str(pid)
        try:
            status = (base / "status").read_text()
            exe = os.readlink(base / "exe")
            cgroup = (base / "cgroup").read_text()
        except OSError:
            return None
        ids: dict[str, int] = {}
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                ids[key] = int(value.split()[0])  # the real id, as SPIRE's unix attestor reports
        if "Uid" not in ids or "Gid" not in ids:
            return None
        try:
            user: str | None = pwd.getpwuid(ids["Uid"]).pw_name
        except KeyError:
            user = None
        matches = _CONTAINER_ID.findall(cgroup)
        return {"pid": pid, "uid": ids["Uid"], "gid": ids["Gid"], "user": user, "exe": exe,
                "sha256": self.exe_sha256(base / "exe"), "container_id": matches[-1] if matches else None}

    def exe_sha256(self, exe: Path) -> str | None:
        # Open through /proc/<pid>/exe: the very file the process runs, even if replaced on disk.
        try:
            with open(exe, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    return None
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                with self._lock:
                    cached = self._hashes.get(key)
                if cached is not None:
                    return cached
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return None
        with self._lock:
            self._hashes[key] = digest
            if len(self._hashes) > 256:
                self._hashes.popitem(last=False)
        return digest

    def lookup(self, address: str, port: int, peer: tuple[str, int] | None) -> dict[str, Any] | None:
        """Facts about the process owning the client end of this connection, or None."""
        inode = self.socket_inode(address, port, peer)
        if inode is None:
            return None
        found: list[dict[str, Any]] = []
        for pid in self.holders(inode):
            before = self.start_time(pid)
            facts = self.facts(pid)
            # PID reuse guard: same start time after reading, and the socket is still its own.
            if (before is None or facts is None or self.start_time(pid) != before
                    or not self.still_holds(pid, inode)):
                continue
            facts["start_time"] = before
            found.append(facts)
        if not found:
            return None
        first = found[0]
        # A socket shared across fork is fine if every holder is the same program and user.
        if any((f["uid"], f["gid"], f["exe"]) != (first["uid"], first["gid"], first["exe"]) for f in found[1:]):
            return None
        return first


class ProcessProvider:
    type = "process"

    def __init__(self, name: str, options: ProcessOptions) -> None:
        self.name = name
        self.options = options
        self.reader = ProcReader(options.proc_root)
        # One lookup per connection: the socket, hence its owner, is fixed for its lifetime.
        self._by_connection: OrderedDict[str, Attestation | None] = OrderedDict()

    async def attest(self, caller: Caller) -> Attestation | None:
        key = caller.connection_id
        if key is not None and key in self._by_connection:
            return self._by_connection[key]
        peer = (caller.local_address, caller.local_port) if caller.local_address and caller.local_port else None
        try:
            facts = await asyncio.to_thread(self.reader.lookup, caller.address, caller.port, peer)
        except ValueError:
            facts = None  # not an IP address (e.g. a Unix socket listener): nothing to say
        att = None
        if facts is not None:
            wid = next((w.id for w in self.options.workloads if w.matches(facts)), None)
            att = Attestation(self.name, self.type, wid, facts)
        if key is not None:
            self._by_connection[key] = att
            if len(self._by_connection) > _CACHE_SIZE:
                self._by_connection.popitem(last=False)
        return att
