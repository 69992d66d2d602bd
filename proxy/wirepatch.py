"""The narrow mitmproxy patches behind ``listen.limits``, installed once by ``install``.

mitmproxy 12.3 has no option for any of this, so Keyless wraps a few methods (never replaces
their logic) and calls the plain functions of ``proxy.limits``:

- ``Http1Server.read_headers``: inspect the client's head while mitmproxy buffers it (size,
  count, obs-fold, bad names, CR/NUL); a violation never reaches mitmproxy's parser. When the
  request line names a destination, mitmproxy gets a stub request (no body, ``Connection:
  close``) that the addon refuses through the normal path, so the refusal is JSON with
  ``Keyless-Decision-Id`` and one audit record; otherwise the layer writes the JSON refusal
  itself, closes, and ``on_refusal`` audits it without request fields.
- ``Http1Client.read_headers``: the same size bound on an upstream's response head (502).
- ``Http1Client.send``: an HTTP/2 or HTTP/3 request sent to an HTTP/1.1 upstream gets
  Content-Length (buffered body) or ``Transfer-Encoding: chunked`` (streamed body).
- ``Http2Server.__init__``: advertise SETTINGS_MAX_HEADER_LIST_SIZE = max_header_bytes and cap
  the HPACK decoder and the CONTINUATION buffer at twice that (a block between the two gets
  the 431 from ``wire_refusal``; beyond, h2 ends the connection with GOAWAY).
- ``ConnectionHandler.handle_client`` / ``server_event`` and ``ProxyConnectionHandler.handle_hook``:
  the connection cap (503 + Retry-After before any byte is read) and the idle, header-read and
  total-request timeouts (``limits.ConnectionClock``), which close the connection the way
  mitmproxy's own inactivity watchdog does (cancelling the client's handler task).
- ``ConnectionHandler.handle_connection``: close the socket when that cancel lands inside
  ``server_event`` (a refusal's close while the client is still sending), which mitmproxy's
  cleanup misses: the socket would stay open and unread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

from proxy.errors import KeylessError
from proxy.limits import (
    ConnectionClock,
    WireLimits,
    check_fields,
    host_line,
    http1_framing,
    inspect_http1_head,
    raw_refusal,
    request_line,
    response_head_incomplete,
)

if TYPE_CHECKING:
    from mitmproxy import http

log = logging.getLogger("keyless")

# Refusals decided inside the HTTP/1 layer, by the stub request that carries them to the addon.
_LAYER_ERRORS: weakref.WeakKeyDictionary[Any, KeylessError] = weakref.WeakKeyDictionary()


# Records a refusal no request could be attached to: (error, client address, decision id).
RefusalAudit = Callable[[KeylessError, Any, str], None]


@dataclasses.dataclass(slots=True)
class _State:
    limits: WireLimits = WireLimits()
    installed: bool = False
    connections: int = 0
    on_refusal: RefusalAudit | None = None


_STATE = _State()


def install(limits: WireLimits, on_refusal: RefusalAudit | None = None) -> None:
    """Patch mitmproxy once per process; later calls only change the limits in force.

    ``on_refusal`` audits the refusals written before any request exists (a connection over
    ``max_connections``, a head that never names a destination).
    """
    _STATE.limits = limits
    _STATE.on_refusal = on_refusal
    if _STATE.installed:
        return
    _STATE.installed = True
    _patch_http1()
    _patch_http2()
    _patch_connections()


def _audit_refusal(error: KeylessError, peer: Any, decision_id: str) -> None:
    if _STATE.on_refusal is None:
        return
    try:
        _STATE.on_refusal(error, peer, decision_id)
    except Exception as e:  # noqa: BLE001 - an audit failure must not keep the socket open
        log.error("auditing a wire refusal failed: %s", type(e).__name__)


def wire_refusal(request: http.Request, limits: WireLimits) -> KeylessError | None:
    """The refusal the wire rules demand for this request, or None. Call it first in
    ``requestheaders`` and ``http_connect``, before anything reads the request."""
    error = _LAYER_ERRORS.pop(request, None)
    if error is not None:
        return error
    multiplexed = request.is_http2 or request.is_http3
    if _STATE.installed and not multiplexed:
        return None  # the patched HTTP/1 reader already held the raw head to the same rules
    return check_fields(request.headers.fields, limits, http2=multiplexed)


# --- HTTP/1 -----------------------------------------------------------------------------------


class _Discard:
    """Stands in for mitmproxy's receive buffer once a head is refused: the rest of what the
    client sends is dropped instead of buffered until the connection closes."""

    _data = bytearray()

    def __iadd__(self, data: bytes) -> _Discard:
        return self

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False

    def __bytes__(self) -> bytes:
        return b""

    def maybe_extract_at_most(self, count: int) -> None:
        return None


def _patch_http1() -> None:
    from h11._readers import ContentLengthReader
    from mitmproxy.net.http import http1, url
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers.http import _http1
    from mitmproxy.proxy.layers.http._base import ReceiveHttp
    from mitmproxy.proxy.layers.http._events import ErrorCode, RequestHeaders, ResponseProtocolError

    read_headers = _http1.Http1Server.read_headers
    send = _http1.Http1Client.send

    def refuse_head(self: Any, error: KeylessError) -> Generator[Any, Any, None]:
        data = self.buf._data
        request = None
        if (line := request_line(data)) is not None:
            try:
                request = http1.read_request_head([line])
            except ValueError:
                request = None
        if request is not None:
            host = host_line(data)
            server = self.context.server.address
            if host is not None:
                request.headers["Host"] = host.decode("ascii")
            elif not request.host and server is not None:
                request.headers["Host"] = url.hostport("https" if self.context.client.tls else "http", *server)
            elif not request.host:
                request = None  # origin-form with no destination: nothing to name in an audit record
        self.buf = _Discard()
        if request is None:
            did, raw = raw_refusal(error)
            log.warning("refused a request from %s before it named a destination: %s (decision %s)",
                        self.conn.peername, error.code, did)
            _audit_refusal(error, self.conn.peername, did)
            # Already Keyless's JSON answer, audited: proxy.answer_layers must not re-answer it.
            self.keyless_answered = True
            yield commands.SendData(self.conn, raw)
            yield commands.CloseConnection(self.conn)
            self.state = self.done
            return
        request.headers["Connection"] = "close"
        _LAYER_ERRORS[request] = error
        self.request = request
        yield ReceiveHttp(RequestHeaders(self.stream_id, request, True))
        self.body_reader = ContentLengthReader(0)
        self.state = self.read_body
        yield from self.state(events.DataReceived(self.conn, b""))

    def checked_read_headers(self: Any, event: Any) -> Generator[Any, Any, None]:
        if isinstance(event, events.DataReceived):
            error = inspect_http1_head(self.buf._data, _STATE.limits)
            if error is not None:
                yield from refuse_head(self, error)
                return
        yield from read_headers(self, event)

    def framed_send(self: Any, event: Any) -> Generator[Any, Any, None]:
        if isinstance(event, RequestHeaders) and (event.request.is_http2 or event.request.is_http3):
            content = event.request.raw_content
            fields = http1_framing(event.request.headers.fields, end_stream=event.end_stream,
                                   buffered_length=None if content is None else len(content))
            if fields is not None:
                from mitmproxy.http import Headers

                request = event.request.copy()
                request.headers = Headers(fields)
                event = dataclasses.replace(event, request=request)
        yield from send(self, event)

    client_read_headers = _http1.Http1Client.read_headers

    def checked_client_read_headers(self: Any, event: Any) -> Generator[Any, Any, None]:
        # The same bound for an upstream's response head ("FIXME: protect against header size
        # DoS" in mitmproxy): a hostile or broken upstream must not grow the buffer either.
        limit = _STATE.limits.max_header_bytes
        if (isinstance(event, events.DataReceived) and self.stream_id is not None
                and len(self.buf) > limit and response_head_incomplete(self.buf._data)):
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(ResponseProtocolError(
                self.stream_id, f"upstream response header block over {limit} bytes",
                ErrorCode.GENERIC_SERVER_ERROR))
            self.buf = _Discard()
            return
        yield from client_read_headers(self, event)

    _http1.Http1Server.read_headers = checked_read_headers  # type: ignore[method-assign]
    _http1.Http1Client.read_headers = checked_client_read_headers  # type: ignore[method-assign]
    _http1.Http1Client.send = framed_send  # type: ignore[method-assign]


# --- HTTP/2 -----------------------------------------------------------------------------------


def _patch_http2() -> None:
    import h2.exceptions
    from h2.frame_buffer import FrameBuffer
    from mitmproxy.proxy.layers.http import _http2

    class BoundedFrameBuffer(FrameBuffer):
        """h2 joins HEADERS + CONTINUATION frames until END_HEADERS (up to 64 frames of
        mitmproxy's 128 KiB max frame size); stop at ``cap`` bytes instead."""

        cap = 0

        def _update_header_buffer(self, f: Any) -> Any:
            out = super()._update_header_buffer(f)
            if sum(len(x.data) for x in self._headers_buffer) > self.cap:
                raise h2.exceptions.DenialOfServiceError("header block too large")
            return out

    init = _http2.Http2Server.__init__

    def limited_init(self: Any, context: Any) -> None:
        init(self, context)
        hard = 2 * _STATE.limits.max_header_bytes
        conn = self.h2_conn
        conn.local_settings.max_header_list_size = _STATE.limits.max_header_bytes
        conn.local_settings.acknowledge()  # as mitmproxy does: initial settings, no ACK awaited
        conn.decoder.max_header_list_size = hard
        buffer = BoundedFrameBuffer(server=True)
        buffer.cap = hard
        conn.incoming_buffer = buffer

    _http2.Http2Server.__init__ = limited_init  # type: ignore[method-assign]


# --- connections and timeouts ---------------------------------------------------------------


_HOOK_FIELDS: dict[type, tuple[str, ...]] = {}


class _Watch:
    """One client connection's timer: re-armed whenever its ConnectionClock changes."""

    def __init__(self, handler: Any, limits: WireLimits) -> None:
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.clock = ConnectionClock(limits, self.loop.time())
        self.timer: asyncio.TimerHandle | None = None
        self.fired: str | None = None
        self.rearm()

    def rearm(self) -> None:
        d = self.clock.deadline()
        if d is None or self.fired:
            self.stop()
            return
        if self.timer is not None:
            if self.timer.when() <= d[0]:
                # Activity mostly moves the deadline later: the armed timer fires first, finds
                # the deadline not reached and re-arms (fire). No new timer per request.
                return
            self.timer.cancel()
        self.timer = self.loop.call_at(d[0], self.fire)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None

    def client_bytes(self) -> None:
        before = self.clock.head_since
        self.clock.multiplexed = self.handler.client.alpn == b"h2"
        self.clock.client_bytes(self.loop.time())
        if self.clock.head_since != before:
            self.rearm()

    def hook(self, name: str, data: Any) -> None:
        key = getattr(data, "id", None)
        if not isinstance(key, str):
            return
        now = self.loop.time()
        if name in ("requestheaders", "http_connect"):
            self.clock.request_started(key, now)
        elif name in ("response", "error", "http_connected", "http_connect_error"):
            if name == "error" and self.fired == "request_timeout":
                from mitmproxy import flow

                data.error = flow.Error(f"keyless: request_timeout ({self.clock.limits.request_timeout:g}s)")
            self.clock.request_done(key, now)
        elif name in ("websocket_start", "tcp_start", "udp_start"):
            self.clock.exempt = True
        else:
            return
        self.rearm()

    def fire(self) -> None:
        self.timer = None
        d = self.clock.deadline()
        now = self.loop.time()
        if d is None:
            return
        when, reason = d
        if when > now:
            self.rearm()
            return
        io = self.handler.transports.get(self.handler.client)
        if io is None or io.handler is None:
            self.timer = self.loop.call_at(now + 1, self.fire)
            return
        transport = getattr(io.writer, "transport", None)
        if reason == "idle_timeout" and transport is not None and transport.get_write_buffer_size():
            # The last response is still being written to a slow reader: not idle yet.
            self.timer = self.loop.call_at(now + 1, self.fire)
            return
        self.fired = reason
        log.info("closing connection from %s: %s (%gs)", self.handler.client.peername, reason,
                 getattr(self.clock.limits, reason))
        io.handler.cancel(f"keyless: {reason}")


async def _refuse_connection(handler: Any) -> None:
    limits = _STATE.limits
    io = handler.transports.pop(handler.client)
    error = KeylessError("overloaded", f"more than {limits.max_connections} client connections")
    did, raw = raw_refusal(error, retry_after=limits.retry_after)
    log.warning("refused connection from %s: %s (decision %s)", handler.client.peername, error.code, did)
    _audit_refusal(error, handler.client.peername, did)
    try:
        io.writer.write(raw)
        await io.writer.drain()
        io.writer.write_eof()
        # Read what the client already sent, briefly: closing with unread data makes the
        # kernel answer with a reset, which can destroy the 503 before the client reads it.
        async with asyncio.timeout(1):
            while await io.reader.read(65536):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        io.writer.close()


def _patch_connections() -> None:
    from mitmproxy.connection import ConnectionState
    from mitmproxy.proxy import events, mode_servers, server

    handle_client = server.ConnectionHandler.handle_client
    server_event = server.ConnectionHandler.server_event
    handle_hook = mode_servers.ProxyConnectionHandler.handle_hook
    handle_connection = server.ConnectionHandler.handle_connection

    async def limited_handle_client(self: Any) -> None:
        if self.client.transport_protocol != "tcp":
            await handle_client(self)
            return
        if _STATE.connections >= _STATE.limits.max_connections:
            await _refuse_connection(self)
            return
        _STATE.connections += 1
        watch = self._keyless_watch = _Watch(self, _STATE.limits)
        try:
            await handle_client(self)
        finally:
            _STATE.connections -= 1
            watch.stop()

    # Plain functions that return mitmproxy's coroutine: every event of every connection goes
    # through them, and an async wrapper would add a coroutine of its own to each.
    def watched_server_event(self: Any, event: Any) -> Coroutine[Any, Any, None]:
        watch: _Watch | None = getattr(self, "_keyless_watch", None)
        if watch is not None and type(event) is events.DataReceived and event.connection is self.client:
            watch.client_bytes()
        return server_event(self, event)

    def watched_handle_hook(self: Any, hook: Any) -> Coroutine[Any, Any, None]:
        watch: _Watch | None = getattr(self, "_keyless_watch", None)
        if watch is not None:
            # Hook.args() introspects the dataclass on every call: its field names, once a class.
            names = _HOOK_FIELDS.get(type(hook))
            if names is None:
                names = _HOOK_FIELDS[type(hook)] = tuple(f.name for f in dataclasses.fields(hook))
            if len(names) == 1:
                watch.hook(hook.name, getattr(hook, names[0]))
        return handle_hook(self, hook)

    async def closing_handle_connection(self: Any, connection: Any) -> None:
        try:
            await handle_connection(self, connection)
        except asyncio.CancelledError:
            # mitmproxy catches the cancel that closes a connection around its reads only. When
            # a hook task closes the connection (a refusal sent with Connection: close) while
            # the client is still sending, the cancel lands in server_event, waiting for its
            # lock, and the cleanup is skipped: the socket stays open and unread for good.
            io = self.transports.pop(connection, None)
            if io is not None and io.writer is not None:
                connection.state = ConnectionState.CLOSED
                io.writer.close()
            raise

    server.ConnectionHandler.handle_client = limited_handle_client  # type: ignore[method-assign]
    server.ConnectionHandler.server_event = watched_server_event  # type: ignore[method-assign]
    mode_servers.ProxyConnectionHandler.handle_hook = watched_handle_hook  # type: ignore[method-assign]
    server.ConnectionHandler.handle_connection = closing_handle_connection  # type: ignore[method-assign]
