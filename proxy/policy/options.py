"""The ``policy`` section's options beyond ``engine``/``dir``/``decision``: frozen, validated once.

Kept out of ``proxy.config`` so that the engine options live beside the engines that use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from proxy.confread import Section
from proxy.policy.engines import NAMES

ENGINES = NAMES  # every name policy.engine accepts (the registry is proxy.policy.engines)
DEFAULT_OPA_URL = "http://127.0.0.1:8181"


@dataclass(frozen=True, slots=True)
class OpaOptions:
    """``policy.opa``: where the OPA server is and how long one decision may take."""

    url: str = DEFAULT_OPA_URL
    timeout_ms: int = 200  # Envoy's ext_authz default
    path: str = ""  # the data API path; derived from ``policy.decision`` when empty
    max_connections: int = 32
    ready_interval: float = 0.5  # how often /readyz's warm-up asks OPA until it answers


@dataclass(frozen=True, slots=True)
class BundleOptions:
    """``policy.bundle``: a ``bundle.tar.gz`` from a file or a bundle server (OPA's layout)."""

    path: Path | None = None
    url: str | None = None
    poll_interval: float = 10.0
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ReloadOptions:
    """``policy.reload``: watch the policy source and swap in new versions that pass their tests."""

    enabled: bool = True
    interval: float = 1.0
    run_tests: bool = True


@dataclass(frozen=True, slots=True)
class PostureOptions:
    """``policy.posture``: per-workload posture (a scanner's or EDR's export) for ``input.context``."""

    file: Path | None = None
    url: str | None = None
    poll_interval: float = 30.0
    max_age: float = 300.0


@dataclass(frozen=True, slots=True)
class PolicyExtras:
    opa: OpaOptions = field(default_factory=OpaOptions)
    bundle: BundleOptions | None = None
    reload: ReloadOptions = field(default_factory=ReloadOptions)
    cache_entries: int = 10000
    posture: PostureOptions | None = None
    # ``policy.shadow``: a candidate policy (directory or bundle file) evaluated beside this one
    # on every request, recorded and counted, never enforced (proxy/governance/shadow.py).
    shadow: Path | None = None


def parse_extras(s: Section, engine: str) -> PolicyExtras:
    """Read ``policy.opa``, ``policy.bundle``, ``policy.reload``, ``policy.cache``, ``policy.posture``."""
    opa = OpaOptions()
    if s.has("opa") or engine == "opa":
        o = s.section("opa")
        opa = OpaOptions(
            url=_url(o, "url", DEFAULT_OPA_URL) or DEFAULT_OPA_URL,
            timeout_ms=o.integer("timeout_ms", 200, lo=1, hi=60000),
            path=o.text("path", "").strip("/"),
            max_connections=o.integer("max_connections", 32, lo=1, hi=1024),
            ready_interval=o.number("ready_interval", 0.5, lo=0.05),
        )
        o.done()

    bundle: BundleOptions | None = None
    if s.has("bundle"):
        b = s.section("bundle")
        bundle = BundleOptions(
            path=b.path_value("path", None),
            url=_url(b, "url", None),
            poll_interval=b.number("poll_interval", 10.0, lo=0.1),
            timeout=b.number("timeout", 5.0, lo=0.1),
        )
        if (bundle.path is None) == (bundle.url is None):
            b.error("set exactly one of path or url")
        elif bundle.path is not None and not bundle.path.is_file():
            b.error(f"file not found: {bundle.path}", "path")
        if engine == "opa":
            b.error("OPA loads its own bundles; remove policy.bundle or use engine: embedded")
        b.done()

    r = s.section("reload")
    reload = ReloadOptions(
        enabled=r.flag("enabled", True),
        interval=r.number("interval", 1.0, lo=0.05),
        run_tests=r.flag("run_tests", True),
    )
    r.done()

    c = s.section("cache")
    cache_entries = c.integer("max_entries", 10000, lo=0, hi=10_000_000)
    c.done()

    posture: PostureOptions | None = None
    if s.has("posture"):
        p = s.section("posture")
        posture = PostureOptions(
            file=p.path_value("file", None),
            url=_url(p, "url", None),
            poll_interval=p.number("poll_interval", 30.0, lo=0.1),
            max_age=p.number("max_age", 300.0, lo=0.0),
        )
        if (posture.file is None) == (posture.url is None):
            p.error("set exactly one of file or url")
        p.done()

    shadow: Path | None = s.path_value("shadow", None)
    if shadow is not None and not shadow.exists():
        s.error(f"no policy directory or bundle file at {shadow}", "shadow")
        shadow = None
    return PolicyExtras(opa, bundle, reload, cache_entries, posture, shadow)


def _url(s: Section, key: str, default: str | None) -> str | None:
    value: str | None = s.text(key, default)
    if value is None or value == default:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        s.error(f"must be an http:// or https:// URL, got {value!r}", key)
        return default
    return value.rstrip("/")
