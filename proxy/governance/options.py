"""``discovery``: the config section, validated into frozen options (every problem with its key path)."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.confread import Section

# detect-secrets plugins left out by default, and why: on HTTP traffic the entropy detectors flag
# every git SHA, UUID, pagination cursor and CSRF nonce; a public IP address is not a secret; the
# keyword detector reads code-shaped lines, so discovery gives it name/value pairs instead
# (``discovery.keywords``). Name any of them in ``discovery.detectors`` to use it anyway.
EXCLUDED_BY_DEFAULT = ("Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector", "KeywordDetector")
JSON_TYPES = ("application/json", "application/x-www-form-urlencoded")


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    enabled: bool = True
    # detect-secrets plugin class names; empty: every plugin but EXCLUDED_BY_DEFAULT.
    detectors: tuple[str, ...] = ()
    # Name/value pairs (query, cookies, form and JSON fields) go to detect-secrets' KeywordDetector.
    keywords: bool = True
    # Bodies up to this size with a declared length and a JSON or form type are buffered and
    # inspected; 0: bodies are never inspected (and never buffered for it).
    max_body: int = 65536


def parse_discovery(s: Section) -> DiscoveryConfig:
    from proxy.answers import parse_size

    max_body = 65536  # DiscoveryConfig's default
    if s.has("max_body"):
        raw = s.raw.get("max_body")
        try:
            max_body = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0 else parse_size(str(raw))
        except ValueError:
            s.error("must be a size like 64k or a byte count", "max_body")
    detectors = s.str_list("detectors", ())
    if detectors:
        from proxy.governance.discover import plugin_classes

        known = plugin_classes()
        for name in detectors:
            if name not in known:
                s.error(f"unknown detect-secrets plugin {name!r} (one of: {', '.join(sorted(known))})",
                        "detectors")
    return DiscoveryConfig(enabled=s.flag("enabled", True), detectors=detectors,
                           keywords=s.flag("keywords", True), max_body=max_body)
