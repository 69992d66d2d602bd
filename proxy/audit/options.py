"""``audit``: the config section, validated into frozen options (every problem with its key path)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.audit.file import FileOptions
from proxy.audit.mask import check_path
from proxy.confread import Section


@dataclass(frozen=True, slots=True)
class CheckpointOptions:
    # Ed25519 PEM; created (0600) when missing. None: derived from the signing key, so it is as
    # stable as signing.key_file (``keyless audit key`` prints the verifier key either way).
    key_file: Path | None = None
    key_name: str = "keyless-audit"
    every_records: int = 1000
    every_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class SinkConfig:
    type: str
    options: Any


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = "-"
    on_failure: str = "refuse"
    spool_records: int = 1000
    checkpoint: CheckpointOptions = CheckpointOptions()
    mask: tuple[str, ...] = ("/input/request/query",)
    labels: dict[str, str] = field(default_factory=dict)
    sinks: tuple[SinkConfig, ...] = ()

    def file_options(self) -> FileOptions:
        return FileOptions(self.path, self.on_failure, self.spool_records, self.checkpoint.every_records,
                           self.checkpoint.every_seconds)


def parse_audit(s: Section) -> AuditConfig:
    from proxy.audit import SINKS

    c = s.section("checkpoint")
    checkpoint = CheckpointOptions(
        key_file=c.path_value("key_file", None),
        key_name=c.text("key_name", "keyless-audit"),
        every_records=c.integer("every_records", 1000, lo=1, hi=10_000_000),
        every_seconds=c.number("every_seconds", 60.0, lo=0.1),
    )
    if any(ch.isspace() or ch == "+" for ch in checkpoint.key_name or ""):
        c.error("must not contain spaces or '+' (a signed-note key name)", "key_name")
    c.done()
    mask = s.str_list("mask", ("/input/request/query",))
    for i, path in enumerate(mask):
        why = check_path(path)
        if why:
            s.error(why, f"mask[{i}]")
    labels = s.section("labels")
    for k, v in labels.raw.items():
        labels.has(str(k))
        if not isinstance(v, str):
            labels.error("must be a string", str(k))
    sinks: list[SinkConfig] = []
    raw = s.raw.get("sinks")
    s.has("sinks")
    if raw is not None and not isinstance(raw, list):
        s.error("must be a list of sinks", "sinks")
        raw = []
    for i, item in enumerate(raw or []):
        ss = Section(item, s.key_path(f"sinks[{i}]"), s.problems, s.base_dir)
        kind = ss.choice("type", tuple(SINKS))
        if kind:
            sinks.append(SinkConfig(kind, SINKS[kind].parse(ss)))
        ss.done()
    return AuditConfig(
        path=s.text("path", "-"),
        on_failure=s.choice("on_failure", ("refuse", "continue"), "refuse"),
        spool_records=s.integer("spool_records", 1000, lo=1, hi=1_000_000),
        checkpoint=checkpoint,
        mask=tuple(mask),
        labels={str(k): v for k, v in labels.raw.items() if isinstance(v, str)},
        sinks=tuple(sinks),
    )
