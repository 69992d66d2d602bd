"""``POST /revocations`` and friends on the admin listener, behind a bearer token.

    POST /revocations        {"identity": ID, "reason": "...", "ttl": SECONDS}  -> 201
    POST /revocations/lift   {"identity": ID}                                   -> 200
    GET  /revocations                                                            -> 200

The token comes from ``cache.revocation.admin_token_env``/``_file`` and is read at each request
(rotating it needs no restart); without one configured the routes do not exist. Answers are JSON;
a wrong or missing token is 401 with nothing else said.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web

from proxy.shared import revocation
from proxy.shared.store import SharedStore, StoreDown

log = logging.getLogger("keyless.shared")
DEFAULT_TTL = 86400.0


def _authorized(store: SharedStore, request: web.Request) -> bool:
    from proxy.credentials.static import SecretError

    try:
        expected = store.revocation.admin_token.read()
    except SecretError as e:
        log.error("revocation endpoint: admin token: %s", e)
        return False
    got = request.headers.get("Authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {expected}".encode())


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        doc = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "bad_request", "message": "body must be JSON"}',
                                 content_type="application/json") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("identity"), str):
        raise web.HTTPBadRequest(text='{"error": "bad_request", "message": "identity (a string) is required"}',
                                 content_type="application/json")
    return doc


def add_routes(app: web.Application, store: SharedStore) -> None:
    """Add the revocation routes when an admin token is configured."""
    if not store.revocation.admin_token.configured:
        return

    def guard(handler: Any) -> Any:
        async def run(request: web.Request) -> web.StreamResponse:
            if not _authorized(store, request):
                return web.json_response({"error": "unauthorized", "message": "a valid bearer token is required"},
                                         status=401, headers={"WWW-Authenticate": "Bearer"})
            try:
                resp: web.StreamResponse = await handler(request)
                return resp
            except StoreDown:
                return web.json_response({"error": "redis_unavailable",
                                          "message": "the revocation could not be stored: Redis is unreachable"},
                                         status=503)
            except ValueError as e:
                return web.json_response({"error": "bad_request", "message": str(e)}, status=400)
        return run

    async def post(request: web.Request) -> web.Response:
        doc = await _body(request)
        ttl = doc.get("ttl", DEFAULT_TTL)
        reason = doc.get("reason", "")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not isinstance(reason, str):
            raise ValueError("ttl must be a number of seconds and reason a string")
        entry, gen = await revocation.revoke(store, doc["identity"], reason, float(ttl))
        return web.json_response({**entry.as_json(), "generation": gen}, status=201)

    async def lift(request: web.Request) -> web.Response:
        doc = await _body(request)
        found, gen = await revocation.lift(store, doc["identity"])
        return web.json_response({"identity": doc["identity"], "lifted": found, "generation": gen})

    async def listing(_: web.Request) -> web.Response:
        entries = await revocation.listing(store)
        return web.json_response({"revocations": [e.as_json() for e in entries]})

    app.router.add_post("/revocations", guard(post))
    app.router.add_post("/revocations/lift", guard(lift))
    app.router.add_get("/revocations", guard(listing))
