"""proxy/shared without mitmproxy: config validation, sealing, and the shared token store and
revocations against a real redis-server (tests/shared_peers.py), with a counter as the fetch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.credentials.cache import CachePolicy, Token, TokenCache
from proxy.errors import ConfigError, KeylessError
from proxy.model import Identity
from proxy.shared import revocation
from proxy.shared.config import CacheConfig, RedisOptions, RevocationOptions, SecretSource
from proxy.shared.store import Sealer, SharedStore
from proxy.shared.tokens import SharedTokens
from tests.harness import REPO
from tests.shared_peers import RedisServer

KEY = "unit-test-encryption-key-0123456789abcdef"


def problems(cache: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config({"policy": {"dir": str(REPO / "policies")}, "cache": cache}, REPO / "keyless.yaml")
    return e.value.problems


def test_a_password_in_the_url_query_is_refused_too() -> None:
    """redis-py reads ?password= from the URL, which Keyless logs when Redis comes back."""
    found = problems({"redis": {"url": "redis://redis:6379/0?Password=hunter2", "encryption_key_env": "K"}})
    assert "cache.redis.url: must not contain a password: use password_env or password_file" in found
    assert not any("hunter2" in p for p in found)


def test_cache_config_mistakes_are_one_line_each() -> None:
    found = problems({"redis": {"url": "redis://:hunter2@redis:6379", "tls": {"cert_file": "/nonexistent"},
                                "lock_ttl": -1, "password_env": "A", "password_file": "b"},
                      "revocation": {"poll_interval": 1, "max_staleness": 0.5, "sensitiv": []}})
    assert found == [
        "cache.redis.url: must not contain a password: use password_env or password_file",
        "cache.redis.tls.cert_file: set cert_file and key_file together (a client certificate)",
        "cache.redis.tls.cert_file: file not found: /nonexistent",
        "cache.redis.password_env: set one of password_env or password_file, not both",
        "cache.redis.lock_ttl: must be a number >= 0.1, got -1",
        "cache.redis.encryption_key_env: is required: set encryption_key_env or encryption_key_file "
        "(tokens are encrypted at rest in Redis)",
        "cache.redis.tls: tls is set but the url is redis://: use rediss:// for TLS",
        "cache.revocation.max_staleness: must be at least poll_interval",
        "cache.revocation.sensitiv: unknown key (did you mean 'sensitive'?)",
    ]
    assert not any("hunter2" in p for p in found)
    assert problems({"revocation": {"sensitive": ["x"]}}) == [
        "cache.revocation: needs cache.redis: revocations are shared through Redis"]


def test_sealer_binds_values_to_their_key_name_and_names_reveal_nothing() -> None:
    s = Sealer(KEY)
    blob = s.seal("keyless:tok:a", b"secret-token")
    assert b"secret-token" not in blob
    assert s.open("keyless:tok:a", blob) == b"secret-token"
    assert s.open("keyless:tok:b", blob) is None          # moved to another key: does not open
    assert Sealer(KEY + "x").open("keyless:tok:a", blob) is None
    assert s.name("oauth2(x)", "('caller-token',)") == s.name("oauth2(x)", "('caller-token',)")
    assert "caller" not in s.name("oauth2(x)", "('caller-token',)") and repr(s) == "Sealer()"


def test_short_or_missing_encryption_key_is_a_config_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KL_SHORT", "short")
    opts = RedisOptions("redis://127.0.0.1:1", encryption_key=SecretSource(env="KL_SHORT"))
    with pytest.raises(ConfigError) as e:
        SharedStore(CacheConfig(opts))
    assert e.value.problems == ["cache.redis: must be at least 32 characters (e.g. openssl rand -base64 32)"]
    opts = RedisOptions("redis://127.0.0.1:1", encryption_key=SecretSource(env="KL_UNSET_FOR_SURE"))
    with pytest.raises(ConfigError, match="environment variable KL_UNSET_FOR_SURE is not set"):
        SharedStore(CacheConfig(opts))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    r = RedisServer(tmp_path_factory.mktemp("redis-unit")).start()
    yield r
    r.stop()


def store(server: RedisServer, monkeypatch: pytest.MonkeyPatch, **revocation: Any) -> SharedStore:
    monkeypatch.setenv("KL_UNIT_KEY", KEY)
    monkeypatch.setenv("KL_UNIT_PW", server.password)
    opts = RedisOptions(server.url, password=SecretSource(env="KL_UNIT_PW"),
                        encryption_key=SecretSource(env="KL_UNIT_KEY"), wait=2.0, lock_ttl=3.0)
    return SharedStore(CacheConfig(opts, RevocationOptions(**revocation)))


def caches(server: RedisServer, monkeypatch: pytest.MonkeyPatch, n: int, calls: list[str], delay: float = 0.1,
           exclusive: bool = False) -> list[TokenCache[tuple[str, str]]]:
    """``n`` caches, each with its own store (one per simulated replica), one counting fetch."""
    async def fetch(key: tuple[str, str]) -> Token:
        calls.append(key[0])
        n = len(calls)
        await asyncio.sleep(delay)
        now = time.time()
        return Token(f"tok-{n}", now + 300, obtained_at=now)

    out = []
    for _ in range(n):
        shared: SharedTokens[tuple[str, str]] = SharedTokens(store(server, monkeypatch), "oauth2(unit)\0opts",
                                                            exclusive=exclusive, identity_of=lambda k: k[0])
        out.append(TokenCache("oauth2(unit)", fetch, CachePolicy(), shared=shared))
    return out


def test_replicas_share_one_fetch_and_the_value_is_sealed(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.flush()
    calls: list[str] = []
    cs = caches(server, monkeypatch, 3, calls)

    async def main() -> list[Token]:
        try:
            return await asyncio.gather(*(c.get(("spiffe://a", "x")) for c in cs for _ in range(50)))
        finally:
            for c in cs:
                assert c.shared is not None
                await c.shared.store.aclose()

    tokens = asyncio.run(main())
    assert calls == ["spiffe://a"] and {t.value for t in tokens} == {"tok-1"}
    keys, blob = server.dump()
    assert b"tok-1" not in blob and not any("spiffe" in k for k in keys)
    assert sorted(k.split(":")[1] for k in keys) == ["idx", "tok"]


def test_redis_down_means_one_local_fetch_per_replica(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    cs = caches(server, monkeypatch, 3, calls)
    for c in cs:
        assert c.shared is not None
        object.__setattr__(c.shared.store, "options",
                           RedisOptions("redis://127.0.0.1:1", encryption_key=SecretSource(env="KL_UNIT_KEY"),
                                        timeout=0.2))

    async def main() -> None:
        await asyncio.gather(*(c.get(("spiffe://a", "x")) for c in cs for _ in range(20)))
        assert all(c.shared is not None and c.shared.store.up is False for c in cs)

    asyncio.run(main())
    assert len(calls) == 3


def test_revocation_marks_enforces_and_purges(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.flush()
    calls: list[str] = []
    [cache] = caches(server, monkeypatch, 1, calls, delay=0)
    assert cache.shared is not None
    st = cache.shared.store
    rev = revocation.Revocations(st)
    ident = Identity("spiffe://a")

    async def main() -> None:
        await cache.get(("spiffe://a", "x"))
        await cache.get(("spiffe://b", "x"))
        await rev.sync("poll")
        assert rev.mark(ident) == ident
        other = SharedStore(CacheConfig(st.options))
        await revocation.revoke(other, "spiffe://a", "unit", 60)
        await rev.sync("poll")
        marked = rev.mark(ident)
        assert marked.revoked and marked.as_input()["revoked"] is True
        with pytest.raises(KeylessError) as e:
            rev.enforce(marked)
        assert e.value.code == "identity_revoked" and e.value.message == "identity is revoked: unit"
        # Purged locally and in Redis; the other identity's token stays.
        assert cache.peek(("spiffe://a", "x")) is None and cache.peek(("spiffe://b", "x")) is not None
        assert await cache.shared.load(("spiffe://a", "x")) is None
        assert await cache.shared.load(("spiffe://b", "x")) is not None
        assert [e.identity for e in await revocation.listing(other)] == ["spiffe://a"]
        await revocation.lift(other, "spiffe://a")
        await rev.sync("poll")
        assert not rev.mark(ident).revoked
        await other.aclose()
        await st.aclose()

    asyncio.run(main())


def test_sensitive_identity_fails_closed_when_state_is_unknown(server: RedisServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    st = store(server, monkeypatch, sensitive=("spiffe://pay/*",), max_staleness=1.0)
    rev = revocation.Revocations(st, mono=lambda: now[0])
    rev.apply(0, {}, "poll")
    rev._synced = 0.0
    assert not rev.mark(Identity("spiffe://pay/x")).revoked
    now[0] = 1.5  # no sync for longer than max_staleness
    with pytest.raises(KeylessError) as e:
        rev.mark(Identity("spiffe://pay/x"))
    assert e.value.code == "revocation_unknown" and e.value.status == 503
    assert not rev.mark(Identity("spiffe://other")).revoked  # not sensitive: served on what is known
    assert rev.counts["state", "unknown"] == 1 and rev.counts["denied", "unknown"] == 1


def test_store_repr_has_no_secret(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    st = store(server, monkeypatch)
    assert KEY not in repr(st) and server.password not in repr(st) and KEY not in repr(st.options)


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_slow_holder_is_waited_for_only_as_long_as_wait_unless_exclusive(
        server: RedisServer, monkeypatch: pytest.MonkeyPatch, exclusive: bool) -> None:
    server.flush()
    calls: list[str] = []
    a, b = caches(server, monkeypatch, 2, calls, delay=0.8, exclusive=exclusive)
    for c in (a, b):
        assert c.shared is not None
        object.__setattr__(c.shared.store, "options", RedisOptions(
            server.url, password=SecretSource(env="KL_UNIT_PW"), encryption_key=SecretSource(env="KL_UNIT_KEY"),
            wait=0.3, lock_ttl=5.0))

    async def main() -> list[Token]:
        first = asyncio.create_task(a.get(("spiffe://a", "x")))
        await asyncio.sleep(0.1)  # a holds the lock
        return [await b.get(("spiffe://a", "x")), await first]

    tokens = asyncio.run(main())
    # Exclusive (a rotating refresh token): b never fetched beside the holder and got its token.
    assert len(calls) == (1 if exclusive else 2)
    assert (tokens[0].value == tokens[1].value) is exclusive


def test_sigv4_triple_round_trips_sealed(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.credentials import ReadOnlyCredentials

    server.flush()
    st = store(server, monkeypatch)
    shared: SharedTokens[tuple[str, str]] = SharedTokens(st, "aws_sigv4(unit)\0opts", encode=list,
                                                        decode=lambda d: ReadOnlyCredentials(*d))
    creds = ReadOnlyCredentials("ASIAUNIT", "unit-secret-key", "unit-session-token")

    async def main() -> Token | None:
        now = time.time()
        await shared.save(("spiffe://a", "arn:aws:iam::1:role/r"), Token("ASIAUNIT", now + 600, creds, now))
        got = await shared.load(("spiffe://a", "arn:aws:iam::1:role/r"))
        await st.aclose()
        return got

    got = asyncio.run(main())
    assert got is not None and got.data == creds and isinstance(got.data, ReadOnlyCredentials)
    _, blob = server.dump()
    assert b"unit-secret-key" not in blob and b"unit-session-token" not in blob


def test_a_shared_token_past_its_refresh_point_is_not_taken(server: RedisServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    [c] = caches(server, monkeypatch, 1, calls, delay=0)
    now = time.time()
    assert c.fresh(Token("t", now + 100, obtained_at=now - 10))
    assert not c.fresh(Token("t", now + 20, obtained_at=now - 80))   # 80 % of its life gone


def test_rediss_verifies_the_server_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS to Redis (rediss://): the server's certificate is checked against tls.ca_file."""
    from proxy.demo import make_tls_files
    from proxy.shared.config import RedisTls
    from proxy.shared.store import StoreDown

    (tmp_path / "tls").mkdir()
    (tmp_path / "other").mkdir()
    server = RedisServer(tmp_path / "redis-tls", tls=make_tls_files(tmp_path / "tls")).start()
    other_ca, _, _ = make_tls_files(tmp_path / "other")
    monkeypatch.setenv("KL_UNIT_KEY", KEY)
    monkeypatch.setenv("KL_UNIT_PW", server.password)

    def tls_store(ca: Path) -> SharedStore:
        return SharedStore(CacheConfig(RedisOptions(server.url, password=SecretSource(env="KL_UNIT_PW"),
                                                    encryption_key=SecretSource(env="KL_UNIT_KEY"),
                                                    tls=RedisTls(ca_file=ca), timeout=2.0)))

    async def main() -> tuple[Token | None, bool]:
        good, bad = tls_store(server.tls[0] if server.tls else Path()), tls_store(other_ca)
        shared: SharedTokens[str] = SharedTokens(good, "oauth2(tls)\0opts")
        now = time.time()
        await shared.save("k", Token("over-tls", now + 60, obtained_at=now))
        got = await shared.load("k")
        try:
            await SharedTokens(bad, "oauth2(tls)\0opts").load("k")
            refused = False
        except StoreDown:
            refused = True
        await good.aclose()
        await bad.aclose()
        return got, refused

    try:
        got, refused = asyncio.run(main())
    finally:
        server.stop()
    assert got is not None and got.value == "over-tls"
    assert refused, "a Redis certificate from another CA was accepted"


def test_an_unreadable_revocation_entry_still_revokes() -> None:
    from proxy.shared.revocation import _parse

    for raw in (b"not json", b"{}", b'{"at": "x", "until": 1}', b"[]"):
        entry = _parse("spiffe://t/app", raw)
        assert entry.identity == "spiffe://t/app" and entry.until > time.time(), raw
    good = _parse("spiffe://t/app", b'{"reason": "leak", "at": 1.0, "until": 2.0}')
    assert (good.reason, good.at, good.until) == ("leak", 1.0, 2.0)
