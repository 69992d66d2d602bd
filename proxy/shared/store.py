"""One Redis client per Keyless process, whether Redis is up, and what the shared state did.

Every Redis call goes through ``SharedStore.run``: one operation, bounded by ``cache.redis.timeout``.
A failure marks Redis down for a second, during which the token path does not try it at all
(replicas fetch on their own instead of stalling on a dead connection); the revocation poller
keeps probing and marks it up again. Each change of state is logged once and counted.

``Sealer`` derives two keys from the configured encryption key (HKDF-SHA256): an AES-256-GCM key
for values and an HMAC key for key names, so that neither a token nor the cache key it was
fetched for (which may hold a caller's own token) ever appears in Redis in the clear. The Redis
key name is the AEAD's associated data: a sealed value moved to another key does not open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.errors import ConfigError
from proxy.shared.config import CacheConfig, RedisOptions, read_key

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from redis.asyncio import Redis

    from proxy.shared.tokens import SharedTokens

log = logging.getLogger("keyless.shared")
T = TypeVar("T")

# After a failed Redis call the token path leaves Redis alone this long (the poller probes).
DOWN_BACKOFF = 1.0
_VERSION = b"\x01"


class StoreDown(Exception):
    """Redis could not be used for this operation (down, slow, refused auth): go local."""


class Sealer:
    """AES-GCM for values, HMAC-SHA256 for names; both keys derived from one secret."""

    def __init__(self, secret: str) -> None:
        def derive(info: bytes) -> bytes:
            return HKDF(hashes.SHA256(), 32, salt=b"keyless shared cache", info=info).derive(secret.encode())

        self._aead = AESGCM(derive(b"seal v1"))
        self._mac = derive(b"name v1")

    def __repr__(self) -> str:
        return "Sealer()"

    def name(self, *parts: str) -> str:
        """A stable, secret-free name for ``parts`` (128 bits of an HMAC, hex)."""
        msg = "\0".join(parts).encode()
        return hmac.new(self._mac, msg, hashlib.sha256).hexdigest()[:32]

    def seal(self, slot: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, slot.encode())

    def open(self, slot: str, blob: bytes) -> bytes | None:
        """The plaintext, or None if ``blob`` was not sealed for ``slot`` with this key."""
        if len(blob) < 13 + 16 or blob[:1] != _VERSION:
            return None
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], slot.encode())
        except InvalidTag:
            return None


class SharedStore:
    """The process's Redis client (created lazily, on the running loop) and its health."""

    def __init__(self, config: CacheConfig, clock: Callable[[], float] = time.monotonic) -> None:
        options = config.redis
        if options is None:
            raise RuntimeError("invariant broken: SharedStore without cache.redis")
        self.options: RedisOptions = options
        self.revocation = config.revocation
        self.prefix = options.key_prefix
        # Imported here, like every proxy.credentials name in this package: the providers
        # import this package, and the registry imports the providers.
        from proxy.credentials.static import SecretError

        try:
            self.sealer = Sealer(read_key(options))
            self._password = options.password.read() if options.password.configured else None
        except SecretError as e:
            raise ConfigError([f"cache.redis: {e}"]) from None
        self._clock = clock
        self._client: Redis | None = None
        self.up: bool | None = None  # None: not tried yet
        self._down_until = 0.0
        self.counts: Counter[tuple[str, str]] = Counter()
        self.tokens: list[SharedTokens[Any]] = []
        # The revocation state (proxy.shared.revocation.Revocations), when it runs.
        self.revocations: Any = None

    def __repr__(self) -> str:
        return f"SharedStore(up={self.up!r}, prefix={self.prefix!r})"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def client(self) -> Redis:
        if self._client is None:
            from redis.asyncio import Redis

            o = self.options
            kwargs: dict[str, Any] = {}
            if o.uses_tls:
                kwargs.update(ssl_ca_certs=str(o.tls.ca_file) if o.tls.ca_file else None,
                              ssl_certfile=str(o.tls.cert_file) if o.tls.cert_file else None,
                              ssl_keyfile=str(o.tls.key_file) if o.tls.key_file else None,
                              ssl_cert_reqs="required", ssl_check_hostname=True)
            self._client = Redis.from_url(
                o.url, username=o.username, password=self._password, socket_timeout=o.timeout,
                socket_connect_timeout=o.timeout, retry_on_timeout=False, health_check_interval=0,
                max_connections=64, **kwargs)
        return self._client

    def available(self) -> bool:
        """Whether the token path should try Redis now (not within a second of a failure)."""
        return self._clock() >= self._down_until

    async def run(self, what: str, op: Callable[[Redis], Awaitable[T]], probe: bool = False) -> T:
        """Run one Redis operation; raise StoreDown (after marking Redis down) if it fails.

        ``probe``: try even while marked down (the poller's health check)."""
        from redis.exceptions import RedisError

        if not probe and not self.available():
            raise StoreDown(what)
        try:
            async with asyncio.timeout(self.options.timeout * 2):
                result = await op(self.client())
        except (RedisError, OSError, TimeoutError) as e:
            self.failed(what, e)
            raise StoreDown(what) from None
        self.recovered()
        return result

    def failed(self, what: str, e: BaseException) -> None:
        self._down_until = self._clock() + DOWN_BACKOFF
        if self.up is not False:
            # The type and redis-py's message (host, port, errno): the URL holds no password.
            log.warning("redis is down (%s: %s: %s); replicas serve from local caches and fetch on their own",
                        what, type(e).__name__, str(e)[:160])
            self.counts["state", "down"] += 1
            self.up = False

    def recovered(self) -> None:
        self._down_until = 0.0
        if self.up is not True:
            log.warning("redis is up (%s)", self.options.url.split("?", 1)[0])
            self.counts["state", "up"] += 1
            self.up = True

    def count(self, kind: str, result: str) -> None:
        self.counts[kind, result] += 1

    def purge_local(self, identity: str) -> int:
        """Drop every locally cached token fetched for ``identity``; how many were dropped."""
        return sum(t.purge_local(identity) for t in self.tokens)

    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception as e:  # noqa: BLE001 - closing must not fail a shutdown
                log.debug("redis close failed: %s", type(e).__name__)
            self._client = None

    def collect(self) -> Iterable[Metric]:
        """Metrics for /metrics (proxy.telemetry's collector)."""
        from proxy.telemetry import counter, gauge

        c = self.counts
        yield gauge("keyless_redis_up", "Whether the last Redis operation succeeded (-1: not tried yet)",
                    samples=[((), -1.0 if self.up is None else float(self.up))])
        yield counter("keyless_redis_state_changes", "Redis went down or came back", ("state",),
                      [((s,), float(c["state", s])) for s in ("down", "up")])
        yield counter("keyless_shared_cache", "Shared token cache lookups and fetches by result", ("result",),
                      [((r,), float(n)) for (k, r), n in sorted(c.items()) if k == "cache"])
        rev = self.revocations
        if rev is not None:
            yield from rev.collect()


def store_for(config: CacheConfig) -> SharedStore | None:
    """The process's shared store when ``cache.redis`` is configured; ConfigError if unusable."""
    return SharedStore(config) if config.redis is not None else None
