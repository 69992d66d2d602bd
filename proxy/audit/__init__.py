"""Audit sinks: one JSON object per line per request, after OPA's decision-log event."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any, Protocol


class AuditSink(Protocol):
    def emit(self, record: dict[str, Any]) -> None:
        """Write one terminal record for one request. Called exactly once per request."""
        ...

    def close(self) -> None: ...


class JsonLinesSink:
    """Appends to a file (or stdout with ``-``); each record is flushed as one ``write``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._own = path != "-"
        if self._own:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._out: IO[str] = open(path, "a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115

    def emit(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.flush()
        if self._own:
            self._out.close()
