"""The ``cache`` section: how replicas reach Redis, the key that seals tokens at rest, revocation.

```yaml
cache:
  redis:
    url: rediss://redis.keyless.svc:6379/0     # redis:// or rediss:// (TLS)
    username: keyless                          # Redis 6 ACL user (optional)
    password_env: REDIS_PASSWORD               # or password_file
    tls: {ca_file: ..., cert_file: ..., key_file: ...}
    key_prefix: "keyless:"
    lock_ttl: 15          # seconds a replica's fetch lock lives if it dies holding it
    wait: 5               # seconds the others wait for its token before fetching themselves
    timeout: 0.5          # seconds per Redis operation; slower counts as Redis down
    encryption_key_env: KEYLESS_CACHE_KEY      # or encryption_key_file (>= 32 characters)
  revocation:
    sensitive: ["spiffe://example.org/ns/payments/*"]   # fail closed when state is unknown
    poll_interval: 0.25
    max_staleness: 2
    admin_token_env: KEYLESS_ADMIN_TOKEN       # or admin_token_file: enables POST /revocations
```
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from proxy.confread import Section

MIN_KEY_LENGTH = 32


@dataclass(frozen=True, slots=True)
class RedisTls:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class SecretSource:
    """A secret named by ``X_env`` or ``X_file``; read when needed, never kept in the config."""

    env: str | None = None
    file: Path | None = None

    @property
    def configured(self) -> bool:
        return self.env is not None or self.file is not None

    def read(self) -> str:
        """The secret's value; raises ``proxy.credentials.static.SecretError`` (never showing it)."""
        # Imported here: proxy.config imports this module before the credential registry exists.
        from proxy.credentials.static import SecretError, check_secret, env_missing

        if self.env is not None:
            raw = os.environ.get(self.env)
            if raw is None:
                raise env_missing(self.env)
            return check_secret(raw)
        if self.file is None:
            raise SecretError("no secret source configured")
        try:
            return check_secret(self.file.read_text())
        except OSError as e:
            raise SecretError(f"cannot read {self.file} ({e.strerror})") from None


@dataclass(frozen=True, slots=True)
class RedisOptions:
    url: str
    username: str | None = None
    password: SecretSource = SecretSource()
    tls: RedisTls = RedisTls()
    key_prefix: str = "keyless:"
    lock_ttl: float = 15.0
    wait: float = 5.0
    timeout: float = 0.5
    encryption_key: SecretSource = SecretSource()

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"


@dataclass(frozen=True, slots=True)
class RevocationOptions:
    sensitive: tuple[str, ...] = ()
    poll_interval: float = 0.25
    max_staleness: float = 2.0
    admin_token: SecretSource = SecretSource()

    def is_sensitive(self, identity: str | None) -> bool:
        """Patterns are shell-style (``*`` matches any run, ``/`` included)."""
        return identity is not None and any(fnmatch.fnmatchcase(identity, p) for p in self.sensitive)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    redis: RedisOptions | None = None
    revocation: RevocationOptions = RevocationOptions()


def _secret(s: Section, stem: str, required: bool, what: str) -> SecretSource:
    env, file = s.text(f"{stem}_env", None), s.path_value(f"{stem}_file", None)
    if env is not None and file is not None:
        s.error(f"set one of {stem}_env or {stem}_file, not both", f"{stem}_env")
    elif required and env is None and file is None:
        s.error(f"is required: set {stem}_env or {stem}_file ({what})", f"{stem}_env")
    return SecretSource(env, file)


def parse(s: Section) -> CacheConfig:
    """Validate ``cache`` (every problem is appended to the section's list)."""
    redis: RedisOptions | None = None
    if s.has("redis"):
        r = s.section("redis")
        url = r.text("url")
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                r.error("must be redis://HOST[:PORT][/DB] or rediss://... for TLS", "url")
            elif parts.password or any(k.lower() == "password" for k, _ in parse_qsl(parts.query)):
                # A password in the URL (userinfo or redis-py's ?password=) would be printed
                # wherever the URL is: use password_env.
                r.error("must not contain a password: use password_env or password_file", "url")
        t = r.section("tls")
        tls = RedisTls(t.path_value("ca_file", None), t.path_value("cert_file", None), t.path_value("key_file", None))
        if (tls.cert_file is None) != (tls.key_file is None):
            t.error("set cert_file and key_file together (a client certificate)", "cert_file")
        for key in ("ca_file", "cert_file", "key_file"):
            p = getattr(tls, key)
            if p is not None and not p.is_file():
                t.error(f"file not found: {p}", key)
        t.done()
        prefix = r.text("key_prefix", "keyless:")
        if prefix and any(c in prefix for c in " \r\n\0"):
            r.error("must not contain spaces or control characters", "key_prefix")
        redis = RedisOptions(
            url=url or "", username=r.text("username", None),
            password=_secret(r, "password", False, "the Redis AUTH password"), tls=tls, key_prefix=prefix,
            lock_ttl=r.number("lock_ttl", 15.0, lo=0.1), wait=r.number("wait", 5.0, lo=0.0),
            timeout=r.number("timeout", 0.5, lo=0.01),
            encryption_key=_secret(r, "encryption_key", True, "tokens are encrypted at rest in Redis"),
        )
        if tls != RedisTls() and url and not redis.uses_tls:
            r.error("tls is set but the url is redis://: use rediss:// for TLS", "tls")
        r.done()
    v = s.section("revocation")
    revocation = RevocationOptions(
        sensitive=v.str_list("sensitive", ()),
        poll_interval=v.number("poll_interval", 0.25, lo=0.05),
        max_staleness=v.number("max_staleness", 2.0, lo=0.1),
        admin_token=_secret(v, "admin_token", False, "the bearer token of POST /revocations"),
    )
    if revocation.max_staleness < revocation.poll_interval:
        v.error("must be at least poll_interval", "max_staleness")
    if v.raw and redis is None:
        v.error("needs cache.redis: revocations are shared through Redis")
    v.done()
    return CacheConfig(redis, revocation)


def read_key(options: RedisOptions) -> str:
    """The encryption key's text; raises SecretError (never showing it) when unusable."""
    from proxy.credentials.static import SecretError

    key = options.encryption_key.read()
    if len(key) < MIN_KEY_LENGTH:
        raise SecretError(f"must be at least {MIN_KEY_LENGTH} characters (e.g. openssl rand -base64 32)")
    return key
