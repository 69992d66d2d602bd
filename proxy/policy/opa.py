"""The OPA engine: ask an OPA server over its REST data API, fail closed.

``POST <url>/v1/data/<path>?provenance=true`` with ``{"input": ...}``. OPA answers
``{"result": ..., "decision_id": ..., "provenance": {"bundles": {name: {"revision": ...}}}}``;
``result`` is absent when the rule is undefined (a deny, as in opa-envoy-plugin). Connection
refused, a timeout, any status but 200, a body that is not JSON, or a result that is not a valid
decision each refuse the request (``policy_unavailable`` with a reason code).

aiohttp is used directly rather than ``opa-python-client``: that client retries connection
errors and 502/503/504 with exponential back-off inside one call, which blows a 200 ms decision
budget, sets its timeout per client rather than per decision, does not surface ``decision_id``
or provenance, and pulls in requests, urllib3 and aiofiles for nothing Keyless uses.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import aiohttp

from proxy.errors import KeylessError
from proxy.model import Decision
from proxy.policy import PolicyUnavailable
from proxy.policy.embedded import entrypoint
from proxy.policy.options import OpaOptions
from proxy.policy.result import UNDEFINED, parse_decision


class OpaEngine:
    def __init__(self, options: OpaOptions, query: str) -> None:
        self.options = options
        self.query = query
        self.revision = "unknown"  # learnt from OPA's provenance on the first answer
        self.answered = False
        self.url = f"{options.url}/v1/data/{options.path or entrypoint(query)}"
        self._timeout = options.timeout_ms / 1000
        self._source = f"opa({options.url})"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the running event loop. One pooled
        # keep-alive connector, so a decision costs no TCP handshake.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.options.max_connections, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False,
                                                  json_serialize=json.dumps)
        return self._session

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        def fail(reason: str, message: str, decision_id: str | None = None) -> PolicyUnavailable:
            return PolicyUnavailable(reason, message, self._source, decision_id)

        session = self._client()
        try:
            # One deadline for connect, send and read: the whole decision, as Envoy's ext_authz.
            async with asyncio.timeout(self._timeout):
                status, body = await self._post(session, input_doc)
        except TimeoutError:
            raise fail("opa_timeout", f"no answer within {self.options.timeout_ms} ms") from None
        except (aiohttp.ClientError, OSError) as e:
            raise fail("opa_unreachable", f"cannot reach OPA ({type(e).__name__})") from None
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        decision_id = doc.get("decision_id") if isinstance(doc, dict) else None
        decision_id = decision_id if isinstance(decision_id, str) else None
        if status != 200:
            raise fail("opa_http_error", f"OPA answered HTTP {status}", decision_id)
        if not isinstance(doc, dict):
            raise fail("opa_malformed_response", "OPA's answer is not a JSON object")
        self.answered = True
        self._learn_revision(doc.get("provenance"))
        if "result" not in doc:
            return replace(UNDEFINED, revision=self.revision, engine_decision_id=decision_id)
        try:
            decision = parse_decision(doc["result"], self._source)
        except KeylessError as e:
            raise fail("malformed_decision", e.message.removeprefix(self._source + ": "), decision_id) from None
        return replace(decision, revision=self.revision, engine_decision_id=decision_id)

    async def _post(self, session: aiohttp.ClientSession, input_doc: dict[str, Any]) -> tuple[int, bytes]:
        # A pooled connection that OPA closed (a restart, an idle timeout) fails on first use with
        # ServerDisconnectedError before any answer. A data API query has no side effects, so it
        # is asked once more on a fresh connection, within the same deadline.
        for attempt in (1, 2):
            try:
                async with session.post(self.url, params={"provenance": "true"},
                                        json={"input": input_doc}) as resp:
                    return resp.status, await resp.read()
            except aiohttp.ServerDisconnectedError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _learn_revision(self, provenance: Any) -> None:
        bundles = provenance.get("bundles") if isinstance(provenance, dict) else None
        if isinstance(bundles, dict) and bundles:
            revs = sorted(f"{name}@{b.get('revision')}" if len(bundles) > 1 else str(b.get("revision"))
                          for name, b in bundles.items() if isinstance(b, dict) and b.get("revision"))
            if revs:
                self.revision = ",".join(revs)

    async def warm_up(self, probe: dict[str, Any]) -> None:
        """Ask until OPA has answered once; ``/readyz`` stays false until then."""
        while not self.answered:
            try:
                await self.decide(probe)
            except PolicyUnavailable:
                await asyncio.sleep(self.options.ready_interval)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def status(self) -> dict[str, Any]:
        return {"revision": self.revision, "url": self.options.url, "answered": self.answered}
