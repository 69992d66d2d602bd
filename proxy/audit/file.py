"""The durable audit sink: JSON lines, chained, checkpointed, failing closed.

Write path, per record (on the event loop: a few microseconds of syscalls, see bench/audit.py):

- ``flock`` the file (every ``listen.workers`` worker appends to it), note its size, ``write(2)``
  the whole line on the ``O_APPEND`` descriptor; a short write is continued, and an error
  (ENOSPC, EIO, EROFS, EPIPE) ``ftruncate``s back to the noted size: no torn line is ever left,
  and under the lock no other worker's line can sit behind ours.
- On failure the sink goes *down*: it logs errno and path once, ``accepting()`` turns false (the
  pipeline refuses credentialed requests with ``audit_unavailable``, ``/readyz`` says not ready)
  and records wait in a bounded in-memory spool. ``tick()`` (every second) and every new record
  retry the spool in order; when it is empty again the sink is *up* and logs the recovery.
- A full spool drops the new record and counts it; the count is written into the chain as a
  ``{"type": "gap"}`` record as soon as the sink is back, so the loss is in the log itself.

The chain fields are assigned only when a record is really written, so a spooled or dropped
record never leaves a hole in ``seq`` that the verifier would call a deletion.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.audit.chain import NOTHING_PLAIN, Chain, NoteKey, Plain
from proxy.audit.event import PLAIN_MEMBERS, AuditEvent

log = logging.getLogger("keyless.audit")


@dataclass(frozen=True, slots=True)
class FileOptions:
    path: str = "-"
    # What a sink that cannot write does to credentialed requests: refuse (503 audit_unavailable)
    # or, only when named here, continue (every such request is still counted and logged).
    on_failure: str = "refuse"
    spool_records: int = 1000
    checkpoint_records: int = 1000
    checkpoint_seconds: float = 60.0


class FileSink:
    def __init__(self, path: str, options: FileOptions | None = None, key: NoteKey | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options or FileOptions(path=path)
        self.path = path
        self.key = key
        self.clock = clock
        self.chain = Chain()
        self._own = path != "-"
        if self._own:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # 0640: audit records name workloads, destinations and credential fingerprints.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        else:
            self._fd = sys.stdout.fileno()
            self._regular = False
        self._spool: deque[dict[str, Any]] = deque()
        self.down_since: float | None = None
        self.last_error: str | None = None
        self._dropped_pending = 0
        self._since_checkpoint = 0
        self._checkpointed_at = clock()
        # Counters for /metrics and /readyz.
        self.records = 0
        self.failures = 0
        self.dropped = 0
        self.checkpoints = 0
        self.rollbacks = 0  # partial writes truncated away

    # --- the sink interface ---------------------------------------------------------------------

    def emit(self, event: AuditEvent) -> None:
        self.append(event.as_record(), PLAIN_MEMBERS)

    def start(self, meta: dict[str, Any]) -> None:
        """The chain's first record: who writes it and how it fails (``audit.on_failure`` is
        thereby in the log itself, as the one switch that lets credentials leave unaudited)."""
        self.append({"type": "start", "time": _now(), "pid": os.getpid(), "path": self.path,
                     "on_failure": self.options.on_failure,
                     "checkpoint_key": self.key.vkey() if self.key is not None else None, **meta})
        if self.options.on_failure == "continue":
            log.warning("audit.on_failure is continue: if %s cannot be written, credentialed requests are "
                        "forwarded without a durable record", self.path)

    def accepting(self) -> bool:
        """May a credentialed request be forwarded now? False while the sink cannot write."""
        return self.down_since is None or self.options.on_failure == "continue"

    @property
    def healthy(self) -> bool:
        return self.down_since is None

    def tick(self) -> None:
        """Once a second: retry the spool; write a checkpoint when ``checkpoint_seconds`` passed."""
        if self._spool or self._dropped_pending:
            self._drain_spool()
        if (self.key is not None and self.healthy and self._since_checkpoint
                and self.clock() - self._checkpointed_at >= self.options.checkpoint_seconds):
            self.checkpoint(final=False)

    def close(self) -> bool:
        """Flush the spool, write the final checkpoint, sync. True when nothing was left unwritten."""
        self._drain_spool()
        if self.key is not None and self.healthy and self.chain.seq:
            self.checkpoint(final=True)
        flushed = self.healthy and not self._spool
        if self._own and self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as e:
                self._went_down(e)
                flushed = False
            os.close(self._fd)
            self._fd = -1
        if not flushed:
            log.error("audit sink %s closed with %d record(s) unwritten and %d dropped: %s",
                      self.path, len(self._spool), self.dropped, self.last_error)
        return flushed

    def status(self) -> dict[str, Any]:
        return {"path": self.path, "up": self.healthy, "error": self.last_error, "spooled": len(self._spool),
                "records": self.records, "write_failures": self.failures, "dropped": self.dropped,
                "checkpoints": self.checkpoints, "rollbacks": self.rollbacks,
                "chain": self.chain.id, "seq": self.chain.seq}

    # --- writing --------------------------------------------------------------------------------

    def append(self, record: dict[str, Any], plain: Plain = NOTHING_PLAIN) -> None:
        if self._spool or self._dropped_pending:
            self._drain_spool()
        if self._spool or not self._write(record, plain):
            self._to_spool(record)
            return
        self._after_write()

    def checkpoint(self, final: bool) -> None:
        if self.key is None:
            return
        record = self.chain_checkpoint(final)
        if record is not None:
            self.checkpoints += 1
            self._since_checkpoint = 0
            self._checkpointed_at = self.clock()

    def chain_checkpoint(self, final: bool) -> dict[str, Any] | None:
        if self.key is None:
            return None
        saved = (self.chain.seq, self.chain.head)
        record, line = self.chain.checkpoint(self.key, _now(), final)
        if not self._write_line(line):
            self.chain.seq, self.chain.head = saved
            return None
        return record

    def _after_write(self) -> None:
        self.records += 1
        self._since_checkpoint += 1
        if self.key is not None and self._since_checkpoint >= self.options.checkpoint_records:
            self.checkpoint(final=False)

    def _to_spool(self, record: dict[str, Any]) -> None:
        for k in ("chain", "seq", "prev", "hash"):
            record.pop(k, None)
        if len(self._spool) < self.options.spool_records:
            self._spool.append(record)
            return
        if record.get("credential") is not None:
            # A credential already left: its record displaces the oldest refusal in the spool
            # (while the sink is down credentialed requests are refused, so the spool holds at
            # most the ones in flight when it went down, plus refusals).
            for i, queued in enumerate(self._spool):
                if queued.get("credential") is None:
                    del self._spool[i]
                    self._spool.append(record)
                    record = queued
                    break
        # Explicit and counted: the count goes into the chain as a gap record on recovery.
        self.dropped += 1
        self._dropped_pending += 1
        if self._dropped_pending == 1:
            log.error("audit spool full (%d records): dropping records until %s can be written again",
                      self.options.spool_records, self.path)

    def _drain_spool(self) -> None:
        if self._dropped_pending:
            gap = {"type": "gap", "time": _now(), "dropped": self._dropped_pending,
                   "reason": f"audit spool full while {self.path} could not be written"}
            if not self._write(gap):
                return
            self._dropped_pending = 0
        while self._spool:
            if not self._write(self._spool[0]):
                return
            self._spool.popleft()
            self._after_write()

    def _write(self, record: dict[str, Any], plain: Plain = NOTHING_PLAIN) -> bool:
        """Seal ``record`` into the chain and write it; on failure undo the seal. True on success."""
        saved = (self.chain.seq, self.chain.head)
        if self._write_line(self.chain.seal(record, plain)):
            return True
        self.chain.seq, self.chain.head = saved
        return False

    def _write_line(self, line: str) -> bool:
        data = (line + "\n").encode()
        try:
            write_whole(self._fd, data, self._regular)
        except OSError as e:
            self._went_down(e)
            return False
        if self.down_since is not None:
            log.warning("audit sink %s recovered after %.1fs (%d spooled record(s) to write, %d dropped in all)",
                        self.path, self.clock() - self.down_since, len(self._spool), self.dropped)
            self.down_since = None
            self.last_error = None
        return True

    def _went_down(self, e: OSError) -> None:
        self.failures += 1
        if getattr(e, "rolled_back", 0):
            self.rollbacks += 1
        code = errno.errorcode.get(e.errno or 0, str(e.errno))
        why = f"{code} ({e.strerror})"
        if self.down_since is None:
            self.down_since = self.clock()
            self.last_error = why
            refusing = ("refusing credentialed requests" if self.options.on_failure == "refuse"
                        else "audit.on_failure is continue: credentialed requests are still forwarded")
            log.error("audit sink %s cannot write: %s; %s until it recovers", self.path, why, refusing)
        elif why != self.last_error:
            self.last_error = why
            log.error("audit sink %s still cannot write: %s", self.path, why)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_whole(fd: int, data: bytes, regular: bool) -> None:
    """Write all of ``data`` or nothing: a failed write is rolled back to where it started.

    For a regular file the write runs under ``flock`` so that the size noted before it is still
    where this line starts when it has to be truncated back (other workers append to the file
    too). A pipe cannot be rolled back; lines up to PIPE_BUF are written whole by the kernel.
    """
    if not regular:
        while data:
            data = data[os.write(fd, data):]
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                if n == 0:
                    raise OSError(errno.EIO, "write returned 0")
                view = view[n:]
        except OSError as e:
            try:
                os.ftruncate(fd, start)
                # For the sink's count and its once-per-state-change log line.
                e.rolled_back = len(data) - len(view)  # type: ignore[attr-defined]
            except OSError as t:
                log.error("audit file could not be truncated back to %d: %s", start, t.strerror)
            raise
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)

