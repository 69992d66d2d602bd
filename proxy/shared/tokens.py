"""The shared half of a ``TokenCache``: tokens fetched by one replica, used by all.

A local miss comes here (``obtain``). Redis is asked for a sealed token that is still fresh
(before its refresh point); if there is none, the replica tries to become the one that fetches
(``SET lock NX PX lock_ttl``). The holder fetches, stores the sealed token with its expiry
(``PXAT``) and releases the lock; the others poll for its token for up to ``wait`` seconds, then
fetch on their own. With ``exclusive`` (a rotating refresh token, where a second fetch would
spend a token the first already spent) nobody fetches without the lock while Redis answers.

When Redis fails the replica fetches for itself (``StoreDown`` never reaches the request path):
an extra token call, never a token past its expiry, which the local cache enforces anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any

from proxy.errors import KeylessError
from proxy.shared.store import SharedStore, StoreDown

if TYPE_CHECKING:
    from proxy.credentials import Runtime
    from proxy.credentials.cache import Token, TokenCache

log = logging.getLogger("keyless.shared")

# Compare-and-delete: only the holder's own lock is released (it may have expired and been
# taken by another replica meanwhile).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_POLL = (0.01, 0.02, 0.05, 0.1)


class SharedTokens[K: Hashable]:
    """Sealed tokens of one credential in Redis, under names derived from ``namespace``.

    ``encode``/``decode`` turn a token's ``data`` into JSON and back (SigV4's key triple);
    ``identity_of`` says which workload a key's token was fetched for, so that a revocation can
    purge it (None for tokens that are not per identity)."""

    def __init__(self, store: SharedStore, namespace: str, *, exclusive: bool = False,
                 encode: Callable[[Any], Any] | None = None, decode: Callable[[Any], Any] | None = None,
                 identity_of: Callable[[K], str | None] | None = None) -> None:
        self.store = store
        self.namespace = namespace
        self.exclusive = exclusive
        self._encode = encode
        self._decode = decode
        self.identity_of = identity_of
        self.cache: TokenCache[K] | None = None
        store.tokens.append(self)

    def __repr__(self) -> str:
        return f"SharedTokens({self.namespace.split(chr(0))[0]!r})"

    def slot(self, key: K) -> str:
        return self.store.key("tok", self.store.sealer.name(self.namespace, repr(key)))

    def _lock(self, slot: str) -> str:
        return slot.replace(self.store.prefix + "tok:", self.store.prefix + "lock:", 1)

    def identity_index(self, identity: str) -> str:
        return identity_index(self.store, identity)

    def purge_local(self, identity: str) -> int:
        if self.cache is None or self.identity_of is None:
            return 0
        of = self.identity_of
        return self.cache.purge(lambda k: of(k) == identity)

    # --- sealed values ------------------------------------------------------------------------

    async def load(self, key: K) -> Token | None:
        from proxy.credentials.cache import MAX_LIFETIME, Token

        slot = self.slot(key)
        blob = await self.store.run("get token", lambda r: r.get(slot))
        if blob is None:
            return None
        plain = self.store.sealer.open(slot, _raw(blob))
        if plain is None:
            # Another key, or tampering: never used; the next store overwrites it.
            log.warning("%s: a shared token did not open with this key; ignored", self)
            self.store.count("cache", "unreadable")
            return None
        try:
            doc = json.loads(plain)
            data = doc.get("d")
            token = Token(str(doc["v"]), float(doc["e"]),
                          data=self._decode(data) if data is not None and self._decode else None,
                          obtained_at=float(doc["o"]))
        except (ValueError, KeyError, TypeError):
            self.store.count("cache", "unreadable")
            return None
        if token.expires_at - token.obtained_at > MAX_LIFETIME:
            return None
        return token

    async def save(self, key: K, token: Token) -> None:
        """Store ``token`` until its expiry; best effort (a failure only costs other replicas a fetch)."""
        from proxy.credentials.cache import MAX_LIFETIME

        slot = self.slot(key)
        expires_ms = int(token.expires_at * 1000)
        if expires_ms <= int(time.time() * 1000):
            return
        doc: dict[str, Any] = {"v": token.value, "e": token.expires_at, "o": token.obtained_at}
        if token.data is not None and self._encode is not None:
            doc["d"] = self._encode(token.data)
        blob = self.store.sealer.seal(slot, json.dumps(doc).encode())
        identity = self.identity_of(key) if self.identity_of is not None else None

        async def write(r: Any) -> Any:
            pipe = r.pipeline(transaction=False)
            pipe.set(slot, blob, pxat=expires_ms)
            if identity is not None:
                index = identity_index(self.store, identity)
                pipe.sadd(index, slot)
                pipe.pexpire(index, int(MAX_LIFETIME * 1000))
            return await pipe.execute()

        try:
            await self.store.run("store token", write)
            self.store.count("cache", "stored")
        except StoreDown:
            pass

    async def get_state(self, name: str) -> str | None:
        """A small sealed value of this credential (a rotating refresh token); StoreDown if down."""
        slot = self.store.key("state", self.store.sealer.name(self.namespace, name))
        blob = await self.store.run("get state", lambda r: r.get(slot))
        plain = self.store.sealer.open(slot, _raw(blob)) if blob is not None else None
        return plain.decode() if plain is not None else None

    async def put_state(self, name: str, value: str) -> None:
        slot = self.store.key("state", self.store.sealer.name(self.namespace, name))
        blob = self.store.sealer.seal(slot, value.encode())
        await self.store.run("store state", lambda r: r.set(slot, blob))

    # --- the single-flight fetch --------------------------------------------------------------

    async def obtain(self, key: K, fetch: Callable[[], Awaitable[Token]], fresh: Callable[[Token], bool]) -> Token:
        """A fresh token for ``key``: from Redis, from the replica holding the lock, or fetched."""
        store = self.store
        if not store.available():
            store.count("cache", "bypass")
            return await fetch()
        try:
            token = await self.load(key)
            if token is not None and fresh(token):
                store.count("cache", "hit")
                return token
            store.count("cache", "miss")
            return await self._single_flight(key, fetch, fresh)
        except StoreDown:
            store.count("cache", "bypass")
            return await fetch()

    async def _single_flight(self, key: K, fetch: Callable[[], Awaitable[Token]],
                             fresh: Callable[[Token], bool]) -> Token:
        store, o = self.store, self.store.options
        slot = self.slot(key)
        lock = self._lock(slot)
        mono = time.monotonic
        give_up = mono() + o.wait
        # Exclusive: wait as long as a live holder may keep the lock, never fetch beside it.
        hard_stop = mono() + o.wait + o.lock_ttl
        token: Token | None
        while True:
            owner = secrets.token_hex(16)
            if await store.run("take lock", lambda r, owner=owner: r.set(lock, owner, nx=True,  # type: ignore[misc]
                                                                         px=int(o.lock_ttl * 1000))):
                store.count("cache", "lock_acquired")
                return await self._holding(key, lock, owner, fetch, fresh)
            store.count("cache", "lock_contended")
            i = 0
            while True:
                await asyncio.sleep(_POLL[min(i, len(_POLL) - 1)])
                i += 1
                token = await self.load(key)
                if token is not None and fresh(token):
                    store.count("cache", "waited")
                    return token
                if not await store.run("check lock", lambda r: r.exists(lock)):
                    break  # the holder gave up without a token: try to take the lock
                if not self.exclusive and mono() >= give_up:
                    store.count("cache", "wait_timeout")
                    log.info("%s: the replica fetching this token did not finish within %gs; fetching too",
                             self, o.wait)
                    return await fetch()
                if mono() >= hard_stop:
                    store.count("cache", "wait_timeout")
                    raise KeylessError("credential_unavailable",
                                       "another replica holds the refresh lock and has not finished",
                                       self.namespace.split("\0")[0])

    async def _holding(self, key: K, lock: str, owner: str, fetch: Callable[[], Awaitable[Token]],
                       fresh: Callable[[Token], bool]) -> Token:
        try:
            # Stored between our miss and our lock: no fetch needed.
            try:
                token: Token | None = await self.load(key)
            except StoreDown:
                token = None
            if token is not None and fresh(token):
                self.store.count("cache", "hit")
                return token
            # Exactly one fetch here, whatever fails around it.
            token = await fetch()
            self.store.count("cache", "fetched")
            await self.save(key, token)
            return token
        finally:
            with contextlib.suppress(StoreDown):  # it expires after lock_ttl
                await self.store.run("release lock", lambda r: r.eval(_RELEASE, 1, lock, owner))


def _raw(blob: bytes | str) -> bytes:
    # The client is built without decode_responses: values are bytes.
    return blob if isinstance(blob, bytes) else blob.encode()


def identity_index(store: SharedStore, identity: str) -> str:
    """The set of token slots fetched for ``identity`` (a revocation deletes them)."""
    return store.key("idx", store.sealer.name("identity", identity))


def shared_tokens[K: Hashable](runtime: Runtime, label: str, options: object, **kw: Any) -> SharedTokens[K] | None:
    """The shared store for one credential, or None without ``cache.redis``.

    The namespace includes the credential's options (never a secret: they name secret sources,
    not values), so a replica with a changed config does not pick up tokens minted for the old one."""
    store = runtime.shared
    if store is None:
        return None
    return SharedTokens(store, f"{label}\0{options!r}", **kw)
