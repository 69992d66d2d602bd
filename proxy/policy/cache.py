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
        # Posture without its age, which changes every millisecond (a key with it would never
        # hit); ``stale`` and the report itself are in. A policy that reads age_seconds must not
        # set cache_ttl.
        _posture_key(ctx.get("posture")),
        # Also what a policy may read beside the identity: the caller's address (not its port,
        # which changes per connection) and, in transparent mode, the address really dialled.
        input_doc.get("source", {}).get("address"),
        input_doc.get("destination"),
    ]
    # sort_keys: the same facts in another order are the same key; default=str never raises.
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)


def _posture_key(posture: Any) -> Any:
    if not isinstance(posture, dict):
        return posture
    return {k: v for k, v in posture.items() if k != "age_seconds"}


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
        self._retired: set[str] = set()
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
        asked_under = self._revision
        decision = await self.inner.decide(input_doc)
        # An engine learns of a new revision from the answer itself (OPA's provenance).
        if decision.revision is not None and decision.revision != self._revision:
            if self._revision != asked_under or decision.revision in self._retired:
                # A late answer from a revision already replaced while it was in flight: use it
                # for this request, but never let it roll the cache back to that revision.
                return decision
            self._check_revision(decision.revision)
            key = cache_key(input_doc, self._revision)
        if self._revision in ("", "unknown"):
            # Without a revision a policy change cannot empty the cache (an OPA bundle with no
            # .manifest): cached allows could outlive a revoked grant, so nothing is cached.
            return decision
        if decision.cache_ttl:
            if len(self._entries) >= self.max_entries:
                self._evict(now)
            self._entries[key] = (now + decision.cache_ttl, decision)
        return decision

    def _check_revision(self, revision: str) -> None:
        if revision != self._revision:
            self._entries.clear()
            self._retired.add(self._revision)
            self._revision = revision

    def _evict(self, now: float) -> None:
        # Drop the oldest insertions (dicts keep insertion order): O(1) per insert, where a scan
        # for expired entries on every insert into a full cache cost ~0.2 ms per request.
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]

    def status(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}
