"""Listening ports: is a port free (``keyless check``, and ``run`` before mitmproxy binds), and
which port did ``listen.port: 0`` get (a state file that ``keyless env`` reads).

mitmproxy reports a port in use by logging an error with a mitmproxy command-line hint and
exiting 1; Keyless tries the bind itself first so the user gets one line naming the config key,
and exit 2 like every other config problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "listen.json"


def bind_problem(key: str, host: str, port: int, *, reuse_port: bool = False) -> str | None:
    """``key: cannot listen on host:port (reason)`` if ``host:port`` cannot be bound now, else None.

    Binds as asyncio's ``start_server`` does (SO_REUSEADDR, and SO_REUSEPORT for workers, so a
    sibling worker holding the port is no conflict) and closes at once. Port 0 is always free.
    """
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"{key}: cannot listen on {host}:{port} ({e.strerror})"
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                hint = " (is Keyless already running?)" if e.errno == 98 else ""
                return f"{key}: cannot listen on {fmt_address(host, port)} ({e.strerror}){hint}"
    return None


def fmt_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Bound:
    """Where a running Keyless listens, as recorded in ``<tls.ca_dir>/listen.json``."""

    pid: int
    proxy_host: str
    proxy_port: int
    admin: str | None


def write_state(ca_dir: Path, bound: Bound) -> Path:
    """Record the bound addresses (atomically) for ``keyless env``; returns the file."""
    path = ca_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": bound.pid, "proxy": [bound.proxy_host, bound.proxy_port],
                               "admin": bound.admin}) + "\n")
    os.replace(tmp, path)
    return path


def remove_state(ca_dir: Path) -> None:
    """Remove the state file if this process wrote it."""
    path = ca_dir / STATE_FILE
    with contextlib.suppress(OSError, ValueError, KeyError):
        if json.loads(path.read_text())["pid"] == os.getpid():
            path.unlink()


def read_state(ca_dir: Path) -> Bound | None:
    """The recorded addresses if the process that wrote them is still alive, else None."""
    try:
        doc = json.loads((ca_dir / STATE_FILE).read_text())
        bound = Bound(int(doc["pid"]), str(doc["proxy"][0]), int(doc["proxy"][1]), doc.get("admin"))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    try:
        os.kill(bound.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return bound
