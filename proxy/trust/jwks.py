"""Issuer key sets for the ``jwt`` trust provider: fetched off the request path, cached, bounded.

Rules (the ones Envoy's ``jwt_authn`` and SPIRE's OIDC discovery provider follow):

* keys come from OIDC discovery (``/.well-known/openid-configuration`` -> ``jwks_uri``), a JWKS
  URL or a local JWKS file; never from the token (``jku``, ``x5u``, ``jwk`` headers are ignored);
* fetches are aiohttp coroutines with a timeout, one at a time per issuer (concurrent callers
  wait on the same fetch), never a blocking call on the event loop;
* a ``kid`` the cache does not know triggers at most one refresh per cooldown, so a flood of
  random ``kid`` values cannot turn Keyless into a weapon against the issuer;
* when the issuer is down, the last good keys are served for ``max_stale`` seconds after the
  last successful fetch; past that every token from the issuer fails closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWTError

log = logging.getLogger("keyless")

MAX_DOCUMENT_BYTES = 1 << 20
# The only JWS algorithms Keyless will ever verify: asymmetric, and each tied to one key type
# (and curve), so a key can never be used with an algorithm family it was not made for.
ALGORITHM_KEYS: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
MIN_RSA_BITS = 2048
# JWK members that only a private key has: a JWKS that publishes one is misconfigured.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class KeySetError(Exception):
    """A key set problem, phrased for the refusal message (no key material, no token)."""


@dataclass(frozen=True, slots=True)
class KeySource:
    """Exactly one of the three is set."""

    discovery: str | None = None  # the issuer URL; the document lives under /.well-known/
    jwks_url: str | None = None
    jwks_file: Path | None = None
    ca_file: Path | None = None

    def describe(self) -> str:
        if self.jwks_file is not None:
            return f"file {self.jwks_file}"
        return f"discovery {self.discovery}" if self.discovery else f"JWKS {self.jwks_url}"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    refresh_interval: float = 300.0
    kid_miss_cooldown: float = 30.0
    max_stale: float = 3600.0
    fetch_timeout: float = 5.0


class KeySet:
    """The verification keys of one issuer."""

    def __init__(self, label: str, source: KeySource, policy: CachePolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.source = source
        self.policy = policy
        self.clock = clock
        self._keys: list[dict[str, Any]] = []
        self._fetched_at: float | None = None
        self._last_attempt = float("-inf")
        self._inflight: asyncio.Task[bool] | None = None
        # Built now, at startup: loading a CA file is blocking I/O and must not run on the loop.
        self._ssl = ssl.create_default_context(cafile=str(source.ca_file) if source.ca_file else None)

    async def key_for(self, kid: str | None, alg: str) -> PyJWK:
        """The key to verify a token with header ``kid``/``alg``; raises KeySetError if none may be used."""
        now = self.clock()
        fetched_at = self._fetched_at
        if fetched_at is None or now - fetched_at > self.policy.max_stale:
            # Nothing usable cached: wait for a fetch, but at most one per cooldown.
            if self._may_refresh(now):
                await self._refresh()
            fetched_at = self._fetched_at
            if fetched_at is None:
                raise KeySetError("issuer keys are unavailable")
            if self.clock() - fetched_at > self.policy.max_stale:
                raise KeySetError("issuer keys are stale and the issuer cannot be reached")
        elif now - fetched_at >= self.policy.refresh_interval:
            # Refresh in the background: the cached keys answer this request without waiting.
            self._refresh_soon(now)
        found = self._find(kid, alg)
        if found is None and self._may_refresh(self.clock()):
            await self._refresh()
            found = self._find(kid, alg)
        if found is None:
            raise KeySetError("no issuer key matches the token's kid and alg")
        return found

    def _find(self, kid: str | None, alg: str) -> PyJWK | None:
        candidates = [k for k in self._keys if kid is None or k.get("kid") == kid]
        if kid is None and len(candidates) != 1:
            # Without a kid, only an issuer with a single key is unambiguous.
            return None
        for jwk in candidates:
            key = usable_key(jwk, alg)
            if key is not None:
                return key
        return None

    def _may_refresh(self, now: float) -> bool:
        # Joining a fetch already under way costs the issuer nothing; a new one waits for the cooldown.
        return self._inflight is not None or now - self._last_attempt >= self.policy.kid_miss_cooldown

    def _refresh_soon(self, now: float) -> None:
        if self._inflight is None and now - self._last_attempt >= self.policy.kid_miss_cooldown:
            self._inflight = asyncio.get_running_loop().create_task(self._fetch_once())

    async def _refresh(self) -> bool:
        if self._inflight is None:
            self._inflight = asyncio.get_running_loop().create_task(self._fetch_once())
        # shield: a cancelled request must not cancel the fetch other requests wait on.
        return await asyncio.shield(self._inflight)

    async def _fetch_once(self) -> bool:
        self._last_attempt = self.clock()
        try:
            doc = await self._load()
            keys = parse_jwks(doc)
        except KeySetError as e:
            log.warning("jwt(%s): cannot refresh keys from %s: %s", self.label, self.source.describe(), e)
            return False
        except Exception as e:  # noqa: BLE001 - any failure keeps the old keys, never crashes the loop
            log.warning("jwt(%s): cannot refresh keys from %s: %s", self.label, self.source.describe(),
                        type(e).__name__)
            return False
        finally:
            self._inflight = None
        self._keys = keys
        self._fetched_at = self.clock()
        log.info("jwt(%s): loaded %d keys from %s", self.label, len(keys), self.source.describe())
        return True

    async def _load(self) -> Any:
        src = self.source
        if src.jwks_file is not None:
            data = await asyncio.to_thread(src.jwks_file.read_bytes)
            return _json(data)
        timeout = aiohttp.ClientTimeout(total=self.policy.fetch_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = src.jwks_url
            if src.discovery is not None:
                meta = await self._get(session, src.discovery.rstrip("/") + "/.well-known/openid-configuration")
                if not isinstance(meta, dict) or meta.get("issuer") != src.discovery:
                    # OIDC Discovery 1.0 section 4.3: the document must name the issuer exactly.
                    raise KeySetError("discovery document names another issuer")
                url = meta.get("jwks_uri")
                if not isinstance(url, str) or not url.startswith("https://"):
                    raise KeySetError("discovery document has no https jwks_uri")
            if url is None:
                raise RuntimeError("invariant broken: url is None")
            return await self._get(session, url)

    async def _get(self, session: aiohttp.ClientSession, url: str) -> Any:
        async with session.get(url, ssl=self._ssl, allow_redirects=False,
                               headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise KeySetError(f"HTTP {resp.status} from {url}")
            data = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise KeySetError(f"document from {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        return _json(data)


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise KeySetError("malformed JSON") from None


def parse_jwks(doc: Any) -> list[dict[str, Any]]:
    """The public signing keys of a JWKS document (RFC 7517), as JWK dicts."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeySetError("not a JWKS document (no keys list)")
    keys: list[dict[str, Any]] = []
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if jwk.get("use", "sig") != "sig" or _PRIVATE_MEMBERS & jwk.keys():
            continue
        keys.append(jwk)
    if not keys:
        raise KeySetError("JWKS has no usable public signing keys")
    return keys


def usable_key(jwk: Mapping[str, Any], alg: str) -> PyJWK | None:
    """``jwk`` as a key for ``alg``, or None when the pair must not be used together."""
    want = ALGORITHM_KEYS.get(alg)
    if want is None or jwk.get("kty") != want[0]:
        return None
    if want[1] is not None and jwk.get("crv") != want[1]:
        return None
    if jwk.get("alg") not in (None, alg):
        return None
    try:
        key = PyJWK(dict(jwk), algorithm=alg)
    except (PyJWTError, ValueError, TypeError):
        return None
    if want[0] == "RSA" and getattr(key.key, "key_size", 0) < MIN_RSA_BITS:
        return None
    return key
