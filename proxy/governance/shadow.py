"""Shadow mode: a candidate policy evaluated beside the enforcing one, changing nothing.

``policy.shadow`` names a policy directory or ``bundle.tar.gz``. It is read, compiled, probed
and tested at start like the main policy (a broken candidate is a config problem ``keyless
check`` reports), then watched and hot-reloaded the same way (``proxy.policy.reload``): a new
version that fails is rejected and the old one stays. On every request that reaches a decision
the pipeline asks ``Shadow.decide`` with the same input document as the enforcing engine; the
answer goes into the audit record (``shadow``) and the ``keyless_shadow_decisions_total``
metric, never into the outcome. ``decide`` never raises: a candidate's error is recorded as a
would-deny with its reason, and the request carries on as the enforcing policy decided.

The candidate is evaluated in process (the main policy's embedded engine, or the default one
when the main policy is served by OPA), behind its own decision cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from proxy.audit.event import ShadowRecord
from proxy.errors import KeylessError
from proxy.policy.cache import CachingEngine
from proxy.policy.embedded import PolicyLoadError
from proxy.policy.engines import DEFAULT_EMBEDDED, resolve
from proxy.policy.options import PolicyExtras
from proxy.policy.reload import BundleFileLoader, DirLoader, Loader, ReloadingEngine, vet

log = logging.getLogger("keyless.policy.shadow")


class Shadow:
    def __init__(self, base: ReloadingEngine, cache: CachingEngine, name: str) -> None:
        self.base = base
        self.cache = cache
        self.name = name
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def revision(self) -> str:
        return self.base.revision

    async def decide(self, input_doc: dict[str, Any]) -> ShadowRecord:
        """What the candidate would decide for this input. Never raises (but on cancellation)."""
        revision = self.base.revision
        try:
            d = await self.cache.decide(input_doc)
        except KeylessError as e:
            self.errors += 1
            return ShadowRecord(False, e.message, revision, None, getattr(e, "reason", None) or e.code)
        except Exception as e:  # noqa: BLE001 - whatever the candidate does, the request is not its to change
            self.errors += 1
            log.warning("shadow policy %s failed: %s", self.name, type(e).__name__)
            return ShadowRecord(False, f"shadow evaluation failed: {type(e).__name__}", revision, None,
                                "internal_error")
        return ShadowRecord(d.allow, d.reason, d.revision or revision, d.credential)

    async def start(self) -> None:
        if self.base.loader is not None:
            self._task = asyncio.create_task(self.base.watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def status(self) -> dict[str, Any]:
        return {"source": self.name, **self.base.status(), "errors": self.errors}


def build_shadow(where: Path, engine_kind: str, query: str, extras: PolicyExtras) -> Shadow:
    """Read, compile, probe and test the candidate; raise PolicyLoadError (``policy.shadow: ...``)."""
    spec = resolve(engine_kind)
    engine_name = spec.name if spec.compile is not None else DEFAULT_EMBEDDED
    loader: Loader
    if where.is_file():
        loader = BundleFileLoader(where, extras.reload.interval)
    elif where.is_dir():
        loader = DirLoader(where, extras.reload.interval)
    else:
        raise PolicyLoadError([f"shadow: {where}: no policy directory or bundle file there"])
    try:
        source = loader.changed()
        if source is None:
            raise PolicyLoadError([f"{loader.name}: no policy"])
        engine = vet(source, query, extras.reload.run_tests, engine_name)
    except PolicyLoadError as e:
        raise PolicyLoadError([f"shadow: {p}" for p in e.problems]) from None
    base = ReloadingEngine(engine, loader if extras.reload.enabled else None, extras.reload.run_tests)
    cache = CachingEngine(base, extras.cache_entries)
    base.on_swap.append(cache.clear)
    return Shadow(base, cache, str(where))
