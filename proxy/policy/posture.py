"""Posture context: what a scanner or EDR says about each workload, for ``input.context.posture``.

The document (a JSON file or an HTTP endpoint returning JSON) has the shape such exports have::

    {"generated_at": "2026-11-22T10:00:00Z",
     "workloads": {"spiffe://demo.local/billing": {"status": "pass", "critical_vulns": 0}}}

For each request the policy sees ``{"workload": <that workload's entry or null>, "stale": bool,
"age_seconds": float|null}``. Age is measured from ``generated_at`` when present, else from when
Keyless read the document; posture older than ``max_age`` (or never loaded) is ``stale``. Keyless
makes no decision from posture itself: the policy does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any

from proxy.policy.options import PostureOptions

log = logging.getLogger("keyless.policy")


class PostureError(Exception):
    pass


def parse_posture(text: str, where: str) -> tuple[dict[str, Any], float | None]:
    """(workloads by id, generated_at as a Unix time or None); raises PostureError."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise PostureError(f"{where}: malformed JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("workloads"), dict):
        raise PostureError(f"{where}: expected an object with a 'workloads' object")
    generated: float | None = None
    stamp = doc.get("generated_at")
    if stamp is not None:
        try:
            generated = datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise PostureError(f"{where}: 'generated_at' is not an ISO 8601 time") from None
    return doc["workloads"], generated


class Posture:
    def __init__(self, options: PostureOptions, clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self._clock = clock
        self._workloads: dict[str, Any] = {}
        self._as_of: float | None = None
        self._seen_mtime: int | None = None
        self.failures = 0
        self.last_error: str | None = None

    def lookup(self, workload_id: str | None) -> dict[str, Any]:
        age = None if self._as_of is None else max(0.0, self._clock() - self._as_of)
        entry = self._workloads.get(workload_id) if workload_id is not None else None
        return {"workload": entry, "stale": age is None or age > self.options.max_age,
                "age_seconds": None if age is None else round(age, 3)}

    def refresh(self) -> None:
        """Read the source once (blocking: call in a thread). Keeps the old data on failure."""
        try:
            if self.options.file is not None:
                st = self.options.file.stat()
                if st.st_mtime_ns == self._seen_mtime:
                    return
                workloads, generated = parse_posture(self.options.file.read_text(), str(self.options.file))
                self._seen_mtime = st.st_mtime_ns
                read_at = st.st_mtime
            else:
                if self.options.url is None:
                    raise RuntimeError("invariant broken: self.options.url is None")
                with urllib.request.urlopen(self.options.url, timeout=5) as resp:  # noqa: S310 - http(s), checked
                    workloads, generated = parse_posture(resp.read().decode(), self.options.url)
                read_at = self._clock()
        except (OSError, PostureError, UnicodeDecodeError) as e:
            self.failures += 1
            self.last_error = str(e)
            log.error("posture not refreshed (the old data ages and turns stale): %s", e)
            return
        self._workloads, self._as_of = workloads, generated if generated is not None else read_at

    async def watch(self) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self.options.poll_interval)

    def status(self) -> dict[str, Any]:
        return {"workloads": len(self._workloads), "failures": self.failures, "last_error": self.last_error}
