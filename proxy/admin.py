"""The admin listener (aiohttp, localhost by default): health, readiness, JWKS, CA certificate,
metrics and the live governance report (``/report``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.signing import Signer


def make_admin_app(signer: Signer, ca_cert: Path, ready: Callable[[], bool],
                   policy_status: Callable[[], dict[str, Any]] | None = None,
                   audit_status: Callable[[], dict[str, Any]] | None = None,
                   metrics: Any = None,
                   report: Callable[[str], tuple[str, str]] | None = None,
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
    if report is not None:
        build = report

        async def report_page(request: web.Request) -> web.Response:
            # proxy/governance: ?format=html (default), json or md. Off the loop: it reads the
            # audit file and evaluates the policy over the whole catalog.
            fmt = request.query.get("format", "html")
            if fmt not in ("html", "json", "md"):
                return web.json_response({"error": "bad_request", "message": "format is html, json or md"}, status=400)
            try:
                body, ctype = await asyncio.to_thread(build, fmt)
            except Exception as e:  # noqa: BLE001 - an edited config or policy that does not load
                problems = getattr(e, "problems", None)
                message = "; ".join(problems) if isinstance(problems, list) else type(e).__name__
                return web.json_response({"error": "report_unavailable", "message": message}, status=503)
            return web.Response(text=body, content_type=ctype, headers={"Cache-Control": "no-store"})

        app.router.add_get("/report", report_page)
    if routes is not None:
        routes(app)  # e.g. the authenticated revocation endpoint (proxy/shared/admin.py)
    return app
