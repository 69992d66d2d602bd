"""Processes and files for the policy tests: the OPA stand-in and policy directories to edit."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import requests

from proxy.demo import free_port
from tests.harness import REPO, Keyless, ThreadedSite


class OpaProcess:
    """``tests/opa_standin.py`` in a subprocess (it stands in for OPA; see its docstring)."""

    def __init__(self, policies: Path, port: int | None = None) -> None:
        self.policies = policies
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpaProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.opa_standin", "--policies", str(self.policies), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line
        return self

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = requests.get(self.url + "/_standin/stats", timeout=5).json()
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def copy_policies(dest: Path) -> Path:
    shutil.copytree(REPO / "policies", dest)
    return dest


def make_bundle(directory: Path, revision: str | None = None) -> bytes:
    """A bundle.tar.gz of ``directory`` as ``opa build`` lays it out (files at the root)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(directory.rglob("*")):
            if f.is_file():
                tar.add(f, arcname="/" + str(f.relative_to(directory)))
        if revision is not None:
            data = json.dumps({"revision": revision}).encode()
            info = tarfile.TarInfo("/.manifest")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def start_unready(k: Keyless) -> None:
    """Start Keyless without waiting for /readyz (for readiness tests)."""
    with open(k.log_file, "wb") as log:
        k.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "run", "-c", str(k.config_file), "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT, env=k.env, cwd=k.tmp)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(k.admin_url + "/healthz", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("keyless did not start")


class BundleServer:
    """A real HTTP bundle server on loopback: serves one bundle.tar.gz with an ETag and answers
    ``If-None-Match`` with 304, as OPA's bundle service API expects."""

    def __init__(self) -> None:

        from aiohttp import web

        self.port = free_port()
        self.body = b""
        self.etag = ""
        self.not_modified = 0
        self.full = 0
        self._site = ThreadedSite()

        async def handle(request: web.Request) -> web.Response:
            if request.headers.get("If-None-Match") == self.etag:
                self.not_modified += 1
                return web.Response(status=304, headers={"ETag": self.etag})
            self.full += 1
            return web.Response(body=self.body, headers={"ETag": self.etag, "Content-Type": "application/gzip"})

        app = web.Application()
        app.router.add_get("/bundles/keyless.tar.gz", handle)
        self._site.serve(app, (self.port, None))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bundles/keyless.tar.gz"

    def publish(self, body: bytes) -> None:
        import hashlib

        self.body, self.etag = body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


def write_atomically(path: Path, text: str) -> None:
    """Editors and config management replace files by rename; a half-written file is never seen."""
    import os

    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def readyz(k: Keyless) -> dict[str, Any]:
    out: dict[str, Any] = requests.get(k.admin_url + "/readyz", timeout=5).json()
    return out


def wait_until(check: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
