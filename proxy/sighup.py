"""SIGHUP: reload what can be reloaded, say what needs a restart, never exit.

The policy is what reloads (the embedded engine re-reads ``policy.dir`` or the bundle, vets the
new version as hot reload does and swaps it in; an OPA server reloads its own bundles). Every
other config section is compared with the running one: a changed section is named in the log as
needing a restart, and the running values stay in force. A config that no longer parses changes
nothing and is logged with its problems.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy.config import Config, load_config
from proxy.errors import ConfigError

log = logging.getLogger("keyless")

_SECTIONS = ("listen", "admin", "tls", "trust", "policy", "strip", "credentials", "signing", "audit", "egress",
             "mcp")


def changed_sections(old: Config, new: Config) -> list[str]:
    out = []
    for name in _SECTIONS:
        a, b = getattr(old, name), getattr(new, name)
        if name == "credentials":
            a, b = dict(a), dict(b)
        if a != b:
            out.append(name)
    return out


async def reload(running: Config, policy: Any) -> str:
    """Handle one SIGHUP; returns the outcome it logged ("reloaded", "unchanged" or "failed")."""
    try:
        new = await asyncio.to_thread(load_config, running.source)
    except ConfigError as e:
        log.error("SIGHUP: %s has %d problem(s), nothing reloaded: %s", running.source, len(e.problems),
                  "; ".join(e.problems))
        return "failed"
    restart = changed_sections(running, new)
    if restart:
        log.warning("SIGHUP: changes in %s need a restart; the running values stay in force", ", ".join(restart))
    if "policy" in restart or policy is None:
        return "unchanged"
    from proxy.policy.opa import OpaEngine
    from proxy.policy.runtime import make_loader

    base = policy.base
    if isinstance(base, OpaEngine):
        log.info("SIGHUP: the policy is served by OPA, which reloads its own bundles")
        return "unchanged"
    before, failures = base.revision, base.failures
    saved = base.loader
    # A fresh loader reports the current source as changed, so the policy is re-read even when
    # its files kept their mtimes (or periodic reload is off).
    base.loader = make_loader(running.policy.dir, running.policy.extras)
    try:
        swapped = await base.check_once()
    finally:
        base.loader = saved
    if saved is not None and swapped:
        # The watcher's own loader must not see the same change as new again.
        await asyncio.to_thread(saved.changed)
    if swapped:
        log.info("SIGHUP: policy reloaded, revision %s -> %s", before, base.revision)
        return "reloaded"
    if base.failures > failures:
        log.error("SIGHUP: policy reload failed, revision %s stays in force", before)
        return "failed"
    return "unchanged"

