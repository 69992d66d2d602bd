"""Audit sinks: one JSON object per line per request, after OPA's decision-log event."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Protocol

from proxy.audit.event import AuditEvent


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None:
        """Write one terminal record for one request. Called exactly once per request."""
        ...

    def close(self) -> None: ...


class JsonLinesSink:
    """Appends to a file (or stdout with ``-``); each record goes out as one ``write``.

    The file is opened ``O_APPEND`` and each line written with a single ``write(2)``: with
    ``listen.workers`` several processes append to the same file, and the kernel keeps each
    such write whole, so lines from different workers never interleave.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._own = path != "-"
        self._fd = -1
        if self._own:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # 0640: audit records name workloads, destinations and credential fingerprints.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        else:
            self._fd = sys.stdout.fileno()

    def emit(self, event: AuditEvent) -> None:
        # Straight to the descriptor (stdout too): one write(2) per record, not TextIOWrapper's
        # chunks, so records from several workers sharing a pipe stay whole up to PIPE_BUF and
        # nothing sits in a Python buffer at exit.
        data = (_dumps(event.as_record()) + "\n").encode()
        while data:  # a regular file takes it whole; the loop covers a full disk's short write
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._own and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# One encoder, built once: json.dumps with non-default arguments builds a new one per call.
_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode
