"""Hot reload for the embedded engine: watch the source, vet a new version, swap atomically.

A new version is read (in a worker thread: file and network I/O), compiled, probed once and run
against its own ``*_test.rego`` tests; only then does it replace the engine in force, by one
reference assignment. Evaluation is synchronous on the event loop, so a request is evaluated
entirely by the old version or entirely by the new one, never a mix, and none fails because of
a reload. A version that fails any step is rejected: the old one stays, the error is logged and
counted (``/readyz`` shows the counters).

Compiling happens on the event loop rather than in a thread: the engine objects are not shared
across threads, and compiling the default policy takes about 2 ms. Its tests take longer and
run in a child process (``run_source_tests_isolated``), off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from proxy.errors import KeylessError
from proxy.model import Decision
from proxy.policy.bundle import fetch_bundle_sync, read_bundle_archive
from proxy.policy.embedded import EmbeddedEngine, PolicyLoadError, PolicySource, read_policy_dir
from proxy.policy.testing import run_source_tests_isolated, run_source_tests_isolated_sync

log = logging.getLogger("keyless.policy")

PROBE_INPUT: dict[str, Any] = {
    "source": {"address": "127.0.0.1", "port": 1},
    "identity": {"id": None, "attestations": []},
    "request": {"method": "GET", "scheme": "https", "host": "example.com", "port": 443,
                "path": "/", "path_template": "/", "query": {}, "headers": {}},
    "context": {"time": "2026-01-01T00:00:00Z", "mode": "regular"},
}


class Loader(Protocol):
    """Where policy versions come from. ``changed`` blocks (files, HTTP): call it in a thread."""

    name: str
    interval: float

    def changed(self) -> PolicySource | None:
        """The new version when the source changed since the last call, else None.

        Raises PolicyLoadError when the new version cannot be read; the next call reports a
        version only once the source changes again.
        """
        ...


class DirLoader:
    """A bundle directory, watched by the names, sizes and mtimes of its files."""

    def __init__(self, directory: Path, interval: float) -> None:
        self.directory = directory
        self.name = str(directory)
        self.interval = interval
        self._seen: tuple[tuple[str, int, int], ...] | None = None

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        found = []
        for f in sorted(self.directory.rglob("*")):
            try:
                st = f.stat()
            except OSError:
                continue
            if f.is_file():
                found.append((str(f.relative_to(self.directory)), st.st_mtime_ns, st.st_size))
        return tuple(found)

    def changed(self) -> PolicySource | None:
        fp = self._fingerprint()
        if fp == self._seen:
            return None
        self._seen = fp
        return read_policy_dir(self.directory, with_tests=True)


class BundleFileLoader:
    """A ``bundle.tar.gz`` on disk, watched by size and mtime."""

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.name = str(path)
        self.interval = interval
        self._seen: tuple[int, int] | None = None

    def changed(self) -> PolicySource | None:
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size) == self._seen:
                return None
            self._seen = (st.st_mtime_ns, st.st_size)
            blob = self.path.read_bytes()
        except OSError as e:
            raise PolicyLoadError([f"{self.path}: cannot read bundle ({e.strerror})"]) from None
        return read_bundle_archive(blob, self.path.name)


class BundleUrlLoader:
    """A bundle server, polled with ``If-None-Match`` (OPA's bundle plugin does the same)."""

    def __init__(self, url: str, interval: float, timeout: float) -> None:
        self.url = url
        self.name = url
        self.interval = interval
        self.timeout = timeout
        self.etag: str | None = None
        self.not_modified = 0

    def changed(self) -> PolicySource | None:
        got = fetch_bundle_sync(self.url, self.etag, self.timeout)
        if not got.changed:
            self.not_modified += 1
            return None
        # Remember the ETag before parsing: a broken version is rejected once, not every poll.
        self.etag = got.etag
        return read_bundle_archive(got.body, self.url)


def vet(source: PolicySource, query: str, run_tests: bool, engine_name: str = "embedded") -> EmbeddedEngine:
    """Compile, probe once and run the version's own tests; raise PolicyLoadError on any failure."""
    engine = EmbeddedEngine(source, query, engine_name)
    try:
        # An evaluation error the compiler cannot see (a conflict, a type error) shows here.
        engine.decide_sync(PROBE_INPUT)
    except KeylessError as e:
        raise PolicyLoadError([e.message]) from None
    if run_tests and source.has_tests:
        failed = [r for r in run_source_tests_isolated_sync(source, engine_name) if not r.passed]
        if failed:
            raise PolicyLoadError([f"test failed: {r.name}: {r.detail}" for r in failed])
    return engine


class ReloadingEngine:
    """The embedded engine in force, replaced atomically when its source changes."""

    def __init__(self, engine: EmbeddedEngine, loader: Loader | None, run_tests: bool) -> None:
        self.query = engine.query
        self.engine_name = engine.engine
        self._current = engine
        self.loader = loader
        self.run_tests = run_tests
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None
        self.on_swap: list[Callable[[], None]] = []

    @property
    def revision(self) -> str:
        return self._current.revision

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        return self._current.decide_sync(input_doc)

    async def watch(self) -> None:
        """Run until cancelled: check the source every ``loader.interval`` seconds."""
        if self.loader is None:
            return
        while True:
            await asyncio.sleep(self.loader.interval)
            await self.check_once()

    async def check_once(self) -> bool:
        """Look for a new version once; True when one was swapped in."""
        if self.loader is None:
            raise RuntimeError("invariant broken: self.loader is None")
        try:
            source = await asyncio.to_thread(self.loader.changed)
            if source is None:
                return False
            engine = vet(source, self.query, run_tests=False, engine_name=self.engine_name)
            if self.run_tests and source.has_tests:
                failed = [r for r in await run_source_tests_isolated(source, self.engine_name) if not r.passed]
                if failed:
                    raise PolicyLoadError([f"test failed: {r.name}: {r.detail}" for r in failed])
        except PolicyLoadError as e:
            self.failures += 1
            self.last_error = "; ".join(e.problems)
            log.error("policy reload rejected, revision %s stays in force: %s", self.revision, self.last_error)
            return False
        except Exception as e:  # noqa: BLE001 - a watcher that dies silently would freeze policy
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("policy reload failed, revision %s stays in force: %s", self.revision, self.last_error)
            return False
        old = self._current.revision
        self._current = engine
        self.reloads += 1
        for callback in self.on_swap:
            callback()
        log.info("policy reloaded from %s: revision %s -> %s", self.loader.name, old, engine.revision)
        return True

    def status(self) -> dict[str, Any]:
        return {"revision": self.revision, "reloads": self.reloads, "reload_failures": self.failures,
                "last_reload_error": self.last_error}
