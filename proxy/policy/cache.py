"""The decision cache: reuse a decision only when the policy asked for it.

A decision carries ``cache_ttl: N`` or ``cache: {"ttl": N}``: it is reused for N seconds for
requests whose **strict key** matches: the input minus the fields ``proxy.policy.input.INPUT_FIELDS``
declares uncacheable (headers, the clock, the source port, posture age), plus the policy revision.
That leaves identity and attestations, the request line and query, the source address, posture,
the original destination and the mode. A policy that reads an uncacheable field must not cache,
or must name it in ``vary``.

``cache: {"ttl": N, "vary": [paths]}`` replaces the strict key by the values of those input
paths (as HTTP's ``Vary`` does), so one decision serves ``/v1/invoices/1`` to ``/v1/invoices/999``
when it varies on ``request.path_template``. The policy author promises that the decision depends
on nothing else (docs/policy.md, "Caching decisions"); ``keyless policy test`` checks the promise
on sample inputs. A lookup tries each vary list seen under this revision, then the strict key.

A new revision empties the cache, so a reload never serves a decision of the old policy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from proxy.model import Decision
from proxy.policy import PolicyEngine
from proxy.policy.input import INPUT_FIELDS


def _exclusions() -> dict[str, Any]:
    """The uncacheable fields of ``INPUT_FIELDS`` as a tree: ``{"request": {"headers": None}, ...}``."""
    tree: dict[str, Any] = {}
    for f in INPUT_FIELDS:
        if f.cacheable:
            continue
        node = tree
        *parents, last = f.path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = None
    return tree


# The strict key is the input minus what is declared uncacheable: derived from the one
# declaration, and a field nobody declared stays in the key (a miss, never a wrong hit).
EXCLUDED: dict[str, Any] = _exclusions()
# Distinct vary lists kept per revision: each costs one more key per lookup. A policy has a few;
# past this many, decisions with a new list are not cached (counted in ``vary_overflow``).
MAX_VARY_LISTS = 16

_MISSING = "\0missing"  # not JSON null: an absent field and a null one are different keys


def _at(doc: Any, parts: Sequence[str]) -> Any:
    for p in parts:
        if not isinstance(doc, dict) or p not in doc:
            return _MISSING
        doc = doc[p]
    return doc


def _dump(parts: list[Any]) -> str:
    # Not sort_keys (a third of the cost): the input is built in one order, and the same facts in
    # another order would only be a miss, never a wrong hit. default=str never raises.
    return json.dumps(parts, separators=(",", ":"), default=str)


def _prune(doc: Any, excluded: dict[str, Any]) -> Any:
    if not isinstance(doc, dict):
        return doc
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if k not in excluded:
            out[k] = v
        elif excluded[k] is not None:
            out[k] = _prune(v, excluded[k])
    return out


def cache_key(input_doc: dict[str, Any], revision: str) -> str:
    """The strict key: the revision and every input field not declared uncacheable."""
    return _dump([revision, _prune(input_doc, EXCLUDED)])


def vary_key(input_doc: dict[str, Any], revision: str, vary: tuple[str, ...]) -> str:
    """The key of a decision that said what it depends on: the revision, the list, its values."""
    return _dump([revision, "vary", vary, *(_at(input_doc, p.split(".")) for p in vary)])


class CachingEngine:
    """Wraps any engine; transparent when no decision asks to be cached."""

    def __init__(self, inner: PolicyEngine, max_entries: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.query = inner.query
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, Decision]] = {}
        self._varies: dict[tuple[str, ...], None] = {}
        self._revision = inner.revision
        self._retired: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.vary_overflow = 0

    @property
    def revision(self) -> str:
        return self.inner.revision

    def clear(self) -> None:
        self._entries.clear()
        self._varies.clear()

    def _lookup(self, input_doc: dict[str, Any], now: float) -> Decision | None:
        # Vary lists first: they are what a policy caches its common answers with (allows).
        for key in self._keys(input_doc):
            hit = self._entries.get(key)
            if hit is None:
                continue
            if hit[0] > now:
                return hit[1]
            del self._entries[key]
        return None

    def _keys(self, input_doc: dict[str, Any]) -> Iterator[str]:
        for v in self._varies:
            yield vary_key(input_doc, self._revision, v)
        yield cache_key(input_doc, self._revision)

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        if self.max_entries == 0:
            return await self.inner.decide(input_doc)
        self._check_revision(self.inner.revision)
        now = self._clock()
        hit = self._lookup(input_doc, now)
        if hit is not None:
            self.hits += 1
            return hit
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
        if self._revision in ("", "unknown"):
            # Without a revision a policy change cannot empty the cache (an OPA bundle with no
            # .manifest): cached allows could outlive a revoked grant, so nothing is cached.
            return decision
        if decision.cache_ttl:
            if decision.vary is None:
                key = cache_key(input_doc, self._revision)
            elif decision.vary in self._varies or len(self._varies) < MAX_VARY_LISTS:
                self._varies[decision.vary] = None
                key = vary_key(input_doc, self._revision, decision.vary)
            else:
                self.vary_overflow += 1
                return decision
            if len(self._entries) >= self.max_entries:
                self._evict()
            # Stored as it is served (cached=True): one copy per entry, not one per hit.
            self._entries[key] = (now + decision.cache_ttl, replace(decision, cached=True))
        return decision

    def _check_revision(self, revision: str) -> None:
        if revision != self._revision:
            self.clear()
            self._retired.add(self._revision)
            self._revision = revision

    def _evict(self) -> None:
        # Drop the oldest insertions (dicts keep insertion order): O(1) per insert, where a scan
        # for expired entries on every insert into a full cache cost ~0.2 ms per request.
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]

    def status(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses,
                "vary_lists": len(self._varies), "vary_overflow": self.vary_overflow}
