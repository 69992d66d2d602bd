"""Revoked workload identities, shared by every replica through Redis.

State in Redis (``key_prefix`` first): the hash ``revocations`` (identity -> JSON with the reason,
when it was revoked and until when), the counter ``revocations:generation`` (incremented by
every change) and the channel ``revocations`` (the new generation is published). A replica
reloads the hash when a message arrives and whenever the counter it polls every
``poll_interval`` differs from the one it loaded, so a replica that missed a message (its
subscription was reconnecting) catches up within one poll.

The request path reads ``check``/``mark`` only: a dict lookup, no I/O. When the last successful
poll is older than ``max_staleness`` the state is unknown; identities matching
``revocation.sensitive`` are then refused (fail closed), others are served on what is known.
Every revocation has an expiry; ``lift`` ends one early.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.errors import KeylessError
from proxy.model import Identity
from proxy.shared.store import SharedStore, StoreDown
from proxy.shared.tokens import identity_index

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from redis.asyncio import Redis

log = logging.getLogger("keyless.shared")

MAX_TTL = 90 * 86400
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class Revocation:
    identity: str
    reason: str
    at: float
    until: float

    def as_json(self) -> dict[str, Any]:
        return {"identity": self.identity, "reason": self.reason, "at": self.at, "until": self.until}


def names(store: SharedStore) -> tuple[str, str, str]:
    """The hash, the generation counter and the channel."""
    return store.key("revocations"), store.key("revocations", "generation"), store.key("revocations")


def _parse(identity: str, raw: bytes | str) -> Revocation:
    """An entry as stored; one that cannot be read still revokes (fail closed), for an hour
    from now, so a corrupted or hand-written entry never lets the identity through."""
    try:
        doc = json.loads(raw)
        return Revocation(identity, str(doc.get("reason", ""))[:MAX_REASON], float(doc["at"]), float(doc["until"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        now = time.time()
        return Revocation(identity, "unreadable revocation entry", now, now + 3600)


# --- changes (keyless revoke, the admin endpoint) ----------------------------------------------

async def revoke(store: SharedStore, identity: str, reason: str, ttl: float) -> tuple[Revocation, int]:
    """Revoke ``identity`` for ``ttl`` seconds everywhere; purge its shared tokens. Returns the
    revocation and the new generation. Raises StoreDown if Redis cannot be reached."""
    if not identity or len(identity) > 2048:
        raise ValueError("identity must be a non-empty string of at most 2048 characters")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be between 1 second and {MAX_TTL // 86400} days")
    now = time.time()
    entry = Revocation(identity, reason[:MAX_REASON], now, now + ttl)
    table, generation, channel = names(store)
    index = identity_index(store, identity)

    async def write(r: Redis) -> int:
        pipe = r.pipeline(transaction=True)
        pipe.hset(table, identity, json.dumps({"reason": entry.reason, "at": entry.at, "until": entry.until}))
        pipe.incr(generation)
        out = await pipe.execute()
        gen = int(out[1])
        await r.publish(channel, str(gen))
        # Defence in depth: the deny does not depend on it, but nothing fetched for the
        # identity survives in Redis for a lift to hand back.
        slots = await r.smembers(index)
        await r.delete(index, *slots)
        return gen

    gen = await store.run("revoke", write, probe=True)
    await listing(store)  # drops expired entries, which replicas ignore anyway
    log.warning("revoked %s until %s: %s", identity, iso(entry.until), entry.reason or "(no reason given)")
    return entry, gen


async def lift(store: SharedStore, identity: str) -> tuple[bool, int]:
    """End ``identity``'s revocation; (whether there was one, the generation)."""
    table, generation, channel = names(store)

    async def write(r: Redis) -> tuple[bool, int]:
        pipe = r.pipeline(transaction=True)
        pipe.hdel(table, identity)
        pipe.incr(generation)
        out = await pipe.execute()
        await r.publish(channel, str(out[1]))
        return bool(out[0]), int(out[1])

    found, gen = await store.run("lift revocation", write, probe=True)
    log.warning("revocation of %s lifted%s", identity, "" if found else " (there was none)")
    return found, gen


async def listing(store: SharedStore) -> list[Revocation]:
    """The revocations in force (expired ones are removed on the way)."""
    table, _, _ = names(store)
    raw: dict[Any, Any] = await store.run("list revocations", lambda r: r.hgetall(table), probe=True)
    now = time.time()
    live, expired = [], []
    for k, v in raw.items():
        ident = _text(k)
        entry = _parse(ident, v)
        if entry.until > now:
            live.append(entry)
        else:
            expired.append(k)
    if expired:
        await store.run("expire revocations", lambda r: r.hdel(table, *expired), probe=True)
    return sorted(live, key=lambda e: e.at)


def _text(k: bytes | str) -> str:
    return k.decode(errors="replace") if isinstance(k, bytes) else k


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- every replica ------------------------------------------------------------------------------

