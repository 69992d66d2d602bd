"""Where Keyless's answers replace mitmproxy's own, inside its HTTP layer (mitmproxy 12.3).

mitmproxy answers an unreachable upstream, a failed TLS handshake or a malformed request with an
HTML page built deep in its HTTP layer, after the ``error`` hook and out of an addon's reach
(``HttpStream.handle_protocol_error`` sends a ``ResponseProtocolError`` that ``Http1Server`` and
``Http2Server`` render with ``format_error``). It also only answers a response set in
``requestheaders`` after reading the whole request body, and sends ``100 Continue`` right after
that hook even when the response is a refusal. Two subclasses, installed in place of mitmproxy's
by :func:`install`, change exactly that:

- ``KeylessHttpStream`` (one per request) renders every ``ResponseProtocolError`` that would
  become an error page as the JSON refusal the ``error`` hook chose (``flow.metadata[ANSWER]``);
  answers a refusal set in ``requestheaders`` at once, without ``100 Continue`` and without
  reading the body (HTTP/1: ``Connection: close``, FIN after the answer, the rest of the body
  read and dropped up to a bound, then the connection closed; HTTP/2: the stream is reset);
  and enforces ``listen.max_request_body`` on buffered and streamed bodies.
- ``KeylessHttp1Server`` renders the 400 page for a request head mitmproxy cannot parse, and
  closes a connection once it has dropped ``DISCARD_LIMIT`` bytes of a body answered early.

The subclasses record what they saw in ``flow.metadata`` (:data:`WIRE`, :data:`SENT`); which
refusal that becomes is decided by plain functions in ``proxy.answers``.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any, Final, Protocol

from mitmproxy import connection, http
from mitmproxy.flow import Error
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as mhttp
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook, HttpResponseHeadersHook

from proxy.answers import Answer, WireError, body_too_large, refusal_body, refusal_headers, wire_refusal
from proxy.errors import KeylessError

Commands = Generator[Any, Any, Any]

WIRE: Final = "keyless.wire"  # WireError: what mitmproxy's HTTP layer reported for the flow
SENT: Final = "keyless.sent"  # True once final response headers went to the client
ANSWER: Final = "keyless.answer"  # Answer: the refusal the error hook chose

# After answering a request whose body is still arriving, HTTP/1 reads and drops at most this
# much before closing: closing with unread data makes the kernel send RST, which can destroy
# the answer before the client reads it; reading forever would let a client hold the
# connection. Clients that read while they upload (curl) stop sending on the answer.
DISCARD_LIMIT: Final = 4 << 20


class Seam(Protocol):
    """What the layer needs from Keyless (the addon implements it)."""

    @property
    def max_request_body(self) -> int: ...

    def refuse(self, flow: http.HTTPFlow, error: KeylessError) -> None:
        """Set ``flow.response`` to the refusal for ``error``; the response hook audits it."""

    def orphan(self, client: connection.Connection, request: http.Request | None, error: KeylessError,
               flow: http.HTTPFlow | None = None) -> str:
        """Audit a refusal that no error hook chose (mitmproxy runs none for it), unless ``flow``
        was audited already; return its decision id."""


_seam: Seam | None = None


def install(seam: Seam) -> None:
    """Make mitmproxy's HTTP layer build Keyless's streams and HTTP/1 servers (idempotent)."""
    global _seam
    _seam = seam
    # HttpLayer looks both names up in this module at call time (make_stream, Start).
    setattr(mhttp, "HttpStream", KeylessHttpStream)  # noqa: B010 - patching mitmproxy's module
    setattr(mhttp, "Http1Server", KeylessHttp1Server)  # noqa: B010


def _the_seam() -> Seam:
    if _seam is None:
        raise RuntimeError("proxy.answer_layers.install() was not called")
    return _seam


def error_answer(flow: http.HTTPFlow, refused: KeylessError | None, connect_failure: KeylessError | None,
                 decision_id: str) -> tuple[KeylessError, bool] | None:
    """For the ``error`` hook: the refusal this failed flow ends in, and whether the client gets
    it as an answer (False: response headers had already gone out, the connection is cut).

    None when the error was the client's going away (nothing is answered). ``refused`` is a
    refusal Keyless already decided (it wins); ``connect_failure`` what the connection hooks
    learned about a failed upstream connection.
    """
    wire: WireError | None = flow.metadata.get(WIRE)
    if wire is None or not wire.answerable:
        return None
    error = refused if refused is not None else wire_refusal(wire, connect_failure)
    if flow.metadata.get(SENT):
        return error, False
    flow.metadata[ANSWER] = Answer(error, decision_id)
    return error, True


def _unreported(flow: http.HTTPFlow) -> WireError:
    """The cause of an error hook no event announced: a kill (nothing is answered), or
    check_invalid() refusing a request or response mitmproxy will not forward (smuggling-prone
    framing)."""
    msg = flow.error.msg if flow.error else "invalid message"
    if msg == Error.KILLED_MESSAGE:
        return WireError("KILL", msg)
    return WireError(f"{'REQUEST' if flow.response is None else 'RESPONSE'}_VALIDATION_FAILED", msg)


def _response(error: KeylessError, decision_id: str, *, close: bool) -> http.Response:
    return http.Response.make(error.status, refusal_body(error, decision_id),
                              refusal_headers(error, decision_id, close=close))


class KeylessHttpStream(mhttp.HttpStream):
    """mitmproxy's HttpStream with Keyless's answers (see the module docstring)."""

    _body_pending = False
    _body_seen = 0

    def handle_event(self, event: events.Event) -> Commands:
        # Every event of every request passes through here: exact type tests (none of these
        # classes has a subclass) and one attribute lookup per command keep it cheap.
        flow: http.HTTPFlow | None = getattr(self, "flow", None)
        if flow is not None:
            # Record the cause before the stream handles it: the error hook reads it.
            if type(event) is mhttp.GetHttpConnectionCompleted and event.reply[1]:
                flow.metadata[WIRE] = WireError("CONNECT_FAILED", str(event.reply[1]))
            elif type(event) is RequestProtocolError or type(event) is ResponseProtocolError:
                flow.metadata.setdefault(WIRE, WireError(event.code.name, event.message))
        client = self.context.client
        for command in super().handle_event(event):
            if type(command) is mhttp.SendHttp:
                if command.connection is client:
                    ev = command.event
                    if type(ev) is ResponseHeaders and ev.response.status_code >= 200:
                        self.flow.metadata[SENT] = True
                    elif (type(ev) is ResponseProtocolError and not self.flow.metadata.get(SENT)
                          and ev.code.http_status_code() is not None):
                        yield from self._answer_error(ev)
                        continue
            elif type(command) is HttpErrorHook and WIRE not in command.flow.metadata:
                command.flow.metadata[WIRE] = _unreported(command.flow)
            yield command

    # -- error pages -> JSON -----------------------------------------------------------------

    def _answer_error(self, ev: ResponseProtocolError) -> Commands:
        answer: Answer | None = self.flow.metadata.get(ANSWER)
        if answer is None:
            # No error hook ran for this error (mitmproxy sends none for a request without a
            # Host header, for instance): audit it here.
            error = wire_refusal(WireError(ev.code.name, ev.message))
            answer = Answer(error, _the_seam().orphan(self.context.client, self.flow.request, error, self.flow))
        http1_client = not (self.flow.request.is_http2 or self.flow.request.is_http3)
        resp = _response(answer.error, answer.decision_id, close=http1_client)
        self.flow.metadata[SENT] = True
        yield mhttp.SendHttp(ResponseHeaders(self.stream_id, resp, end_stream=False), self.context.client)
        yield mhttp.SendHttp(ResponseData(self.stream_id, resp.raw_content or b""), self.context.client)
        yield mhttp.SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        if http1_client:
            # As mitmproxy does after its own error page (Connection: close says so); if the
            # body is still arriving, as after an early refusal (KeylessHttp1Server bounds it).
            complete = self.client_state == self.state_done or not self._body_pending
            yield commands.CloseTcpConnection(self.context.client, half_close=not complete)

    # -- a refusal set in requestheaders is answered before the body ----------------------------

    def state_wait_for_request_headers(self, event: RequestHeaders) -> Commands:
        self._body_pending = not event.end_stream
        return (yield from super().state_wait_for_request_headers(event))

    def check_killed(self, emit_error_hook: bool) -> Commands:
        # Called right after the requestheaders hook, before mitmproxy sends 100 Continue and
        # starts reading the body: the one point where a refusal can go out first.
        if (self.client_state == self.state_wait_for_request_headers and self.flow.response is not None
                and not self.flow.error):
            if not self._body_pending:
                # Nothing to read: mitmproxy's own path answers it; just never send 100.
                self.flow.request.headers.pop("expect", None)
                return False
            yield from self._answer_now()
            return True
        return (yield from super().check_killed(emit_error_hook))

    def _answer_now(self) -> Commands:
        """Send flow.response (a refusal) while the request body is unread, then stop the body."""
        assert self.flow.response is not None
        http1_client = not (self.flow.request.is_http2 or self.flow.request.is_http3)
        self.request_body_buf.clear()  # type: ignore[no-untyped-call]
        self.client_state = self._state_discard_body
        if http1_client:
            self.flow.response.headers["Connection"] = "close"
        # As mitmproxy does for a response an addon set in the request hook.
        self.flow.response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        yield from self.send_response()  # the response hook audits it
        yield mhttp.SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        if http1_client:
            # FIN after the answer; what the client still sends is read and dropped (up to
            # DISCARD_LIMIT, see KeylessHttp1Server.read_body).
            yield commands.CloseTcpConnection(self.context.client, half_close=True)
        else:
            # RFC 9113 8.1: a complete response, then RST_STREAM stops the upload.
            yield mhttp.SendHttp(ResponseProtocolError(self.stream_id, "request refused", ErrorCode.CANCEL),
                                 self.context.client)
            yield mhttp.DropStream(self.stream_id)
        self.flow.live = False

    def _state_discard_body(self, event: events.Event) -> Commands:
        if isinstance(event, RequestEndOfMessage):
            yield mhttp.DropStream(self.stream_id)

    # -- listen.max_request_body -------------------------------------------------------------

    def check_body_size(self, request: bool) -> Commands:
        # A declared Content-Length over the limit is refused by the requestheaders hook, before
        # the body. mitmproxy's own check is skipped for requests: its stream_large_bodies would
        # stream a body to the upstream before the policy decided. Responses keep mitmproxy's
        # check (body_size_limit stays unset: it would cap requests and responses alike).
        if not request:
            return (yield from super().check_body_size(request))
        if len(self.request_body_buf) > _the_seam().max_request_body:
            yield from self._refuse_body()
            return True
        return False

    def state_stream_request_body(self, event: events.Event) -> Commands:
        if isinstance(event, RequestData):
            self._body_seen += len(event.data)
            if self._body_seen > _the_seam().max_request_body:
                # Part of the body is already upstream: abort that request so the upstream
                # never sees it complete, then answer the client.
                yield mhttp.SendHttp(RequestProtocolError(self.stream_id, "request body too large",
                                                          ErrorCode.REQUEST_TOO_LARGE), self.context.server)
                self.server_state = self.state_errored
                yield from self._refuse_body()
                return
        yield from super().state_stream_request_body(event)

    def _refuse_body(self) -> Commands:
        seam = _the_seam()
        error = body_too_large(seam.max_request_body)
        if self.flow.metadata.get(SENT):
            # The upstream's answer is already on its way: all that is left is to cut it (and
            # audit that, as no response hook will run).
            seam.orphan(self.context.client, self.flow.request, error, self.flow)
            yield commands.CloseConnection(self.context.client)
            self.client_state = self.server_state = self.state_errored
            return
        seam.refuse(self.flow, error)
        yield from self._answer_now()


class KeylessHttp1Server(_http1.Http1Server):
    """mitmproxy's Http1Server, answering a request head it cannot parse with a JSON 400, and
    closing the connection once it has dropped DISCARD_LIMIT bytes of a body that was answered
    before it arrived."""

    _discarded = 0

    def read_body(self, event: events.Event) -> Commands:
        if self.response_done and isinstance(event, events.DataReceived):
            self._discarded += len(event.data)
            if self._discarded > DISCARD_LIMIT:
                yield commands.CloseConnection(self.conn)
                self.state = self.done
                return
        yield from super().read_body(event)

    def read_headers(self, event: events.ConnectionEvent) -> Commands:
        out = list(super().read_headers(event))  # only non-blocking commands are yielded here
        if getattr(self, "keyless_answered", False) or not any(isinstance(c, commands.SendData) for c in out):
            # No page to replace, or proxy.wirepatch already sent (and audited) Keyless's answer.
            yield from out
            return
        # read_headers sends data only for its 400 page; the ReceiveHttp commands that follow
        # would start a flow (and a policy decision) for a request that is refused anyway.
        reason = next((c.event.message for c in out if isinstance(c, ReceiveHttp)
                       and isinstance(c.event, RequestProtocolError)), None)
        if reason is None:
            reason = next((c.message.split(": ", 1)[-1] for c in out if isinstance(c, commands.Log)), "")
        error = wire_refusal(WireError("GENERIC_CLIENT_ERROR", reason))
        decision_id = _the_seam().orphan(self.conn, self.request, error)
        yield commands.SendData(self.conn, http1.assemble_response(_response(  # type: ignore[no-untyped-call]
            error, decision_id, close=True)))
        for c in out:
            if not isinstance(c, (commands.SendData, ReceiveHttp, commands.Log)):
                yield c
