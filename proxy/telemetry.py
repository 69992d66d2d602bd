"""Metrics (Prometheus, ``/metrics`` on the admin listener), per-request debug logs, JSON logs,
and the warn-once-per-state-change log of the components Keyless depends on.

Metric names follow Prometheus conventions (``_total`` counters, ``_seconds`` histograms, base
units) with the ``keyless_`` prefix, as Smokescreen's ``smokescreen_*`` and Envoy's per-filter
stats. Labels are bounded: outcome and error code (the fixed codes of ``proxy.errors``), decision
result, credential name (from the config), never a host, path or identity.

Counters that other modules already keep (policy reloads, token-cache fetches, audit sink
writes) are read at scrape time by a collector rather than duplicated on the request path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.audit.event import AuditEvent

log = logging.getLogger("keyless")
request_log = logging.getLogger("keyless.request")

# Decisions are microseconds when cached or embedded, milliseconds for OPA; credentials are
# microseconds from a cache and up to seconds for a token endpoint.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Telemetry:
    """One process's metrics registry and the request-path hooks that feed it."""

    def __init__(self) -> None:
        # No *_created series: a timestamp per label set doubles the scrape for no alert's use.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("keyless_requests", "Requests by how they ended and their error code",
                                ("outcome", "code"), registry=r)
        self.decisions = Counter("keyless_decisions", "Policy decisions by result and whether the cache served them",
                                 ("result", "cached"), registry=r)
        self.decision_seconds = Histogram("keyless_decision_duration_seconds", "Time to a policy decision",
                                          buckets=_BUCKETS, registry=r)
        self.credential_seconds = Histogram("keyless_credential_duration_seconds",
                                            "Time to inject a credential", ("credential",), buckets=_BUCKETS,
                                            registry=r)
        self.credential_failures = Counter("keyless_credential_failures",
                                           "Credentials that could not be injected", ("credential",), registry=r)
        self.connections = Gauge("keyless_connections_open", "Client connections open", registry=r)
        self.connections_total = Counter("keyless_connections", "Client connections accepted", registry=r)
        # Bounded: one revision label per shadow policy version loaded (docs/learning.md).
        self.shadow = Counter("keyless_shadow_decisions", "What the policy.shadow candidate would have decided, "
                              "by candidate revision", ("revision", "result"), registry=r)
        self.secrets_found = Counter("keyless_secrets_found",
                                     "Static secrets apps sent (discovery), by where, detector and action",
                                     ("location", "detector", "action"), registry=r)
        self.reloads = Counter("keyless_sighup_reloads", "SIGHUP reloads by result", ("result",), registry=r)
        self._state: dict[str, str | None] = {}
        # Labelled children by (metric, labels): ``labels()`` validates and locks on every call,
        # a few microseconds each on the request path. Label values are bounded (see each metric).
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Collector(collect))

    # --- the request path -----------------------------------------------------------------------

    def decided(self, result: str, cached: bool, seconds: float) -> None:
        self._child(self.decisions, result, "true" if cached else "false").inc()
        self.decision_seconds.observe(seconds)

    def shadowed(self, revision: str, allow: bool, error: str | None) -> None:
        self.shadow.labels(revision, "error" if error else "would_allow" if allow else "would_deny").inc()

    def credential(self, name: str, seconds: float, ok: bool) -> None:
        self._child(self.credential_seconds, name).observe(seconds)
        if not ok:
            self.credential_failures.labels(name).inc()

    def finished(self, event: AuditEvent) -> None:
        """Count a request by its terminal event, and log it at debug (no secret is in it)."""
        out = event.outcome
        code = out.error
        outcome = "forwarded" if code is None else "failed" if code == "connection_failed" else "refused"
        self._child(self.requests, outcome, code or "").inc()
        for f in event.found:
            # Bounded labels: the location's kind (header, query, cookie, body), a plugin name.
            self.secrets_found.labels(f.kind, f.detector, "stripped" if f.stripped else "forwarded").inc()
        if request_log.isEnabledFor(logging.DEBUG):
            req = event.request
            credential = event.grant.name if event.grant is not None else None
            request_log.debug(
                "request %s %s %s://%s:%s -> %s %s (%.1f ms, identity %s)", event.decision_id, req.method,
                req.scheme, req.host, req.port, out.status, code or outcome, event.latency_ms, event.identity.id,
                extra={"fields": {"decision_id": event.decision_id, "identity": event.identity.id,
                                  "method": req.method, "host": req.host, "port": req.port,
                                  "outcome": outcome, "status": out.status, "error": code,
                                  "credential": credential, "latency_ms": event.latency_ms}})

    def health(self, component: str, failure: str | None) -> None:
        """Log a dependency's failure once, and its recovery once (state changes only)."""
        before = self._state.get(component)
        if failure == before:
            return
        self._state[component] = failure
        if failure is not None and before is None:
            log.warning("%s is failing: %s", component, failure)
        elif failure is not None:
            log.warning("%s is still failing, now: %s", component, failure)
        else:
            log.warning("%s recovered", component)


class _Collector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def counter(name: str, doc: str, labels: tuple[str, ...] = (), samples: Iterable[tuple[tuple[str, ...], float]] = ()
            ) -> CounterMetricFamily:
    m = CounterMetricFamily(name, doc, labels=list(labels))
    for values, v in samples:
        m.add_metric(list(values), v)
    return m


def gauge(name: str, doc: str, labels: tuple[str, ...] = (), samples: Iterable[tuple[tuple[str, ...], float]] = ()
          ) -> GaugeMetricFamily:
    m = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, v in samples:
        m.add_metric(list(values), v)
    return m


class JsonFormatter(logging.Formatter):
    """``--log-format json``: one object per line, the request line's fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception text can echo request data.
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str)
