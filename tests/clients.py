"""Real HTTP clients driven through Keyless, each configured the way an app would be: from the
environment (``HTTP_PROXY``/``HTTPS_PROXY`` and a CA bundle), never with explicit proxy code.

``curl`` runs as a subprocess; ``requests`` and ``aiohttp`` run in the test process with the
proxy variables placed in ``os.environ`` for the duration of one call (``trust_env``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import requests
from requests.adapters import HTTPAdapter

from tests.harness import Keyless


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def decision_id(self) -> str | None:
        return self.headers.get("keyless-decision-id")


@contextlib.contextmanager
def proxy_environ(k: Keyless) -> Iterator[None]:
    """Put Keyless's client environment into ``os.environ`` for one call, then restore it."""
    saved = dict(os.environ)
    os.environ.update(k.client_env())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def curl(k: Keyless, url: str, *args: str, method: str | None = None) -> Reply:
    """``curl`` with the proxy taken from its environment; extra ``args`` go before the URL."""
    with tempfile.TemporaryDirectory() as d:
        head, body = Path(d) / "head", Path(d) / "body"
        cmd = ["curl", "-sS", "--max-time", "20", "-D", str(head), "-o", str(body), "-w", "%{http_code}"]
        if method:
            cmd += ["-X", method]
        out = subprocess.run([*cmd, *args, url], env=k.client_env(), capture_output=True, text=True, timeout=30)
        status = int(out.stdout.strip() or 0)
        # A CONNECT adds its own "200 Connection established" block: keep the last block only.
        blocks = [b for b in head.read_text(errors="replace").replace("\r\n", "\n").split("\n\n") if b.strip()]
        headers: dict[str, str] = {}
        for line in (blocks[-1].splitlines()[1:] if blocks else []):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Reply(status, headers, body.read_bytes() if body.exists() else b"")


class SourceAddressAdapter(HTTPAdapter):
    """Bind every connection (also the one to the proxy) to a local address, e.g. 127.0.0.2."""

    def __init__(self, address: str) -> None:
        self._source = (address, 0)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = self._source
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        kwargs["source_address"] = self._source
        return super().proxy_manager_for(proxy, **kwargs)


def req(k: Keyless, method: str, url: str, *, source: str | None = None, **kw: Any) -> Reply:
    """One ``requests`` call with proxy and CA bundle from the environment (trust_env)."""
    with proxy_environ(k), requests.Session() as s:
        assert s.trust_env
        if source is not None:
            s.mount("http://", SourceAddressAdapter(source))
            s.mount("https://", SourceAddressAdapter(source))
        r = s.request(method, url, timeout=20, **kw)
        return Reply(r.status_code, {n.lower(): v for n, v in r.headers.items()}, r.content)


def aio(k: Keyless, method: str, url: str, **kw: Any) -> Reply:
    """One ``aiohttp`` call with ``trust_env=True``: the proxy comes from ``HTTP(S)_PROXY``."""
    # aiohttp builds its default SSL context at import time, before the CA variable is set, so
    # the context trusting Keyless's CA is passed explicitly; the proxy itself is from the env.
    ctx = ssl.create_default_context(cafile=str(k.ca_cert))

    async def call() -> Reply:
        async with aiohttp.ClientSession(trust_env=True) as s, s.request(
                method, url, ssl=ctx, timeout=aiohttp.ClientTimeout(total=20), **kw) as r:
            return Reply(r.status, {n.lower(): v for n, v in r.headers.items()}, await r.read())

    with proxy_environ(k):
        return asyncio.run(call())
