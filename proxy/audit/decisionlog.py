"""``audit.sinks: [{type: decision_log, ...}]``: upload OPA decision-log batches over HTTP.

Speaks what OPA's ``decision_logs`` plugin speaks to its service: ``POST <url><resource>``
(``/logs`` by default) with a gzip-compressed JSON array of events, ``Content-Encoding: gzip``,
each event with OPA's fields (``labels``, ``decision_id``, ``path``, ``input``, ``result``,
``bundles``, ``timestamp``, ``requested_by``, ``metrics``, ``erased``, ``masked``) plus Keyless's
own under ``keyless`` (outcome, credential, request). The knobs are OPA's ``reporting`` ones:

    min_delay_seconds / max_delay_seconds   an upload every random delay between the two
    upload_size_limit_bytes                 a batch's compressed size; larger buffers split
    buffer_size_limit_events                the bounded buffer; when full the oldest event is
                                            dropped and counted (``dropped``, in /metrics)

It is best effort by design, as OPA's: the durable, fail-closed record is the ``file`` sink.
``emit`` only appends the immutable event to the buffer; converting, encoding and compressing
happen at upload time, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy.audit.event import AuditEvent
from proxy.confread import Section

log = logging.getLogger("keyless.audit")


@dataclass(frozen=True, slots=True)
class DecisionLogOptions:
    url: str
    resource: str = "/logs"
    min_delay_seconds: float = 300.0
    max_delay_seconds: float = 600.0
    upload_size_limit_bytes: int = 32768
    buffer_size_limit_events: int = 10000
    timeout_seconds: float = 10.0


def parse_decision_log(s: Section) -> DecisionLogOptions:
    url = s.text("url")
    if url and not url.startswith(("http://", "https://")):
        s.error("must be an http:// or https:// URL", "url")
    o = DecisionLogOptions(
        url=(url or "").rstrip("/"),
        resource=s.text("resource", "/logs"),
        min_delay_seconds=s.number("min_delay_seconds", 300.0, lo=0.01),
        max_delay_seconds=s.number("max_delay_seconds", 600.0, lo=0.01),
        upload_size_limit_bytes=s.integer("upload_size_limit_bytes", 32768, lo=512, hi=1 << 30),
        buffer_size_limit_events=s.integer("buffer_size_limit_events", 10000, lo=1, hi=10_000_000),
        timeout_seconds=s.number("timeout_seconds", 10.0, lo=0.1),
    )
    if o.max_delay_seconds < o.min_delay_seconds:
        s.error("must be >= min_delay_seconds", "max_delay_seconds")
    return o


def opa_event(event: AuditEvent) -> dict[str, Any]:
    """One audit event as an OPA decision-log event."""
    r = event.as_record()
    out: dict[str, Any] = {
        "labels": r["labels"] or {},
        "decision_id": r["decision_id"],
        "path": event.policy.removeprefix("data.").replace(".", "/"),
        "input": r["input"],
        "result": r["result"],
        "bundles": r["bundles"] or {},
        "timestamp": r["time"],
        "requested_by": f"{event.source.address}:{event.source.port}",
        "metrics": {"timer_keyless_request_ns": int(event.latency_ms * 1_000_000)},
        "keyless": {"outcome": r["outcome"], "credential": r["credential"], "request": r["request"],
                    "identity": r["identity"]["id"]},
    }
    if r.get("erased"):
        out["erased"] = r["erased"]
    if r.get("masked"):
        out["masked"] = r["masked"]
    return out


def batches(events: list[AuditEvent], limit: int) -> tuple[list[tuple[bytes, list[AuditEvent]]], int]:
    """Gzip'd JSON arrays no larger than ``limit``, each with its events; and how many single
    events were too large to send at all (OPA drops those too)."""
    body = gzip.compress(json.dumps([opa_event(e) for e in events], separators=(",", ":")).encode(), 6)
    if len(body) <= limit:
        return [(body, events)], 0
    if len(events) == 1:
        return [], 1
    half = len(events) // 2
    a, ta = batches(events[:half], limit)
    b, tb = batches(events[half:], limit)
    return a + b, ta + tb


class DecisionLogSink:
    def __init__(self, options: DecisionLogOptions) -> None:
        self.options = options
        self._buffer: deque[AuditEvent] = deque()
        self._task: asyncio.Task[None] | None = None
        self._session: Any = None
        self._up = True
        self.uploaded = 0
        self.dropped = 0
        self.upload_failures = 0

    @property
    def url(self) -> str:
        return self.options.url + self.options.resource

    def emit(self, event: AuditEvent) -> None:
        if event.input is None:
            # Refused before the policy was asked (attestation, authority): no decision to log.
            return
        if len(self._buffer) >= self.options.buffer_size_limit_events:
            self._buffer.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("decision-log buffer full: %d event(s) dropped so far", self.dropped)
        self._buffer.append(event)

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.options.timeout_seconds))
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(random.uniform(self.options.min_delay_seconds, self.options.max_delay_seconds))
            await self.flush()

    async def flush(self) -> bool:
        """Upload everything buffered; on failure the events go back to the buffer's front."""
        if not self._buffer or self._session is None:
            return not self._buffer
        taken = list(self._buffer)
        self._buffer.clear()
        bodies, too_large = await asyncio.to_thread(batches, taken, self.options.upload_size_limit_bytes)
        if too_large:
            self.dropped += too_large
            log.warning("decision-log: %d event(s) larger than upload_size_limit_bytes dropped", too_large)
        for i, (body, events) in enumerate(bodies):
            try:
                async with self._session.post(self.url, data=body, headers={
                        "Content-Type": "application/json", "Content-Encoding": "gzip"}) as resp:
                    if resp.status >= 300:
                        raise OSError(f"HTTP {resp.status}")
            except Exception as e:  # noqa: BLE001 - any failure keeps the events
                self.upload_failures += 1
                if self._up:
                    log.warning("decision-log upload to %s failed: %s; retrying", self.url, _why(e))
                    self._up = False
                rest = [ev for _, evs in bodies[i:] for ev in evs]
                for ev in reversed(rest):
                    if len(self._buffer) >= self.options.buffer_size_limit_events:
                        self.dropped += 1
                        continue
                    self._buffer.appendleft(ev)
                return False
            self.uploaded += len(events)
        if not self._up:
            log.warning("decision-log uploads to %s recovered", self.url)
            self._up = True
        return True

    def status(self) -> dict[str, Any]:
        return {"type": "decision_log", "url": self.url, "up": self._up, "buffered": len(self._buffer),
                "uploaded": self.uploaded, "dropped": self.dropped, "upload_failures": self.upload_failures}

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), self.options.timeout_seconds)
        if self._session is not None:
            await self._session.close()

    def close(self) -> None:
        """Nothing to do synchronously; ``aclose`` flushes."""


def _why(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
