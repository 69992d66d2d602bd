"""Assemble the policy side from config: the engine the broker asks, plus its background tasks.

``build_policy`` does everything ``keyless check`` verifies (read, compile, probe, run the
policy's own tests; for OPA only the optional local compile of ``policy.dir``). ``start`` runs
the watchers: policy reload, OPA warm-up (readiness) and posture polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.policy import PolicyEngine
from proxy.policy.cache import CachingEngine
from proxy.policy.embedded import PolicyLoadError
from proxy.policy.engines import resolve
from proxy.policy.opa import OpaEngine
from proxy.policy.options import PolicyExtras
from proxy.policy.posture import Posture
from proxy.policy.reload import (
    PROBE_INPUT,
    BundleFileLoader,
    BundleUrlLoader,
    DirLoader,
    Loader,
    ReloadingEngine,
    vet,
)


@dataclass
class PolicyRuntime:
    engine: PolicyEngine  # what the broker asks: the cache around the OPA or embedded engine
    base: ReloadingEngine | OpaEngine
    cache: CachingEngine
    posture: Posture | None
    kind: str
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def ready(self) -> bool:
        return not isinstance(self.base, OpaEngine) or self.base.answered

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"engine": self.kind, **self.base.status(), "cache": self.cache.status()}
        if self.posture is not None:
            out["posture"] = self.posture.status()
        return out

    async def start(self) -> None:
        if isinstance(self.base, OpaEngine):
            self._tasks.append(asyncio.create_task(self.base.warm_up(PROBE_INPUT)))
        elif self.base.loader is not None:
            self._tasks.append(asyncio.create_task(self.base.watch()))
        if self.posture is not None:
            await asyncio.to_thread(self.posture.refresh)
            self._tasks.append(asyncio.create_task(self.posture.watch()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if isinstance(self.base, OpaEngine):
            await self.base.aclose()


def make_loader(directory: Path, extras: PolicyExtras) -> Loader:
    b = extras.bundle
    if b is not None and b.url is not None:
        return BundleUrlLoader(b.url, b.poll_interval, b.timeout)
    if b is not None and b.path is not None:
        return BundleFileLoader(b.path, extras.reload.interval)
    return DirLoader(directory, extras.reload.interval)


def build_policy(engine_kind: str, directory: Path, query: str, extras: PolicyExtras) -> PolicyRuntime:
    """Raise PolicyLoadError listing every problem with the policy in force at start."""
    posture = Posture(extras.posture) if extras.posture is not None else None
    base: ReloadingEngine | OpaEngine
    spec = resolve(engine_kind)
    if spec.compile is None:
        if directory.is_dir():
            # Not what OPA will serve, but the same files usually are: catch mistakes early.
            vet(DirLoader(directory, 1.0).changed() or _never(), query, extras.reload.run_tests, spec.tests)
        base = OpaEngine(extras.opa, query)
    else:
        loader = make_loader(directory, extras)
        source = loader.changed()
        if source is None:
            raise PolicyLoadError([f"{loader.name}: no policy"])
        engine = vet(source, query, extras.reload.run_tests, spec.name)
        base = ReloadingEngine(engine, loader if extras.reload.enabled else None, extras.reload.run_tests)
    cache = CachingEngine(base, extras.cache_entries)
    if isinstance(base, ReloadingEngine):
        base.on_swap.append(cache.clear)
    return PolicyRuntime(cache, base, cache, posture, spec.name)


def _never() -> Any:
    raise PolicyLoadError(["policy directory is empty"])
