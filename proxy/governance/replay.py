"""``keyless policy replay``: the recorded decisions, decided again by a candidate policy.

Each request record that asked for a decision carries the policy input (masked: header values
replaced, ``audit.mask`` paths erased) and the policy's result. The candidate evaluates the
input again and each call is classified by ``allow``: unchanged, newly denied or newly allowed.
A candidate that errors on an input denies it (Keyless would refuse the request with 503), so a
broken candidate shows as newly denied, never as unchanged. The result gates a policy change in
CI: the command exits non-zero when anything is newly denied.

What a replay cannot see: fields the audit record erased or masked (a candidate that reads a
header value or an erased query parameter decides on ``"[masked]"`` or on nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from proxy.errors import KeylessError
from proxy.governance.auditlog import Entry
from proxy.policy.embedded import EmbeddedEngine, PolicySource, read_policy_dir
from proxy.policy.input import path_template

KINDS = ("unchanged", "newly_denied", "newly_allowed")


@dataclass(frozen=True, slots=True)
class Verdict:
    allow: bool
    reason: str
    credential: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"allow": self.allow, "reason": self.reason, "credential": self.credential}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True, slots=True)
class Change:
    entry: Entry
    kind: str
    old: Verdict
    new: Verdict

    def as_json(self) -> dict[str, Any]:
        doc = self.entry.input or {}
        req = doc.get("request") or {}
        return {"decision_id": self.entry.record.get("decision_id"), "log": f"{self.entry.file}:{self.entry.line}",
                "identity": (doc.get("identity") or {}).get("id"), "method": req.get("method"),
                "host": req.get("host"), "port": req.get("port"), "path": req.get("path"),
                "old": self.old.as_json(), "new": self.new.as_json()}


@dataclass
class Replay:
    candidate: str
    revision: str
    changes: dict[str, list[Change]] = field(default_factory=lambda: {k: [] for k in KINDS})
    credential_changed: int = 0
    skipped: int = 0  # refused before a decision was asked for: nothing to replay

    @property
    def replayed(self) -> int:
        return sum(len(v) for v in self.changes.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate, "revision": self.revision, "replayed": self.replayed,
            **{k: len(v) for k, v in self.changes.items()},
            "credential_changed": self.credential_changed, "skipped": self.skipped,
            "examples": {k: (v[0].as_json() if v else None) for k, v in self.changes.items()},
            "newly_denied_calls": [c.as_json() for c in self.changes["newly_denied"]],
            "newly_allowed_calls": [c.as_json() for c in self.changes["newly_allowed"]],
        }


def load_candidate(where: Path, query: str, engine: str) -> EmbeddedEngine:
    """Compile a policy directory or ``bundle.tar.gz``; raise PolicyLoadError when it does not."""
    source: PolicySource
    if where.is_file():
        from proxy.policy.bundle import read_bundle_archive

        source = read_bundle_archive(where.read_bytes(), where.name)
    else:
        source = read_policy_dir(where)
    return EmbeddedEngine(source, query, engine)


def replay_input(doc: dict[str, Any]) -> dict[str, Any]:
    """The recorded input as the engine saw it, as far as the record allows: ``time_ns`` (left
    out of the record) is derived from ``context.time`` again, ``path_template`` from the path."""
    out = dict(doc)
    ctx = out.get("context")
    if isinstance(ctx, dict) and isinstance(ctx.get("time"), str) and "time_ns" not in ctx:
        try:
            when = datetime.fromisoformat(ctx["time"].replace("Z", "+00:00"))
            out["context"] = {**ctx, "time_ns": round(when.timestamp() * 1000) * 1_000_000}
        except ValueError:
            pass
    req = out.get("request")
    if isinstance(req, dict) and isinstance(req.get("path"), str) and "path_template" not in req:
        out["request"] = {**req, "path_template": path_template(req["path"])}
    return out


def old_verdict(entry: Entry) -> Verdict:
    res = entry.result
    if res is not None:
        cred = res.get("credential")
        return Verdict(res["allow"], str(res.get("reason", "")), cred if isinstance(cred, str) else None)
    out = entry.record.get("outcome") or {}
    return Verdict(False, str(out.get("message") or "no decision"), None, str(out.get("error") or "policy_error"))


def new_verdict(engine: EmbeddedEngine, doc: dict[str, Any]) -> Verdict:
    try:
        d = engine.decide_sync(replay_input(doc))
    except KeylessError as e:
        # A policy error is a refusal (503 policy_unavailable), never an allow.
        return Verdict(False, e.message, None, getattr(e, "reason", None) or e.code)
    return Verdict(d.allow, d.reason, d.credential)


def replay(entries: Sequence[Entry], engine: EmbeddedEngine, candidate: str) -> Replay:
    out = Replay(candidate, engine.revision)
    for entry in entries:
        doc = entry.input
        if doc is None:
            out.skipped += 1
            continue
        old, new = old_verdict(entry), new_verdict(engine, doc)
        kind = ("unchanged" if old.allow == new.allow else "newly_denied" if old.allow else "newly_allowed")
        if kind == "unchanged" and old.allow and old.credential != new.credential:
            out.credential_changed += 1
        out.changes[kind].append(Change(entry, kind, old, new))
    return out


def render(r: Replay) -> str:
    lines = [f"replayed {r.replayed} decision(s) against {r.candidate} (revision {r.revision})"
             + (f"; {r.skipped} record(s) had no decision to replay" if r.skipped else ""),
             f"  unchanged      {len(r.changes['unchanged']):>6}"
             + (f"  ({r.credential_changed} with another credential)" if r.credential_changed else ""),
             f"  newly denied   {len(r.changes['newly_denied']):>6}",
             f"  newly allowed  {len(r.changes['newly_allowed']):>6}"]
    for kind in KINDS:
        found = r.changes[kind]
        if not found:
            continue
        c = found[0].as_json()
        lines += [f"{kind.replace('_', ' ')}, e.g. {c['identity']} {c['method']} {c['host']}:{c['port']}{c['path']} "
                  f"({c['log']})",
                  f"  old: {'allow' if c['old']['allow'] else 'deny'}: {c['old']['reason']}",
                  f"  new: {'allow' if c['new']['allow'] else 'deny'}: {c['new']['reason']}"]
    return "\n".join(lines)
