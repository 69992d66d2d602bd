"""A small API that demands a credential: the upstream of ``keyless demo`` and the quickstart.

It accepts either ``Authorization: Bearer <its API key>`` or a JWT that verifies against a
JWKS URL (Keyless's ``/jwks.json``), and answers with what it authenticated, never with the
credential itself. It also reports whether any app-side key header reached it.
"""

from __future__ import annotations

import hmac
import json
import ssl
from typing import Any

import aiohttp
import jwt
from aiohttp import web

APP_KEY_HEADERS = ("x-api-key", "cookie")


def make_demo_api(api_key: str, jwks_url: str | None) -> web.Application:
    keys: dict[str, Any] = {}

    async def verify_jwt(token: str, audience: str) -> dict[str, Any] | None:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return None
        if jwks_url is None:
            return None
        if kid not in keys:
            async with aiohttp.ClientSession() as s, s.get(jwks_url) as r:
                for k in (await r.json())["keys"]:
                    keys[k["kid"]] = jwt.PyJWK(k)
        if kid not in keys:
            return None
        try:
            claims: dict[str, Any] = jwt.decode(
                token, keys[kid].key, algorithms=["ES256", "RS256", "EdDSA"], audience=audience,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.PyJWTError:
            return None
        return claims

    async def handle(request: web.Request) -> web.Response:
        seen = {"method": request.method, "path": request.path,
                "app_key_headers": [h for h in APP_KEY_HEADERS if h in request.headers]}
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return web.json_response({"error": "unauthorized", **seen}, status=401)
        token = auth[len("Bearer "):]
        if hmac.compare_digest(token.encode(), api_key.encode()):
            return web.json_response({"ok": True, "authenticated": "api-key", **seen})
        origin = f"{request.scheme}://{request.host}"
        claims = await verify_jwt(token, origin)
        if claims is not None:
            return web.json_response({"ok": True, "authenticated": "jwt", "sub": claims["sub"],
                                      "aud": claims["aud"], **seen})
        return web.json_response({"error": "invalid credential", **seen}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_demo_api(api_key: str, jwks_url: str | None, host: str, port: int,
                         tls: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(make_demo_api(api_key, jwks_url), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    return runner


def pretty(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), sort_keys=True)
    except ValueError:
        return body.decode(errors="replace")[:200]
