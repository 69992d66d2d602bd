"""Graceful shutdown on SIGTERM: mitmproxy has no drain of its own.

Kubernetes sends SIGTERM, waits ``terminationGracePeriodSeconds`` and then kills. In between,
Keyless stops accepting new connections, reports not-ready, lets requests already in flight
finish for up to ``listen.drain_seconds``, writes a ``drain_timeout`` record for each request
still running then, and only then shuts mitmproxy down; the caller flushes and closes the audit
sink afterwards, so every request has its record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

log = logging.getLogger("keyless")


class Drainer:
    def __init__(self, master: Any, inflight: Collection[str], seconds: float,
                 on_start: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 on_timeout: Callable[[], int] | None = None) -> None:
        self.master = master
        self.inflight = inflight
        self.seconds = seconds
        self.on_start = on_start
        self.clock = clock
        self.on_timeout = on_timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Signal handler: begin draining once; a second SIGTERM does not restart the clock."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        try:
            if self.on_start is not None:
                self.on_start()
            proxyserver = self.master.addons.get("proxyserver")
            if proxyserver is not None:
                # An empty mode list closes the listening sockets; open connections carry on.
                await proxyserver.servers.update([])
            deadline = self.clock() + self.seconds
            log.info("draining: %d request(s) in flight, waiting up to %gs", len(self.inflight), self.seconds)
            while self.inflight and self.clock() < deadline:
                await asyncio.sleep(0.05)
            if self.inflight:
                log.warning("drain period over with %d request(s) still in flight", len(self.inflight))
                if self.on_timeout is not None:
                    # Cut, each with its terminal drain_timeout record, before mitmproxy stops.
                    self.on_timeout()
        except Exception as e:  # noqa: BLE001 - a failed drain still has to shut down
            log.error("drain failed: %s", type(e).__name__)
        finally:
            self.master.shutdown()
