"""``listen.workers: N``: N Keyless processes sharing one listening port through SO_REUSEPORT.

mitmproxy runs on one event loop, so one process uses at most one core. With N workers the
supervisor (the process ``keyless run`` started) does everything that must be identical in
every worker *before* forking:

- the CA is created once (``ensure_ca``), so every worker intercepts TLS with the same CA;
- the config is parsed, the policy compiled and the signing key loaded or generated once
  (``prepare``), so every worker signs with the same key and ``/jwks.json`` is the same
  whichever worker answers it.

Each worker then binds the proxy port (and the admin port) with SO_REUSEPORT and the kernel
spreads new connections across them. What stays per worker, and why that is sound:

- token caches (minted JWTs, OAuth2 tokens): each worker holds its own. A token is valid
  wherever it was minted, so the cost is at most N fetches or mints instead of one.
- the audit log: every worker appends to the same file; ``JsonLinesSink`` writes each record
  with one ``write(2)`` on an ``O_APPEND`` descriptor, so lines never interleave.
- the CONNECT-authority table: per client connection, and a connection lives in one worker.

The supervisor forwards SIGTERM/SIGINT to the workers and waits for them. If a worker dies on
its own, the supervisor stops the others and exits non-zero: a half-alive proxy would be
harder to notice than a dead one, and the service manager restarts the whole set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from proxy.ca import ensure_ca

if TYPE_CHECKING:
    from proxy.server import Prepared

log = logging.getLogger("keyless")


def enable_reuse_port() -> None:
    """Make mitmproxy's regular-mode listener bind with SO_REUSEPORT (this process only).

    mitmproxy 12 calls ``asyncio.start_server(handler, host, port)`` with no way to pass socket
    options, so the one method that does it is replaced with the same call plus
    ``reuse_port=True``. It is only used for a fixed port (config refuses port 0 with
    workers), where mitmproxy's own ``listen`` does exactly this call and nothing more.
    """
    from mitmproxy.proxy import mode_servers

    async def listen(self: Any, host: str, port: int) -> list[Any]:
        if self.mode.transport_protocol != "tcp":
            raise AssertionError(self.mode.transport_protocol)
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]

    mode_servers.RegularInstance.listen = listen  # type: ignore[method-assign]


def run_workers(prep: Prepared) -> int:
    """Fork ``listen.workers`` workers and supervise them; returns the exit code."""
    from proxy.server import serve

    n = prep.config.listen.workers
    ensure_ca(prep.config.tls.ca_dir)  # once, before forking: all workers must use one CA
    stopping = False
    children: dict[int, int] = {}

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # Installed before forking so a signal arriving mid-fork is not lost; workers reset them.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    def hup(signum: int, _frame: FrameType | None) -> None:
        # SIGHUP reloads each worker (proxy/sighup.py); it never stops the set.
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGHUP, hup)
    stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    for index in range(n):
        # Blocked across the fork: a child must not run the supervisor's handler (and signal
        # its siblings) before it has reset it; a pending signal is delivered after the reset.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # Ignored until serve() installs its reload handler: the default action would kill.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
            code = 1
            try:
                log.info("worker %d started (pid %d)", index, os.getpid())
                code = asyncio.run(serve(prep, reuse_port=True))
            except KeyboardInterrupt:
                code = 0
            except BaseException as e:  # noqa: BLE001 - a worker must exit, never return into the supervisor
                log.error("worker %d failed: %s", index, type(e).__name__)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    log.info("keyless supervising %d workers on %s:%d", n, prep.config.listen.address, prep.config.listen.port)

    code = 0
    # A worker that outlives its drain period (plus a margin) is killed, so that a stuck one
    # cannot keep the supervisor (and the pod) from exiting.
    grace = prep.config.listen.drain_seconds + 5
    kill_deadline: float | None = None
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if stopping:
                kill_deadline = kill_deadline or time.monotonic() + grace
                if time.monotonic() > kill_deadline:
                    for stuck in children:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(stuck, signal.SIGKILL)
            time.sleep(0.2)
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if not stopping:
            log.error("worker %d (pid %d) exited with %d; stopping the others", index, pid, exit_code)
            code = 1
            forward(signal.SIGTERM, None)
        elif exit_code not in (0, -signal.SIGTERM):
            code = code or 1
    return code
