"""Real servers and a real Keyless process for end-to-end tests.

Nothing here is a mock: ``Upstream`` is an aiohttp server on loopback that records what it
received, and ``Keyless`` is ``python -m proxy.cli run`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from aiohttp import web

from proxy.demo import free_port, make_tls_files

REPO = Path(__file__).resolve().parent.parent


class ThreadedSite:
    """An aiohttp application served on loopback from its own thread and event loop: the
    peers tests start (upstreams, issuers, token endpoints, bundle servers)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    def serve(self, app: web.Application, *sites: tuple[int, ssl.SSLContext | None]) -> None:
        """Listen on each (port, TLS context or None); returns once every site accepts."""
        started = threading.Event()

        async def main() -> None:
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            for port, ctx in sites:
                await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ctx).start()
            started.set()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(main())
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert started.wait(10), "test peer did not start"

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass
class Received:
    method: str
    scheme: str
    host: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """An HTTP and an HTTPS listener on 127.0.0.1 that record every request they receive."""

    tls_dir: Path
    http_port: int = 0
    https_port: int = 0
    received: list[Received] = field(default_factory=list)
    status: int = 200
    check: Callable[[Received], int] | None = None
    _site: ThreadedSite = field(default_factory=ThreadedSite)

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "upstream-ca.pem"

    def start(self) -> Upstream:
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        ca, cert, key = make_tls_files(self.tls_dir)
        self.http_port, self.https_port = free_port(), free_port()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            rec = Received(
                request.method, request.scheme, request.host, request.path,
                {k: request.query.getall(k) for k in request.query},
                {k.lower(): v for k, v in request.headers.items()}, body)
            self.received.append(rec)
            # ``check`` lets a test's upstream verify what it received, as a real API would.
            status = self.check(rec) if self.check is not None else self.status
            return web.json_response({"ok": status < 400, "path": request.path}, status=status)

        # Large enough for the upload tests (aiohttp's default is 1 MiB).
        app = web.Application(client_max_size=128 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        self._site.serve(app, (self.http_port, None), (self.https_port, ctx))
        return self

    def stop(self) -> None:
        self._site.stop()

    def url(self, path: str, tls: bool = True, host: str = "localhost") -> str:
        return f"https://{host}:{self.https_port}{path}" if tls else f"http://{host}:{self.http_port}{path}"


def base_config(tmp: Path, upstream: Upstream | None = None, **overrides: Any) -> dict[str, Any]:
    """The quickstart config, moved to free ports and a private directory."""
    cfg: dict[str, Any] = {
        "listen": {"address": "127.0.0.1", "port": free_port()},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "tls": {"ca_dir": str(tmp / "ca")},
        "trust": [{"name": "loopback", "type": "source_ip",
                   "workloads": [{"cidr": "127.0.0.0/8", "id": "spiffe://demo.local/billing"}]}],
        "policy": {"dir": str(REPO / "policies")},
        "credentials": {},
        "audit": {"path": str(tmp / "audit.log")},
    }
    if upstream is not None:
        cfg["tls"]["upstream_ca"] = str(upstream.ca_file)
    cfg.update(overrides)
    return cfg


class Keyless:
    """``keyless run`` in a subprocess, ready when ``/readyz`` says so."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.config = config
        self.config_file = tmp / "keyless.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = tmp / "keyless.log"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.config['listen']['port']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.config['admin']['port']}"

    @property
    def ca_cert(self) -> Path:
        return Path(self.config["tls"]["ca_dir"]) / "mitmproxy-ca-cert.pem"

    @property
    def audit_file(self) -> Path:
        return Path(self.config["audit"]["path"])

    def audit(self, chain_records: bool = False) -> list[dict[str, Any]]:
        """The request records; with ``chain_records`` also checkpoints and gap records."""
        import json

        if not self.audit_file.exists():
            return []
        records = [json.loads(line) for line in self.audit_file.read_text().splitlines()]
        return [r for r in records if chain_records or "type" not in r]

    def start(self, log_level: str = "debug", *extra: str) -> Keyless:
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config_file), "--log-level", log_level,
                 *extra],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keyless exited {self.proc.returncode}: {self.log_file.read_text()[-2000:]}")
            try:
                if requests.get(self.admin_url + "/readyz", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError("keyless did not become ready")

    def stop(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log_file.read_text() if self.log_file.exists() else ""

    def client_env(self) -> dict[str, str]:
        """Environment for a client with no secrets that trusts Keyless's CA."""
        ca = str(self.ca_cert)
        return {**os.environ, "HTTP_PROXY": self.proxy_url, "HTTPS_PROXY": self.proxy_url,
                "http_proxy": self.proxy_url, "https_proxy": self.proxy_url, "NO_PROXY": "", "no_proxy": "",
                "SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca, "CURL_CA_BUNDLE": ca}


def audit_record(k: Keyless, decision_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The one audit record of ``decision_id``, once written: a record is written when the flow
    ends, which may be just after the client has read its answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in k.audit() if r["decision_id"] == decision_id]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {decision_id}")


def wait_for_audit(k: Keyless, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = k.audit()
        if len(records) >= count:
            return records
        time.sleep(0.05)
    return k.audit()
