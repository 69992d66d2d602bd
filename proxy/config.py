"""``keyless.yaml`` -> frozen, validated objects; every problem is reported at once.

Sections: listen, admin, tls, trust, policy, strip, credentials, signing, audit, egress, mcp,
discovery. Plug-in sections (trust providers, credentials) are validated by their own module's
``parse``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from proxy.agents.options import McpConfig
from proxy.agents.options import parse as parse_mcp
from proxy.audit.options import AuditConfig, parse_audit
from proxy.confread import Section
from proxy.egress import EgressConfig
from proxy.egress import parse as parse_egress
from proxy.envexpand import expand as expand_env
from proxy.errors import ConfigError
from proxy.governance.options import DiscoveryConfig, parse_discovery
from proxy.limits import WireLimits
from proxy.limits import parse as parse_limits
from proxy.policy.options import ENGINES, PolicyExtras, parse_extras
from proxy.shared.config import CacheConfig
from proxy.shared.config import parse as parse_cache

DEFAULT_STRIP_HEADERS = (
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "apikey",
    "x-auth-token",
    "x-access-token",
    "private-token",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
)
# Headers an app could use to claim an identity or a client address. Keyless never reads identity
# from them and always strips them, whatever strip.headers says: the upstream must not trust them
# either (they would carry the app's claim, not Keyless's attestation).
IDENTITY_HEADERS = (
    "proxy-authorization",
    "forwarded",
    "x-forwarded-for",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-forwarded-client-cert",
    "x-client-cert",
    "x-ssl-client-cert",
    "client-cert",
    "client-cert-chain",
    "x-spiffe-id",
    "x-workload-id",
    "x-keyless-identity",
)
DEFAULT_STRIP_QUERY = ("api_key", "apikey", "api-key", "access_token", "token")


@dataclass(frozen=True, slots=True)
class ListenConfig:
    address: str = "127.0.0.1"
    port: int = 8080
    mode: str = "regular"
    # On SIGTERM: stop accepting, let in-flight requests finish for up to this long, then exit.
    drain_seconds: float = 10.0
    # Processes sharing the port through SO_REUSEPORT (proxy/workers.py); 1 = no fork.
    workers: int = 1
    # Request bodies larger than this (bytes) are refused with 413 body_too_large, by Keyless
    # itself, buffered or streamed. Responses are not limited here.
    max_request_body: int = 64 << 20
    # Text responses up to this size are buffered and scanned whole for a reflected credential;
    # longer ones are scanned as they stream (proxy/reflect.py).
    redact_max_body: str = "4m"
    # Responses over this size are refused (502 response_too_large); None: no limit.
    max_response_body: str | None = None
    # Header size and count, timeouts and the connection cap (proxy/limits.py).
    limits: WireLimits = WireLimits()


@dataclass(frozen=True, slots=True)
class AdminConfig:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 8081


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_dir: Path
    upstream_ca: Path | None = None
    # A copy of the CA certificate (never the key) for apps to trust, e.g. on a shared volume.
    publish_ca: Path | None = None
    # The system's CA bundle plus Keyless's CA (proxy/clientenv.py), for apps that also reach
    # hosts directly: their SSL_CERT_FILE must still hold the public roots.
    publish_bundle: Path | None = None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    dir: Path
    engine: str = "embedded"
    decision: str = "data.keyless.egress.decision"
    extras: PolicyExtras = PolicyExtras()


@dataclass(frozen=True, slots=True)
class StripConfig:
    headers: tuple[str, ...] = DEFAULT_STRIP_HEADERS + IDENTITY_HEADERS[1:]
    query_params: tuple[str, ...] = DEFAULT_STRIP_QUERY
    cookies: bool = True


@dataclass(frozen=True, slots=True)
class SigningConfig:
    algorithm: str = "ES256"
    key_file: Path | None = None
    issuer: str = "keyless"


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """A trust provider or credential: its name, its type and its type-specific options."""

    name: str
    type: str
    options: Any


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    listen: ListenConfig
    admin: AdminConfig
    tls: TlsConfig
    trust: tuple[PluginConfig, ...]
    policy: PolicyConfig
    strip: StripConfig
    credentials: Mapping[str, PluginConfig]
    signing: SigningConfig
    audit: AuditConfig
    egress: EgressConfig = EgressConfig()
    mcp: McpConfig = McpConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    cache: CacheConfig = CacheConfig()


def _request_body_limit(s: Section) -> int:
    """``listen.max_request_body``; ``listen.max_body_size`` is its deprecated former name."""
    from proxy.answers import parse_size

    key = "max_request_body"
    if s.has("max_body_size"):
        if s.has(key):
            s.error("set max_request_body only (max_body_size is its deprecated alias)", "max_body_size")
        else:
            key = "max_body_size"
            logging.getLogger("keyless").warning("%s is deprecated: use listen.max_request_body", s.key_path(key))

    def check(value: Any) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return value if value > 0 else None
        try:
            return parse_size(value) if isinstance(value, str) else None
        except ValueError:
            return None

    limit: int = s._get(key, 64 << 20, check, "a size such as 512k, 64m or 1g (bytes when a number)")
    return limit


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise ConfigError listing every problem found."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config ({e.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError([f"{where}: malformed YAML ({problem})"]) from None
    # ${VAR} / ${VAR:-default} (proxy/envexpand.py); unset variables are reported with the rest.
    env_problems: list[str] = []
    raw = expand_env(raw, os.environ, env_problems)
    try:
        config = parse_config(raw, path)
    except ConfigError as e:
        raise ConfigError(env_problems + e.problems, partial=e.partial) from None
    if env_problems:
        raise ConfigError(env_problems, partial=config)
    return config


def parse_config(raw: Any, source: Path) -> Config:
    # Imported here: the registries import plug-in modules that import this one's types.
    from proxy.credentials import CREDENTIALS
    from proxy.trust import TRUST_PROVIDERS

    problems: list[str] = []
    base = source.parent.resolve()
    top = Section(raw, "", problems, base)

    s = top.section("listen")
    listen = ListenConfig(
        address=s.text("address", "127.0.0.1"),
        port=s.integer("port", 8080, lo=0, hi=65535),
        mode=s.choice("mode", ("regular", "transparent"), "regular"),
        drain_seconds=s.number("drain_seconds", 10.0),
        workers=s.integer("workers", 1, lo=1, hi=64),
        max_request_body=_request_body_limit(s),
        redact_max_body=s.text("redact_max_body", "4m"),
        max_response_body=s.text("max_response_body", None),
        limits=parse_limits(s.section("limits")),
    )
    for key in ("redact_max_body", "max_response_body"):
        value = getattr(listen, key)
        if value is not None and not re.fullmatch(r"[1-9][0-9]*[kmg]?", value):
            s.error("must be a size such as 512k, 64m or 1g", key)
    if listen.workers > 1 and listen.mode == "transparent":
        s.error("workers > 1 is supported in regular mode only (transparent listeners cannot share the port)",
                "workers")
    if listen.workers > 1 and listen.port == 0:
        s.error("workers > 1 needs a fixed port: each worker binds it with SO_REUSEPORT", "port")
    s.done()

    s = top.section("admin")
    admin = AdminConfig(
        enabled=s.flag("enabled", True),
        address=s.text("address", "127.0.0.1"),
        port=s.integer("port", 8081, lo=0, hi=65535),
    )
    if listen.workers > 1 and admin.enabled and admin.port == 0:
        s.error("listen.workers > 1 needs a fixed admin port: every worker serves it", "port")
    s.done()

    s = top.section("tls")
    if s.has("verify_upstream") and s.raw["verify_upstream"] is not True:
        s.error("upstream certificates are always verified; remove this key or set it to true",
                "verify_upstream")
    tls = TlsConfig(
        ca_dir=s.path_value("ca_dir", Path("~/.keyless/ca").expanduser()),
        upstream_ca=s.path_value("upstream_ca", None),
        publish_ca=s.path_value("publish_ca", None),
        publish_bundle=s.path_value("publish_bundle", None),
    )
    if tls.upstream_ca is not None and not tls.upstream_ca.is_file():
        s.error(f"file not found: {tls.upstream_ca}", "upstream_ca")
    s.done()

    trust: list[PluginConfig] = []
    raw_trust = top.raw.get("trust")
    top.has("trust")
    if raw_trust is not None and not isinstance(raw_trust, list):
        top.error("must be a list of trust providers", "trust")
        raw_trust = []
    seen: set[str] = set()
    for i, item in enumerate(raw_trust or []):
        ps = Section(item, f"trust[{i}]", problems, base)
        name = ps.text("name")
        kind = ps.choice("type", tuple(TRUST_PROVIDERS))
        if name in seen:
            ps.error(f"duplicate trust provider name {name!r}", "name")
        seen.add(name)
        if name and kind:
            trust.append(PluginConfig(name, kind, TRUST_PROVIDERS[kind].parse(ps)))
        ps.done()

    s = top.section("policy")
    engine = s.choice("engine", ENGINES, "embedded")
    policy = PolicyConfig(
        engine=engine,
        dir=s.path_value("dir", base / "policies"),
        decision=s.text("decision", "data.keyless.egress.decision"),
        extras=parse_extras(s, engine),
    )
    if policy.decision and not policy.decision.startswith("data."):
        s.error("must be a rule path starting with 'data.', e.g. data.keyless.egress.decision",
                "decision")
    s.done()

    s = top.section("strip")
    strip = StripConfig(
        headers=_with_identity(_lower(s.str_list("headers", DEFAULT_STRIP_HEADERS))
                               + _lower(s.str_list("extra_headers", ()))),
        # Lower-cased: parameter names are matched case-insensitively (?API_KEY= is a key too).
        query_params=_lower(s.str_list("query_params", DEFAULT_STRIP_QUERY)
                            + s.str_list("extra_query_params", ())),
        cookies=s.flag("cookies", True),
    )
    s.done()

    credentials: dict[str, PluginConfig] = {}
    cs = top.section("credentials")
    for name in cs.raw:
        item = cs.section(str(name))
        kind = item.choice("type", tuple(CREDENTIALS))
        if kind:
            credentials[str(name)] = PluginConfig(str(name), kind, CREDENTIALS[kind].parse(item))
        item.done()

    s = top.section("signing")
    signing = SigningConfig(
        algorithm=s.choice("algorithm", ("ES256", "RS256", "EdDSA"), "ES256"),
        key_file=s.path_value("key_file", None),
        issuer=s.text("issuer", "keyless"),
    )
    s.done()

    s = top.section("audit")
    audit = parse_audit(s)
    s.done()

    s = top.section("egress")
    egress = parse_egress(s)
    s.done()

    s = top.section("mcp")
    mcp = parse_mcp(s)
    s.done()

    s = top.section("discovery")
    discovery = parse_discovery(s)
    s.done()

    s = top.section("cache")
    cache = parse_cache(s)  # Redis shared by replicas (proxy/shared/config.py)
    s.done()

    top.done()
    config = Config(
        source=source,
        listen=listen,
        admin=admin,
        tls=tls,
        trust=tuple(trust),
        policy=policy,
        strip=strip,
        credentials=MappingProxyType(credentials),
        signing=signing,
        audit=audit,
        egress=egress,
        mcp=mcp,
        discovery=discovery,
        cache=cache,
    )
    if problems:
        raise ConfigError(problems, partial=config)
    return config


def _lower(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.lower() for v in values)


def _with_identity(headers: tuple[str, ...]) -> tuple[str, ...]:
    return headers + tuple(h for h in IDENTITY_HEADERS if h not in headers)
