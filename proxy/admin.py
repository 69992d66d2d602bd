"""The admin listener (aiohttp, localhost by default): health, readiness, JWKS, CA certificate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.signing import Signer


def make_admin_app(signer: Signer, ca_cert: Path, ready: Callable[[], bool],
                   policy_status: Callable[[], dict[str, Any]] | None = None,
                   audit_status: Callable[[], dict[str, Any]] | None = None,
                   metrics: Any = None,
                   routes: Callable[[web.Application], None] | None = None) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        # The policy status (revision, reload and reload-failure counters, cache) rides along.
        extra = {"policy": policy_status()} if policy_status is not None else {}
        if audit_status is not None:
            extra["audit"] = audit_status()
        if ready():
            return web.json_response({"status": "ready", **extra})
        # Starting, draining, or the audit trail cannot be written (extra["audit"] says which).
        return web.json_response({"status": "starting", **extra}, status=503)

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response(signer.jwks(), headers={"Cache-Control": "max-age=300"})

    async def ca_pem(_: web.Request) -> web.Response:
        return web.Response(body=ca_cert.read_bytes(), content_type="application/x-pem-file")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/jwks.json", jwks)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/ca.pem", ca_pem)
    if metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        async def metrics_text(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app.router.add_get("/metrics", metrics_text)
    if routes is not None:
        routes(app)  # e.g. the authenticated revocation endpoint (proxy/shared/admin.py)
    return app
