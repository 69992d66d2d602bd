"""Key sets against a real issuer: one fetch for many concurrent callers, bounded staleness."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.trust.jwks import CachePolicy, KeySet, KeySetError, KeySource, parse_jwks, usable_key
from tests.issuer import Issuer


def test_concurrent_cold_callers_share_one_fetch(tmp_path: Path) -> None:
    issuer = Issuer(tmp_path / "issuer").start()
    issuer.delay = 0.3
    try:
        keys = KeySet("t", KeySource(discovery=issuer.url, ca_file=issuer.ca_file), CachePolicy())

        async def main() -> list[object]:
            return await asyncio.gather(*(keys.key_for("rsa-1", "RS256") for _ in range(20)),
                                        keys.key_for("ec-1", "ES256"))

        got = asyncio.run(main())
        assert len(got) == 21 and issuer.hits == {"discovery": 1, "jwks": 1}
    finally:
        issuer.stop()


def test_stale_keys_expire_on_a_fake_clock(tmp_path: Path) -> None:
    issuer = Issuer(tmp_path / "offline", port=1)
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps(issuer.jwks()))
    now = [1000.0]
    keys = KeySet("t", KeySource(jwks_file=f), CachePolicy(refresh_interval=10, kid_miss_cooldown=5, max_stale=60),
                  clock=lambda: now[0])

    async def main() -> None:
        await keys.key_for("rsa-1", "RS256")
        f.write_text("not json")  # the source breaks
        now[0] += 30
        await keys.key_for("rsa-1", "RS256")  # stale but within max_stale: still served
        await asyncio.sleep(0.05)  # let the background refresh fail
        now[0] += 31
        with pytest.raises(KeySetError, match="stale"):
            await keys.key_for("rsa-1", "RS256")

    asyncio.run(main())


def test_key_and_algorithm_must_agree() -> None:
    issuer = Issuer(Path("/nonexistent"), port=1)
    rsa, ec = parse_jwks(issuer.jwks())
    assert usable_key(rsa, "RS256") is not None and usable_key(ec, "ES256") is not None
    assert usable_key(rsa, "ES256") is None and usable_key(ec, "RS256") is None
    assert usable_key(rsa, "HS256") is None and usable_key(ec, "ES384") is None
    assert usable_key(rsa, "PS256") is None  # the JWK pins alg RS256
    with pytest.raises(KeySetError):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
