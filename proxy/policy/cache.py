"""The decision cache: reuse a decision only when the policy asked for it with ``cache_ttl``.

The key holds everything the decision may depend on that Keyless can name: the identity id and
every attestation (with its facts), the request's method, scheme, host, port, path and query,
the posture context, the source address, the original destination (transparent mode), and the
policy revision. Headers and the clock are not in the key: a policy
that reads them must not set ``cache_ttl`` (docs/policy.md says so). A new revision empties the
cache, so a reload never serves a decision of the old policy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from proxy.model import Decision
from proxy.policy import PolicyEngine


def cache_key(input_doc: dict[str, Any], revision: str) -> str:
    req = input_doc.get("request", {})
    ctx = input_doc.get("context", {})
    parts = [
        revision,
        input_doc.get("identity"),
        req.get("method"), req.get("scheme"), req.get("host"), req.get("port"), req.get("path"),
        req.get("query"),
        ctx.get("posture"),
        # Also what a policy may read beside the identity: the caller's address (not its port,
        # which changes per connection) and, in transparent mode, the address really dialled.
        input_doc.get("source", {}).get("address"),
        input_doc.get("destination"),
    ]
    # sort_keys: the same facts in another order are the same key; default=str never raises.
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)


class CachingEngine:
    """Wraps any engine; transparent when no decision carries ``cache_ttl``."""

    def __init__(self, inner: PolicyEngine, max_entries: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.query = inner.query
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, Decision]] = {}
        self._revision = inner.revision
        self.hits = 0
        self.misses = 0

    @property
    def revision(self) -> str:
        return self.inner.revision

    def clear(self) -> None:
        self._entries.clear()

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        if self.max_entries == 0:
            return await self.inner.decide(input_doc)
        self._check_revision(self.inner.revision)
        key = cache_key(input_doc, self._revision)
        hit = self._entries.get(key)
        now = self._clock()
        if hit is not None:
            if hit[0] > now:
                self.hits += 1
                return replace(hit[1], cached=True)
            del self._entries[key]
        self.misses += 1
        decision = await self.inner.decide(input_doc)
        # An engine learns of a new revision from the answer itself (OPA's provenance).
        if decision.revision is not None and decision.revision != self._revision:
            self._check_revision(decision.revision)
            key = cache_key(input_doc, self._revision)
        if decision.cache_ttl:
            if len(self._entries) >= self.max_entries:
                self._evict(now)
            self._entries[key] = (now + decision.cache_ttl, decision)
        return decision

    def _check_revision(self, revision: str) -> None:
        if revision != self._revision:
            self._entries.clear()
            self._revision = revision

    def _evict(self, now: float) -> None:
        expired = [k for k, (until, _) in self._entries.items() if until <= now]
        for k in expired:
            del self._entries[k]
        # Still full: drop the oldest insertions (dicts keep insertion order).
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]

    def status(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}
