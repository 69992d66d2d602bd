"""A token cache for credential providers that fetch tokens over the network.

The request path calls ``get``. On a hit (a token that is not about to expire) it returns from a
dict without any I/O or ``await`` on the network. On a miss, concurrent callers for the same key
wait on one fetch (single-flight). A token that has passed its refresh point is still served
while one background task fetches its successor (refresh-ahead, as Envoy's OAuth2 token
provider does), so steady traffic never waits for the token endpoint. An expired token is never
served: once ``expires_at`` is near, a caller waits for a fresh one or gets the failure.

With ``cache.redis`` a ``SharedTokens`` (proxy/shared/tokens.py) sits behind the dict: a local
miss asks Redis, and the fetch is single-flight across replicas. The local dict stays in front,
so a hit never touches the network, and a Redis outage only costs a fetch per replica.

Fetches are bounded: each attempt has a timeout, failures marked retryable are retried with
exponential backoff, and every waiter gets the same ``KeylessError("credential_unavailable")``
when the last attempt fails. Nothing here logs or formats a token value.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.errors import KeylessError

if TYPE_CHECKING:
    from proxy.shared.tokens import SharedTokens

log = logging.getLogger("keyless.credentials")


# No cached credential is trusted for longer than this, whatever its issuer claims: a
# revoked credential must drop out of the cache within a bounded time.
MAX_LIFETIME = 12 * 3600.0

@dataclass(frozen=True, slots=True)
class Token:
    """A fetched credential. ``value`` and ``data`` are secret: excluded from ``repr``."""

    value: str = field(repr=False)
    expires_at: float
    data: Any = field(default=None, repr=False)
    obtained_at: float = field(default_factory=time.time)


class FetchError(Exception):
    """A fetch failed for ``reason`` (safe to show: never contains a secret)."""

    def __init__(self, reason: str, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class CachePolicy:
    timeout: float = 5.0
    retries: int = 2
    backoff: float = 0.2
    # Refresh once this fraction of the lifetime has passed; treat as expired when less than
    # ``min_remaining`` seconds are left (a receiver's clock may run ahead of ours).
    refresh_at: float = 0.75
    min_remaining: float = 5.0
    max_entries: int = 10_000


@dataclass(slots=True)
class _Entry:
    token: Token
    refresh_at: float
    stale_at: float


class TokenCache[K: Hashable]:
    """Tokens per key, fetched by ``fetch(key)``; ``provider`` names who fails in errors."""

    def __init__(self, provider: str, fetch: Callable[[K], Awaitable[Token]],
                 policy: CachePolicy | None = None, clock: Callable[[], float] = time.time,
                 shared: SharedTokens[K] | None = None) -> None:
        self.provider = provider
        self.shared = shared
        if shared is not None:
            shared.cache = self
        self.policy = policy or CachePolicy()
        self._fetch = fetch
        self._clock = clock
        self._entries: dict[K, _Entry] = {}
        self._inflight: dict[K, asyncio.Future[Token]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.fetches = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"TokenCache(provider={self.provider!r}, entries={len(self._entries)})"

    def peek(self, key: K) -> Token | None:
        """The cached token if it may still be used, without fetching or refreshing."""
        entry = self._entries.get(key)
        if entry is None or self._clock() >= entry.stale_at:
            return None
        return entry.token

    async def get(self, key: K) -> Token:
        entry = self._entries.get(key)
        if entry is not None:
            now = self._clock()
            if now < entry.stale_at:
                if now >= entry.refresh_at and key not in self._inflight:
                    self._start(key, background=True)
                return entry.token
            # Expired or about to: drop it so that it can never be served again.
            del self._entries[key]
        future = self._inflight.get(key) or self._start(key, background=False)
        # shield: one cancelled waiter (a client hung up) must not cancel everybody's fetch.
        return await asyncio.shield(future)

    def _start(self, key: K, background: bool) -> asyncio.Future[Token]:
        future: asyncio.Future[Token] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        task = asyncio.create_task(self._run(key, future, background))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _run(self, key: K, future: asyncio.Future[Token], background: bool) -> None:
        try:
            try:
                token = await self._obtain(key)
            except KeylessError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug must not leave waiters hanging forever
                log.error("%s: fetch failed unexpectedly: %s", self.provider, type(e).__name__)
                raise KeylessError("credential_unavailable", f"internal error while fetching ({type(e).__name__})",
                                   self.provider) from None
        except KeylessError as e:
            self.failures += 1
            if background:
                # The cached token is still valid; the next caller after its refresh point retries.
                log.warning("%s: background refresh failed: %s", self.provider, e.message)
            future.set_exception(e)
            # Waiters consume the exception; a background refresh may have none.
            future.exception()
        else:
            self._store(key, token)
            future.set_result(token)
        finally:
            self._inflight.pop(key, None)

    async def _obtain(self, key: K) -> Token:
        if self.shared is None:
            return await self._fetch_with_retries(key)
        return await self.shared.obtain(key, lambda: self._fetch_with_retries(key), self.fresh)

    def fresh(self, token: Token) -> bool:
        """Whether a token from elsewhere (Redis) is before its refresh point: one past it would
        start a refresh on every request here while the replica that owns the refresh works."""
        lifetime = max(token.expires_at - token.obtained_at, 0.0)
        return self._clock() < min(token.obtained_at + lifetime * self.policy.refresh_at,
                                   token.expires_at - min(self.policy.min_remaining, lifetime / 4))

    def purge(self, match: Callable[[K], bool]) -> int:
        """Drop the cached tokens whose key ``match``es (a revoked identity's); how many."""
        doomed = [k for k in self._entries if match(k)]
        for k in doomed:
            del self._entries[k]
        return len(doomed)

    def _store(self, key: K, token: Token) -> None:
        p = self.policy
        lifetime = max(token.expires_at - token.obtained_at, 0.0)
        if len(self._entries) >= p.max_entries:
            # Crude but bounded: identities come and go; a full cache simply starts over.
            self._entries.clear()
        self._entries[key] = _Entry(token, token.obtained_at + lifetime * p.refresh_at,
                                    token.expires_at - min(p.min_remaining, lifetime / 4))

    async def _fetch_with_retries(self, key: K) -> Token:
        p = self.policy
        reason = "no attempt made"
        for attempt in range(p.retries + 1):
            if attempt:
                await asyncio.sleep(p.backoff * 2 ** (attempt - 1))
            self.fetches += 1
            try:
                async with asyncio.timeout(p.timeout):
                    token = await self._fetch(key)
            except TimeoutError:
                reason = f"token endpoint did not answer within {p.timeout:g}s"
                continue
            except FetchError as e:
                reason = e.reason
                if not e.retryable:
                    break
                continue
            if not math.isfinite(token.expires_at):
                # json accepts Infinity and NaN: such a token would be cached forever, or never.
                reason = "token endpoint gave a non-finite expiry"
                continue
            if token.expires_at - token.obtained_at > MAX_LIFETIME:
                token = dataclasses.replace(token, expires_at=token.obtained_at + MAX_LIFETIME)
            if token.expires_at - min(p.min_remaining, (token.expires_at - token.obtained_at) / 4) \
                    <= self._clock():
                reason = "token endpoint issued a token that is already expired"
                continue
            return token
        log.info("%s: fetch failed after %d attempt(s): %s", self.provider, attempt + 1, reason)
        raise KeylessError("credential_unavailable", reason, self.provider)
