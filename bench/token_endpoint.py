"""A stand-in OAuth2 token endpoint for the benchmark (no real authorization server runs here).

It implements only what Keyless's ``oauth2`` credential uses for the client credentials grant:
``POST /token`` with ``grant_type=client_credentials`` and ``client_secret_basic``; it answers
``{"access_token", "token_type": "Bearer", "expires_in"}`` with a long lifetime, so under load
Keyless serves every request from its token cache (the benchmark measures the cached path; the
``fetches`` count in ``GET /stats`` shows how many times Keyless really asked).

    python bench/token_endpoint.py --port N --client-id ID --secret-file FILE   # prints "ready"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
from pathlib import Path

from aiohttp import web


def make_app(client_id: str, secret: str, lifetime: int) -> web.Application:
    fetches = 0
    expected = "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()

    async def token(request: web.Request) -> web.Response:
        nonlocal fetches
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if not secrets.compare_digest(request.headers.get("Authorization", ""), expected):
            return web.json_response({"error": "invalid_client"}, status=401)
        fetches += 1
        return web.json_response({"access_token": "bench-at-" + secrets.token_urlsafe(16),
                                  "token_type": "Bearer", "expires_in": lifetime})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"fetches": fetches})

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/stats", stats)
    return app


async def serve(port: int, client_id: str, secret: str, lifetime: int) -> None:
    runner = web.AppRunner(make_app(client_id, secret, lifetime), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--lifetime", type=int, default=3600)
    a = p.parse_args()
    asyncio.run(serve(a.port, a.client_id, a.secret_file.read_text().strip(), a.lifetime))


if __name__ == "__main__":
    main()