class Revocations:
    """This replica's view of the revocations, kept current by ``run``."""

    def __init__(self, store: SharedStore, clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.options = store.revocation
        self._clock = clock
        self._mono = mono
        self.entries: dict[str, Revocation] = {}
        self.generation: int | None = None
        self._synced: float | None = None
        self._known: bool | None = None
        self.counts: Counter[tuple[str, str]] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        store.revocations = self

    def __repr__(self) -> str:
        return f"Revocations(active={len(self.entries)}, generation={self.generation!r})"

    # --- the request path: no I/O ---------------------------------------------------------------

    def known(self) -> bool:
        known = self._synced is not None and self._mono() - self._synced <= self.options.max_staleness
        if known is not self._known:
            # Logged and counted once per change, from whichever caller sees it first.
            if self._known is not None or not known:
                log.warning("revocation state is %s", "known again" if known else
                            f"unknown (no sync for over {self.options.max_staleness:g}s): "
                            "revocation-sensitive identities are refused")
            self.counts["state", "known" if known else "unknown"] += 1
            self._known = known
        return known

    def check(self, identity: str | None) -> Revocation | None:
        if identity is None:
            return None
        entry = self.entries.get(identity)
        return entry if entry is not None and entry.until > self._clock() else None

    def mark(self, identity: Identity) -> Identity:
        """``identity`` with ``revoked`` set; raises ``revocation_unknown`` for a sensitive
        identity while the state is unknown."""
        if not self.known() and self.options.is_sensitive(identity.id):
            self.counts["denied", "unknown"] += 1
            raise KeylessError("revocation_unknown",
                               "revocation state is unknown (Redis unreachable) and this identity is "
                               "revocation-sensitive")
        if self.check(identity.id) is not None:
            return dataclasses.replace(identity, revoked=True)
        return identity

    def enforce(self, identity: Identity) -> None:
        """After the decision, whatever it was: a revoked identity is refused."""
        if identity.revoked:
            entry = self.check(identity.id)
            self.counts["denied", "revoked"] += 1
            why = f": {entry.reason}" if entry is not None and entry.reason else ""
            raise KeylessError("identity_revoked", f"identity is revoked{why}")

    # --- keeping current --------------------------------------------------------------------

    async def sync(self, via: str) -> None:
        """Reload if the generation moved. Raises StoreDown."""
        table, generation, _ = names(self.store)
        raw = await self.store.run("poll revocations", lambda r: r.get(generation), probe=True)
        gen = int(raw) if raw is not None else 0
        if gen != self.generation:
            entries: dict[Any, Any] = await self.store.run("load revocations", lambda r: r.hgetall(table),
                                                               probe=True)
            self.apply(gen, entries, via)
        self._synced = self._mono()

    def apply(self, gen: int, raw: dict[Any, Any], via: str) -> None:
        fresh: dict[str, Revocation] = {}
        for k, v in raw.items():
            ident = _text(k)
            fresh[ident] = _parse(ident, v)
        for ident in fresh.keys() - self.entries.keys():
            dropped = self.store.purge_local(ident)
            log.warning("identity %s is revoked (generation %d, via %s; %d cached token(s) dropped)",
                        ident, gen, via, dropped)
            self.counts["change", "revoked"] += 1
        for ident in self.entries.keys() - fresh.keys():
            log.warning("revocation of %s lifted (generation %d, via %s)", ident, gen, via)
            self.counts["change", "lifted"] += 1
        self.entries = fresh
        self.generation = gen
        self.counts["sync", via] += 1

    async def _poll(self) -> None:
        while True:
            try:
                await self.sync("poll")
            except StoreDown:
                pass  # SharedStore logged the state change; known() turns false after max_staleness
            except Exception as e:  # noqa: BLE001 - the poller must outlive any one failure
                log.error("revocation poll failed: %s", type(e).__name__)
            self.known()
            await asyncio.sleep(self.options.poll_interval)

    async def _listen(self) -> None:
        from redis.exceptions import RedisError

        _, _, channel = names(self.store)
        while True:
            pubsub = None
            try:
                pubsub = self.store.client().pubsub()
                await pubsub.subscribe(channel)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        with contextlib.suppress(StoreDown):
                            await self.sync("pubsub")
            except (RedisError, OSError, TimeoutError):
                await asyncio.sleep(1.0)  # the poller carries on meanwhile
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.error("revocation subscription failed: %s", type(e).__name__)
                await asyncio.sleep(1.0)
            finally:
                if pubsub is not None:
                    # A dead connection may not close cleanly.
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def begin(self) -> None:
        """A first sync (so the state is known from the first request, if Redis answers), then
        the poller and the subscription in the background."""
        with contextlib.suppress(StoreDown):
            await self.sync("poll")
        self.known()
        self._tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._listen())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def collect(self) -> Iterable[Metric]:
        from proxy.telemetry import counter, gauge

        c = self.counts
        now = self._clock()
        yield gauge("keyless_revocations_active", "Identities revoked on this replica's last sync",
                    samples=[((), float(sum(1 for e in self.entries.values() if e.until > now)))])
        yield gauge("keyless_revocation_state_known", "Whether this replica synced revocations within max_staleness",
                    samples=[((), 1.0 if self._known else 0.0)])
        yield counter("keyless_revocation_state_changes", "Revocation state became known or unknown", ("state",),
                      [((s,), float(c["state", s])) for s in ("known", "unknown")])
        yield counter("keyless_revocation_changes", "Revocations this replica learned of, and lifts", ("change",),
                      [((v,), float(c["change", v])) for v in ("revoked", "lifted")])
        yield counter("keyless_revocation_syncs", "Revocation reloads by what triggered them", ("via",),
                      [((v,), float(c["sync", v])) for v in ("poll", "pubsub")])
        yield counter("keyless_revocation_denials", "Requests refused as revoked or with revocation state unknown",
                      ("reason",), [((r,), float(c["denied", r])) for r in ("revoked", "unknown")])
