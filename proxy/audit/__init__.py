"""Audit sinks: one JSON object per request, after OPA's decision-log event.

The durable trail is the chained JSON-lines file (``audit.path``; it fails closed, see
``proxy.audit.file``), always present. ``SINKS`` is the one registry (``proxy.plugins.PluginSpec``)
of the sinks ``audit.sinks`` adds beside it: ``decision_log`` uploads OPA decision-log batches
(``proxy.audit.decisionlog``; best effort with a bounded buffer and a dropped counter, as OPA's
own plugin). ``AuditTrail`` is what the pipeline writes to.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.audit.decisionlog import DecisionLogSink, parse_decision_log
from proxy.audit.event import PLAIN_MEMBERS, AuditEvent
from proxy.audit.file import FileSink
from proxy.plugins import PluginSpec


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None:
        """Write one terminal record for one request. Called exactly once per request."""
        ...

    def accepting(self) -> bool:
        """May a credentialed request be forwarded? False while the trail cannot be written."""
        ...

    def close(self) -> None | bool: ...


# The lines-only sink of before the chain, kept under its old name for callers and tests.
JsonLinesSink = FileSink


SINKS: dict[str, PluginSpec[Any]] = {
    "decision_log": PluginSpec(parse=parse_decision_log, create=DecisionLogSink),
}


class AuditTrail:
    """Every configured sink behind one ``emit``. ``durable`` sinks decide ``accepting``."""

    def __init__(self, durable: list[FileSink], others: list[Any] | None = None) -> None:
        self.durable = durable
        self.others = others or []

    def emit(self, event: AuditEvent) -> None:
        # One as_record() for every sink: each gets its own copy to seal or convert.
        for sink in self.durable:
            sink.append(event.as_record(), PLAIN_MEMBERS)
        for other in self.others:
            other.emit(event)

    def accepting(self) -> bool:
        return all(s.accepting() for s in self.durable)

    def healthy(self) -> bool:
        return all(s.healthy for s in self.durable)

    def tick(self) -> None:
        for s in self.durable:
            s.tick()

    def status(self) -> dict[str, Any]:
        return {"sinks": [s.status() for s in self.durable] + [o.status() for o in self.others]}

    async def start(self, meta: dict[str, Any] | None = None) -> None:
        for sink in self.durable:
            sink.start(meta or {})
        for other in self.others:
            await other.start()

    async def aclose(self) -> bool:
        """Flush the uploaders (bounded), then the files. True when every durable record is written."""
        for other in self.others:
            await other.aclose()
        return all([s.close() for s in self.durable])

    def close(self) -> bool:
        return all([s.close() for s in self.durable])


def note_key(checkpoint: Any, signer: Any) -> Any:
    """The checkpoint signing key: ``audit.checkpoint.key_file``, else derived from the signing key."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from proxy.audit.chain import NoteKey, load_note_key
    from proxy.errors import ConfigError

    if checkpoint.key_file is None:
        seed = signer.derived_key(b"audit-checkpoint")
        return NoteKey(checkpoint.key_name, ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    try:
        return load_note_key(checkpoint.key_file, checkpoint.key_name)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError([f"audit.checkpoint.key_file: cannot load {checkpoint.key_file} ({why})"]) from None


def build_trail(audit: Any, signer: Any) -> AuditTrail:
    """The configured sinks (``audit`` is ``proxy.audit.options.AuditConfig``)."""
    from proxy.errors import ConfigError

    key = note_key(audit.checkpoint, signer)
    try:
        durable = FileSink(audit.path, audit.file_options(), key)
    except OSError as e:
        raise ConfigError([f"audit.path: cannot open {audit.path} ({e.strerror})"]) from None
    others = [SINKS[s.type].create(s.options) for s in audit.sinks]
    return AuditTrail([durable], others)
