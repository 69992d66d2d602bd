"""TokenCache on its own: single flight, refresh-ahead, expiry, bounded retries, hit-path cost.

The fetch function here is a counter, standing in for a token endpoint; the end-to-end tests
run the same cache against real issuers.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.credentials.cache import CachePolicy, FetchError, Token, TokenCache
from proxy.errors import KeylessError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, lifetime: float = 100.0, fail: list[FetchError] | None = None,
         delay: float = 0.0, **policy: float) -> tuple[TokenCache[str], list[str]]:
    calls: list[str] = []

    async def fetch(key: str) -> Token:
        calls.append(key)
        if delay:
            await asyncio.sleep(delay)
        if fail:
            raise fail.pop(0)
        return Token(f"tok-{key}-{len(calls)}", clock.now + lifetime, obtained_at=clock.now)

    return TokenCache("oauth2(test)", fetch, CachePolicy(**policy), clock=clock), calls  # type: ignore[arg-type]


def test_concurrent_misses_share_one_fetch() -> None:
    clock = Clock()
    cache, calls = make(clock, delay=0.05)

    async def main() -> list[Token]:
        return await asyncio.gather(*(cache.get("k") for _ in range(100)))

    tokens = asyncio.run(main())
    assert len(calls) == 1 and len({t.value for t in tokens}) == 1


def test_refresh_ahead_serves_current_token_and_replaces_it() -> None:
    clock = Clock()
    cache, calls = make(clock)

    async def main() -> None:
        first = await cache.get("k")
        clock.now += 80                      # past 75 % of a 100 s life
        assert await cache.get("k") is first  # no waiting: served while the refresh runs
        await asyncio.sleep(0.01)
        assert len(calls) == 2
        assert (await cache.get("k")).value != first.value

    asyncio.run(main())


def test_expired_token_is_never_served() -> None:
    clock = Clock()
    cache, calls = make(clock, fail=[])

    async def main() -> None:
        await cache.get("k")
        clock.now += 96                      # 4 s left < min_remaining (5 s)
        assert cache.peek("k") is None
        cache._fetch = failing               # type: ignore[assignment]
        with pytest.raises(KeylessError) as e:
            await cache.get("k")
        assert e.value.code == "credential_unavailable"

    async def failing(key: str) -> Token:
        raise FetchError("token endpoint answered 503")

    asyncio.run(main())


def test_retries_with_backoff_then_fails_with_reason() -> None:
    clock = Clock()
    cache, calls = make(clock, fail=[FetchError("token endpoint answered 502")] * 3, retries=2, backoff=0.01)
    with pytest.raises(KeylessError, match="answered 502"):
        asyncio.run(cache.get("k"))
    assert len(calls) == 3


def test_client_error_is_not_retried() -> None:
    clock = Clock()
    cache, calls = make(clock, fail=[FetchError("token endpoint answered 401", retryable=False)], retries=3)
    with pytest.raises(KeylessError, match="answered 401"):
        asyncio.run(cache.get("k"))
    assert len(calls) == 1


def test_slow_fetch_times_out() -> None:
    clock = Clock()
    cache, calls = make(clock, delay=5, timeout=0.05, retries=1, backoff=0.0)
    started = time.monotonic()
    with pytest.raises(KeylessError, match="within 0.05s"):
        asyncio.run(cache.get("k"))
    assert time.monotonic() - started < 1 and len(calls) == 2


def test_unexpected_fetch_error_still_answers_every_waiter() -> None:
    async def broken(key: str) -> Token:
        raise RuntimeError("bug")

    cache: TokenCache[str] = TokenCache("oauth2(test)", broken)

    async def main() -> list[BaseException | Token]:
        return await asyncio.wait_for(asyncio.gather(*(cache.get("k") for _ in range(5)), return_exceptions=True), 5)

    results = asyncio.run(main())
    assert all(isinstance(r, KeylessError) and r.code == "credential_unavailable" for r in results)


def test_repr_hides_token_values() -> None:
    token = Token("canary-token-value", 1.0, data="canary-data")
    assert "canary" not in repr(token)


def test_hit_path_cost() -> None:
    """The figure quoted on the issue: microseconds per cache hit, no I/O."""
    clock = Clock()
    cache, calls = make(clock)
    n = 100_000

    async def main() -> float:
        await cache.get("k")
        started = time.perf_counter()
        for _ in range(n):
            await cache.get("k")
        return (time.perf_counter() - started) / n * 1e6

    per_hit = asyncio.run(main())
    print(f"\ncache hit path: {per_hit:.2f} us per request ({n} hits, {len(calls)} fetch)")
    assert len(calls) == 1
    assert per_hit < 50


def test_oauth2_apply_hit_cost() -> None:
    """The whole provider on a hit: key from the decision, cache lookup, header, fingerprint."""
    from pathlib import Path

    from proxy.confread import Section
    from proxy.credentials import Runtime
    from proxy.credentials.oauth2 import OAuth2Credential, parse
    from proxy.model import Decision, GrantContext, Identity
    from proxy.signing import Signer

    problems: list[str] = []
    options = parse(Section({"token_url": "https://issuer.test/token", "client_id": "c",
                             "client_auth": "private_key_jwt", "scopes": ["read"]}, "credentials.x", problems,
                            Path(".")))
    assert problems == []
    cred = OAuth2Credential("x", options, Runtime(Signer.create("ES256", None, "keyless")))
    ctx = GrantContext(Identity("spiffe://t/a"), Decision(True, "", "x", {}), "https", "api.test", 443)
    cred.cache._store(cred.key_for(ctx), Token("canary-access-token", time.time() + 3600))

    class Req:
        method, scheme, host, port, path = "GET", "https", "api.test", 443, "/"

        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.query: dict[str, str] = {}

    n = 20_000

    async def main() -> float:
        started = time.perf_counter()
        for _ in range(n):
            await cred.apply(Req(), ctx)
        return (time.perf_counter() - started) / n * 1e6

    per_hit = asyncio.run(main())
    print(f"\noauth2 apply() on a cache hit: {per_hit:.2f} us per request")
    assert cred.cache.fetches == 0 and per_hit < 200


def test_non_finite_expiry_is_refused_and_long_lifetimes_are_capped() -> None:
    from proxy.credentials.cache import MAX_LIFETIME

    clock = Clock()
    inf_cache, calls = make(clock, lifetime=float("inf"), retries=0)
    with pytest.raises(KeylessError) as e:
        asyncio.run(inf_cache.get("k"))
    assert "non-finite" in e.value.message and len(calls) == 1

    long_cache, _ = make(clock, lifetime=10 * 365 * 86400.0)
    token = asyncio.run(long_cache.get("k"))
    assert token.expires_at == clock.now + MAX_LIFETIME
