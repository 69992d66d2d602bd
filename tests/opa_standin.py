"""A stand-in for an OPA server: no ``opa`` binary can be installed on these machines.

It implements the part of OPA's REST data API that Keyless uses, with OPA's behaviour:

- ``POST /v1/data/<path>`` with ``{"input": ...}`` evaluates ``data.<path>`` over the same policy
  directory, with regopy (rego-cpp), and answers ``{"result": ..., "decision_id": ...}``. rego-cpp
  is not one of Keyless's engines: it is here because it is a Rego implementation independent
  of regorus, so the cross-engine tests compare two implementations, not one with itself;
- an undefined path or rule answers **200 with no ``result``** (OPA does not use 404 for that);
- a body that is not JSON, or not an object, answers 400 with OPA's ``{"code": ..., "message": ...}``;
- ``?provenance=true`` adds ``{"provenance": {"version": ..., "bundles": {"keyless": {"revision": ...}}}}``.

For fault tests, and only here, a request whose ``input.request.headers`` carry
``x-standin-fault: slow|500|malformed|not-json|undefined`` makes this one answer misbehave
(``slow`` sleeps ``x-standin-delay`` seconds, default 2), so other requests can be shown to
proceed. ``GET /_standin/stats`` reports how many requests and distinct client connections it
has seen (keep-alive pooling shows as few connections) and every request body (so a test can
check that no credential ever reaches OPA).

Run as ``python -m tests.opa_standin --policies DIR --port N``; it prints ``ready`` when listening.
"""

from __future__ import annotations

# regopy before aiohttp: rego-cpp's time-zone code corrupts the heap when it binds to the C++
# runtime another extension (aiohttp's frozenlist) loaded first.
import regopy  # isort: skip

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.policy.source import PolicySource, read_policy_dir

regopy.set_default_log_level("None")


class StandIn:
    def __init__(self, source: PolicySource) -> None:
        self.source = source.without_tests()
        self.compiled: dict[str, tuple[Any, Any] | None] = {}
        self.requests = 0
        self.connections: set[tuple[str, int]] = set()
        self.bodies: list[str] = []

    def _interpreter(self) -> regopy.Interpreter:
        interp = regopy.Interpreter()
        interp.log_level = regopy.LogLevel.NONE
        for name, text in self.source.modules:
            interp.add_module(name, text)
        if self.source.data:
            interp.add_data(self.source.data)
        return interp

    def evaluate(self, path: str, input_doc: Any) -> tuple[bool, Any]:
        """(defined, value) of ``data.<path>``; ValueError when rego-cpp reports an error."""
        if path not in self.compiled:
            interp = self._interpreter()
            try:
                bundle = interp.build(None, [path])
                self.compiled[path] = (interp, bundle) if bundle.ok() else None
            except regopy.RegoError:
                self.compiled[path] = None  # not a rule rego-cpp can build: ask ad hoc below
        built = self.compiled[path]
        try:
            if built is not None:
                interp, bundle = built
                interp.set_input_term(json.dumps(input_doc))
                out = str(interp.query_bundle_entrypoint(bundle, path))
            else:
                interp = self._interpreter()
                interp.set_input_term(json.dumps(input_doc))
                out = str(interp.query("data." + path.replace("/", ".")))
        except (regopy.RegoError, json.JSONDecodeError) as e:
            raise ValueError(f"rego-cpp: {e}") from None
        if out == "undefined":
            return False, None
        try:
            doc = json.loads(out)
        except json.JSONDecodeError:
            raise ValueError(f"rego-cpp: {out[:200]}") from None
        results = doc if isinstance(doc, list) else [doc]
        if len(results) != 1 or not results[0].get("expressions"):
            return False, None
        return True, results[0]["expressions"][0]

    async def data(self, request: web.Request) -> web.Response:
        self.requests += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.connections.add((peer[0], peer[1]))
        raw = await request.read()
        self.bodies.append(raw.decode(errors="replace"))
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return web.json_response({"code": "invalid_parameter", "message": "body must be JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"code": "invalid_parameter", "message": "body must be an object"}, status=400)
        input_doc = body.get("input")
        headers = (input_doc or {}).get("request", {}).get("headers", {}) if isinstance(input_doc, dict) else {}
        fault = headers.get("x-standin-fault")
        decision_id = str(uuid.uuid4())
        if fault == "slow":
            await asyncio.sleep(float(headers.get("x-standin-delay", "2")))
        elif fault == "500":
            return web.json_response({"code": "internal_error", "message": "stand-in failure"}, status=500)
        elif fault == "not-json":
            return web.Response(text="<html>bad gateway</html>", content_type="text/html")
        path = request.match_info["path"].strip("/")
        try:
            defined, value = self.evaluate(path, input_doc)
        except ValueError as e:
            return web.json_response({"code": "internal_error", "message": str(e)}, status=500)
        out: dict[str, Any] = {"decision_id": decision_id}
        if fault == "malformed":
            defined, value = True, "yes"
        if fault == "undefined":
            defined = False
        if defined:
            out["result"] = value
        if request.query.get("provenance") in ("", "true"):
            out["provenance"] = {"version": "stand-in", "bundles": {"keyless": {"revision": self.source.revision}}}
        return web.json_response(out)

    async def stats(self, _: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "connections": len(self.connections),
                                  "bodies": self.bodies})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/data/{path:.*}", self.data)
        app.router.add_post("/v1/data", self.data)
        app.router.add_get("/_standin/stats", self.stats)
        app.router.add_get("/health", lambda _: _ok())
        return app


async def _ok() -> web.Response:
    return web.json_response({})


async def main(policies: Path, port: int) -> None:
    runner = web.AppRunner(StandIn(read_policy_dir(policies)).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--policies", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    try:
        asyncio.run(main(Path(a.policies), a.port))
    except KeyboardInterrupt:
        sys.exit(0)
