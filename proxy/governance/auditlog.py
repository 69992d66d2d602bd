"""Reading audit logs back: the request records of one or more ``audit.path`` files.

A log holds one JSON object per line. Chain records (``start``, ``checkpoint``, ``gap``) carry a
``type`` and are skipped; every other line must be a request record (it has a ``decision_id``).
Anything else (a torn write, a line from another program) stops the read with the file and line
number: a policy learned or replayed from a log that was only partly understood would be wrong
without saying so. Rotated logs ending in ``.gz`` are read as they are.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class AuditLogError(Exception):
    """One line: ``FILE:LINE: what is wrong``."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One request record and where it came from."""

    file: str
    line: int
    record: dict[str, Any]

    @property
    def input(self) -> dict[str, Any] | None:
        """The policy input as recorded (masked), or None when no decision was asked for."""
        doc = self.record.get("input")
        return doc if isinstance(doc, dict) else None

    @property
    def result(self) -> dict[str, Any] | None:
        """The decision the policy in force returned, or None (no decision, or a policy error)."""
        res = self.record.get("result")
        return res if isinstance(res, dict) and isinstance(res.get("allow"), bool) else None


def _lines(path: Path) -> Iterator[str]:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                yield from f
        else:
            with path.open(encoding="utf-8") as f:
                yield from f
    except OSError as e:
        raise AuditLogError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise AuditLogError(f"{path}: not a text audit log ({e})") from None


def read_entries(paths: Sequence[Path]) -> list[Entry]:
    """Every request record of ``paths``, in file order; raise AuditLogError on the first bad line
    or when the logs hold no request record at all."""
    entries: list[Entry] = []
    for path in paths:
        for n, text in enumerate(_lines(path), 1):
            line = text.rstrip("\n")
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                why = "empty line" if not line.strip() else "not JSON (a torn write, or not an audit log?)"
                raise AuditLogError(f"{path}:{n}: {why}") from None
            if not isinstance(record, dict):
                raise AuditLogError(f"{path}:{n}: not a Keyless audit record (expected a JSON object)")
            if "type" in record:
                continue  # start, checkpoint, gap: the chain's own records
            if not isinstance(record.get("decision_id"), str) or not isinstance(record.get("request"), dict):
                raise AuditLogError(f"{path}:{n}: not a Keyless audit record (no decision_id and request)")
            entries.append(Entry(str(path), n, record))
    if not entries:
        names = ", ".join(str(p) for p in paths)
        raise AuditLogError(f"{names}: no request records (is audit.path the right file?)")
    return entries
