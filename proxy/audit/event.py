"""The audit event: one typed, immutable record per request, built once when the request ends.

It is modelled on OPA's decision-log event. The event is data about what happened and nothing
else: the pipeline never routes on it (it routes on ``proxy.pipeline.Exchange``), and sinks
only serialise it. ``as_record`` is the public JSON contract: fields are added, never renamed.
No header value, body or credential value has a field here to land in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.audit.chain import Plain
from proxy.governance.finding import Finding
from proxy.model import Decision, Grant, Identity, Source


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What was asked for: the canonical destination and the path without its query string
    (query values may carry secrets)."""

    method: str | None
    scheme: str
    host: str | None
    port: int | None
    path: str | None
    # Transparent mode: the address the app dialled. TLS origination: where it really went.
    destination: dict[str, Any] | None = None
    upstream: str | None = None
    # The address Keyless really dialled ({address, port}): the pinned, checked one.
    upstream_address: dict[str, Any] | None = None
    # Answered by Keyless itself (`keyless env --check`): nothing was decided or forwarded.
    self_check: bool = False

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "scheme": self.scheme, "host": self.host,
                               "port": self.port, "path": self.path}
        if self.destination is not None:
            out["destination"] = self.destination
        if self.upstream is not None:
            out["upstream"] = self.upstream
        if self.upstream_address is not None:
            out["upstream_address"] = self.upstream_address
        if self.self_check:
            out["self_check"] = True
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the request ended: the status the client saw and, unless it succeeded, a stable code."""

    status: int | None
    error: str | None = None
    message: str | None = None
    # policy_unavailable only: why no decision was made, and OPA's decision id if it answered.
    reason: str | None = None
    engine_decision_id: str | None = None

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "error": self.error, "message": self.message}
        if self.reason is not None:
            out["reason"] = self.reason
            out["engine_decision_id"] = self.engine_decision_id
        return out


@dataclass(frozen=True, slots=True)
class ShadowRecord:
    """What the ``policy.shadow`` candidate would have decided (it changed nothing). ``error``:
    the candidate failed on this input (a would-deny: Keyless would have refused with 503)."""

    allow: bool
    reason: str
    revision: str
    credential: str | None = None
    error: str | None = None

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"allow": self.allow, "reason": self.reason, "revision": self.revision,
                               "credential": self.credential}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True, slots=True)
class AuditEvent:
    decision_id: str
    time: str
    source: Source
    identity: Identity
    request: RequestRecord
    decision: Decision | None
    # The decision rule and the engine's revision at the time (a decision carries its own).
    policy: str
    engine_revision: str
    grant: Grant | None
    outcome: Outcome
    latency_ms: float
    stripped: tuple[str, ...] = ()
    # What was removed from the response because it echoed the credential (docs/reflection.md).
    reflected: dict[str, Any] | None = None
    # For a decision-log service and a replay (OPA's decision-log event): the policy input as
    # masked by proxy.audit.mask, the paths erased and masked, the policy's result, the bundle
    # revisions and the instance's labels. None/empty when no decision was asked for.
    input: dict[str, Any] | None = None
    erased: tuple[str, ...] = ()
    masked: tuple[str, ...] = ()
    bundles: dict[str, Any] | None = None
    labels: dict[str, str] | None = None
    # The shadow candidate's decision (docs/learning.md); None when policy.shadow is not set.
    shadow: ShadowRecord | None = None
    # A request to an MCP server (proxy.agents.gate.McpGate.audit): server, method, tool, the
    # arguments' keyed fingerprint, user and agent; what a tools/list filtering kept.
    mcp: dict[str, Any] | None = None
    # Static secrets the app sent, as keyed fingerprints (proxy.governance.discover).
    found: tuple[Finding, ...] = ()

    @property
    def revision(self) -> str:
        d = self.decision
        return d.revision if d is not None and d.revision else self.engine_revision

    def as_record(self) -> dict[str, Any]:
        d = self.decision
        record: dict[str, Any] = {
            "decision_id": self.decision_id,
            "time": self.time,
            "source": {"address": self.source.address, "port": self.source.port},
            "identity": self.identity.as_input(),
            "request": self.request.as_record(),
            "decision": None if d is None else {
                "allow": d.allow, "reason": d.reason, "credential": d.credential,
                "policy": self.policy, "revision": self.revision,
                "engine_decision_id": d.engine_decision_id, "cached": d.cached,
            },
            "policy_revision": self.revision,
            "credential": None if self.grant is None else self.grant.as_audit(),
            "stripped": list(self.stripped),
            "reflected": self.reflected,
            "outcome": self.outcome.as_record(),
            "latency_ms": self.latency_ms,
            "input": self.input,
            "result": None if d is None else result(d),
            "bundles": self.bundles,
            "labels": self.labels,
        }
        if self.erased:
            record["erased"] = list(self.erased)
        if self.masked:
            record["masked"] = list(self.masked)
        if self.shadow is not None:
            record["shadow"] = self.shadow.as_record()
        if self.mcp is not None:
            record["mcp"] = self.mcp
        if self.found:
            record["found"] = [f.as_record() for f in self.found]
        return record


# What of ``AuditEvent.as_record()`` Keyless builds only from its own typed values: strings,
# ports and statuses, booleans, null, literal ASCII keys (proxy.audit.chain.Plain). The hash
# chain need not check these for what RFC 8785 writes differently; a test checks the claim on a
# fully populated event. Everything else (identity facts, the query, posture, MCP arguments,
# floats) is checked. The input's header names passed the wire rules' token check before any
# input was built, and their values are masked.
PLAIN_MEMBERS: Plain = {
    "decision_id": None, "time": None, "source": None, "request": None, "decision": None,
    "policy_revision": None, "stripped": None, "outcome": None, "bundles": None, "erased": None,
    "masked": None, "chain": None, "seq": None, "prev": None,
    "input": {
        "source": None, "destination": None, "context": {"time": None, "mode": None},
        "request": {"method": None, "scheme": None, "host": None, "port": None, "path": None,
                    "path_template": None, "headers": None},
    },
}


def result(d: Decision) -> dict[str, Any]:
    """The policy's decision object as the policy returned it (only the keys Keyless reads)."""
    out: dict[str, Any] = {"allow": d.allow}
    if d.reason:
        out["reason"] = d.reason
    if d.credential is not None:
        out["credential"] = d.credential
    if d.params:
        out["params"] = dict(d.params)
    if d.cache_ttl is not None:
        out["cache_ttl"] = d.cache_ttl
    return out
