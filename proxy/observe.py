"""Wiring of telemetry into a running Keyless: scrape-time collectors and the SIGHUP handler.

Kept apart from ``proxy.server`` so that the server's hunk is two calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import Metric

from proxy.audit import AuditTrail
from proxy.config import Config
from proxy.pipeline import Pipeline
from proxy.telemetry import Telemetry, counter, gauge

log = logging.getLogger("keyless")


def instrument(pipeline: Pipeline, trail: AuditTrail, policy: Any) -> None:
    """Register the collectors that read counters other modules keep."""
    from proxy import __version__

    pipeline.labels = {"id": trail.durable[0].chain.id if trail.durable else "", "version": __version__,
                       **pipeline.labels}

    def audit() -> Iterable[Metric]:
        files = [s.status() for s in trail.durable]
        sink = ("file",)
        yield counter("keyless_audit_records", "Audit records written", ("sink",),
                      [(sink, sum(f["records"] for f in files))])
        yield counter("keyless_audit_write_failures", "Audit writes that failed (ENOSPC, EIO, EROFS, EPIPE)",
                      ("sink",), [(sink, sum(f["write_failures"] for f in files))])
        yield counter("keyless_audit_records_dropped", "Audit records dropped because a spool or buffer was full",
                      ("sink",), [(sink, sum(f["dropped"] for f in files))]
                      + [(("decision_log",), o.dropped) for o in trail.others])
        yield counter("keyless_audit_checkpoints", "Signed audit checkpoints written", (),
                      [((), sum(f["checkpoints"] for f in files))])
        yield gauge("keyless_audit_spooled_records", "Audit records waiting in the spool", (),
                    [((), sum(f["spooled"] for f in files))])
        yield gauge("keyless_audit_up", "1 while every durable audit sink can be written", (),
                    [((), 1.0 if trail.healthy() else 0.0)])
        if trail.others:
            yield counter("keyless_decision_log_uploaded_events", "Decision-log events uploaded", (),
                          [((), sum(o.uploaded for o in trail.others))])
            yield counter("keyless_decision_log_upload_failures", "Decision-log uploads that failed", (),
                          [((), sum(o.upload_failures for o in trail.others))])

    def policy_metrics() -> Iterable[Metric]:
        status = policy.status() if policy is not None else {}
        yield counter("keyless_policy_reloads", "Policy versions swapped in", (), [((), status.get("reloads", 0))])
        yield counter("keyless_policy_reload_failures", "Policy versions rejected or unreadable", (),
                      [((), status.get("reload_failures", 0))])

    def credentials() -> Iterable[Metric]:
        fetches, failures = [], []
        for name, provider in pipeline.credentials.items():
            cache = getattr(provider, "cache", None)
            if cache is not None and hasattr(cache, "fetches"):
                fetches.append(((name,), cache.fetches))
                failures.append(((name,), cache.failures))
        yield counter("keyless_credential_fetches", "Token fetches from a credential source", ("credential",),
                      fetches)
        yield counter("keyless_credential_fetch_failures", "Token fetches that failed", ("credential",), failures)

    t = pipeline.telemetry
    t.add_collector(audit)
    t.add_collector(policy_metrics)
    t.add_collector(credentials)


def on_sighup(config: Config, policy: Any, telemetry: Telemetry) -> Callable[[], None]:
    """The SIGHUP handler: one reload at a time; a second SIGHUP meanwhile is logged and ignored."""
    from proxy.sighup import reload

    running: list[asyncio.Task[None]] = []

    async def run() -> None:
        try:
            telemetry.reloads.labels(await reload(config, policy)).inc()
        except Exception as e:  # noqa: BLE001 - a reload must never take the process down
            log.error("SIGHUP: reload failed: %s", type(e).__name__)
            telemetry.reloads.labels("failed").inc()
        finally:
            running.clear()

    def handler() -> None:
        if running:
            log.info("SIGHUP: a reload is already running")
            return
        log.info("SIGHUP: reloading")
        running.append(asyncio.get_running_loop().create_task(run()))

    return handler
