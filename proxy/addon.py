"""The mitmproxy addon: the only module that knows mitmproxy's hooks.

Each hook is a few lines that copy what mitmproxy parsed into plain values and hand them to
``proxy.pipeline``. mitmproxy logs an exception raised by a hook and carries on with the flow,
which would forward the request unchecked (or open the tunnel), so every hook runs inside one
guard: any exception becomes a JSON refusal and exactly one audit record, never a forwarded
request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import traceback
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mitmproxy import connection as mconnection
from mitmproxy import flow as mflow
from mitmproxy import http, tcp, tls
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.proxy import server_hooks

from proxy import answers
from proxy.agents.gate import McpGate
from proxy.answer_layers import error_answer
from proxy.assets import version
from proxy.audit.event import RequestRecord
from proxy.authority import Target, cut
from proxy.errors import KeylessError
from proxy.pipeline import Connection, Exchange, Pipeline, RequestView
from proxy.reflect import RefusalStream, ResponseLimits, ResponseScan, finish_response, prepare_response
from proxy.selfcheck import answer as self_check_answer
from proxy.selfcheck import is_self_check
from proxy.wirepatch import wire_refusal

log = logging.getLogger("keyless")

_STATE = "keyless"
# Per-flow response state (proxy.reflect): what the scan found; a refusal streamed in place.
_SCAN, _REFUSAL = "keyless.scan", "keyless.refusal"
DECISION_HEADER = answers.DECISION_HEADER

F = TypeVar("F", bound=mflow.Flow)


def refusal(error: KeylessError, decision_id: str) -> http.Response:
    return http.Response.make(error.status, answers.refusal_body(error, decision_id),
                              answers.refusal_headers(error, decision_id))


def internal(where: str, exc: BaseException) -> KeylessError:
    # Only the exception type and where it was raised: exception text (and the locals a
    # traceback formatter may show) can echo request data or a credential.
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    log.error("internal error in %s: %s%s", where, type(exc).__name__, at)
    return KeylessError("internal_error", f"internal error in {where}")


def connection(conn: Any) -> Connection:
    certs = conn.certificate_list
    return Connection(id=conn.id, peer=conn.peername, local=conn.sockname, tls=conn.tls_established,
                      sni=conn.sni, certificates=[c.to_cryptography() for c in certs] if certs else ())


def view(req: http.Request, wire_error: str | None = None, wire_refusal: KeylessError | None = None) -> RequestView:
    return RequestView(
        method=req.method, scheme=req.scheme, host=req.host, port=req.port, path=req.path,
        host_header=req.host_header,
        authority=None if req.is_http2 or req.is_http3 else req.authority,
        query=list(req.query.items(multi=True)) if "?" in req.path else [],
        headers=list(req.headers.items(multi=True)),
        proxy_authorization=req.headers.get_all("proxy-authorization"),
        wire_error=wire_error, wire_refusal=wire_refusal,
    )


def point_at(flow: http.HTTPFlow, dest: Target, transparent: bool) -> None:
    """Dial, and tell the upstream, the canonical form the decision was made for.

    The host setter also rewrites Host and ``:authority``, but without IPv6 brackets
    (mitmproxy's ``url.hostport``), so the header is set again from the Target. In transparent
    mode the dialled address is the kernel's and stays.
    """
    req = flow.request
    # Each setter re-renders the head; over HTTP/1 the Host header is all there is to compare,
    # so it is rewritten only when its spelling differs. HTTP/2 and HTTP/3 may carry a Host
    # header beside :authority: always rewritten, both.
    multiplexed = req.is_http2 or req.is_http3
    if not transparent:
        if multiplexed or req.host != dest.host:
            req.host = dest.host
        if not flow.server_conn.connected and flow.server_conn.sni != dest.host:
            # A tunnel's upstream TLS would otherwise get the client's SNI spelling.
            flow.server_conn.sni = dest.host
    host_header = req.host_header
    if host_header is not None:
        canonical = dest.host_header(req.scheme)
        if multiplexed or host_header != canonical:
            req.host_header = canonical


def _upstream(req: http.Request) -> Callable[[str, int], None]:
    def switch(host: str, port: int) -> None:
        # Scheme and port first: the host setter rewrites the Host header from all three.
        req.scheme, req.port, req.host = "https", port, host
    return switch


def guarded(where: str) -> Callable[[Callable[[KeylessAddon, F], Awaitable[None]]],
                                    Callable[[KeylessAddon, F], Awaitable[None]]]:
    """The one guard: whatever a hook raises ends in a refusal and one audit record."""
    def wrap(hook: Callable[[KeylessAddon, F], Awaitable[None]]) -> Callable[[KeylessAddon, F], Awaitable[None]]:
        @functools.wraps(hook)
        async def run(self: KeylessAddon, flow: F) -> None:
            try:
                await hook(self, flow)
            except KeylessError as e:
                self.refuse(flow, e)
            except asyncio.CancelledError:
                # Shutdown cancelled the hook mid-way: nothing may leave half-decided.
                self.refuse(flow, KeylessError("internal_error", f"{where} was cancelled"))
                raise
            except Exception as e:  # noqa: BLE001 - fail closed on anything
                self.refuse(flow, internal(where, e))
        return run
    return wrap


class KeylessAddon:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        listen = pipeline.config.listen
        self.limits = ResponseLimits.parse(listen.redact_max_body, listen.max_response_body)
        # While a server connection dials: the name it was opened for, and its reserved dial name.
        self._dialling: weakref.WeakKeyDictionary[Any, tuple[tuple[str, int], str]] = weakref.WeakKeyDictionary()
        # Why an upstream connection failed, per client connection and upstream (host, port):
        # mitmproxy's error hook only has a message (proxy/answers.py).
        self._upstream_failures: dict[str, dict[tuple[str, int], KeylessError]] = {}

    @property
    def max_request_body(self) -> int:
        """``listen.max_request_body``, read by proxy.answer_layers (this addon is its Seam)."""
        return self.pipeline.config.listen.max_request_body

    @property
    def inflight(self) -> dict[str, Exchange]:
        return self.pipeline.inflight

    def _exchange(self, flow: mflow.Flow) -> Exchange:
        ex: Exchange | None = flow.metadata.get(_STATE)
        if ex is None:
            ex = self.pipeline.begin(flow.client_conn.peername)
            flow.metadata[_STATE] = ex
        return ex

    def refuse(self, flow: mflow.Flow, error: KeylessError) -> None:
        """Answer ``flow`` with ``error`` (or cut it) and write its one record. Never raises."""
        try:
            ex = self._exchange(flow)
            self.pipeline.refuse(ex, error)
            status: int | None = error.status
            if isinstance(flow, http.HTTPFlow) and flow.response is not None and flow.response.timestamp_end is None:
                # responseheaders: the upstream head is in, its body not yet read. A refusal set
                # plainly would be filled with that body when mitmproxy reads it: stream it.
                self._refuse_response(flow, ex, error)
            elif isinstance(flow, http.HTTPFlow) and not (flow.response is not None and flow.response.stream):
                flow.response = self._refusal(ex, error)
                status = flow.response.status_code
            else:
                # A streamed response already has its head on the wire, and a raw TCP flow has
                # no HTTP to answer with: cut the connection instead.
                flow.kill()
                status = None
            self._audit(ex, status)
        except Exception as e:  # noqa: BLE001 - the last line of defence: never let the flow go on
            log.error("refusal failed: %s", type(e).__name__)
            if flow.killable:
                flow.kill()

    @staticmethod
    def _refusal(ex: Exchange, error: KeylessError) -> http.Response:
        # A refused MCP message is answered as a JSON-RPC error its agent's SDK can read.
        rpc = McpGate.refusal(ex.mcp, error, ex.decision_id)
        if rpc is None:
            return refusal(error, ex.decision_id)
        return http.Response.make(rpc[0], rpc[1], answers.refusal_headers(error, ex.decision_id))

    def _audit(self, ex: Exchange, status: int | None) -> None:
        try:
            self.pipeline.finish(ex, status)
        except Exception as e:  # noqa: BLE001 - an audit failure must be loud, not fatal to the loop
            log.error("audit sink failed: %s", type(e).__name__)

    @guarded("http_connect")
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        ex = self._exchange(flow)
        req = flow.request
        # Header limits and malformed fields (proxy/limits.py) come before anything reads them.
        wire = wire_refusal(req, self.pipeline.config.listen.limits)
        if wire is not None:
            ex.request = RequestRecord("CONNECT", "", cut(req.host), req.port, "")
            raise wire
        tunnel = await self.pipeline.open_tunnel(ex, connection(flow.client_conn), req.host, req.port,
                                                 req.headers.get_all("proxy-authorization"))
        # mitmproxy dials (request.host, request.port) after this hook: the canonical address.
        req.host, req.authority = tunnel.host, tunnel.authority

    @guarded("requestheaders")
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        ex = self._exchange(flow)
        req, conn = flow.request, connection(flow.client_conn)
        if is_self_check(req.host, self.pipeline.transparent):
            # `keyless env --check`: answered here, before attestation, with no upstream.
            self.pipeline.self_check(ex, req.method, req.scheme, req.host, req.port, req.path)
            status, headers, body = self_check_answer(ex.decision_id, req.query, version())
            flow.response = http.Response.make(status, body, headers)
            return
        # Looked up by this exact request object (proxy/wirepatch.py): before any copy is made.
        wire = wire_refusal(req, self.pipeline.config.listen.limits)
        await self.pipeline.decide(ex, conn, view(req, flow.error.msg if flow.error is not None else None, wire))
        if ex.target is None:
            raise KeylessError("internal_error", "decided without a canonical target")
        point_at(flow, ex.target, self.pipeline.transparent)
        if not (req.is_http2 or req.is_http3):
            # Forward in origin-form so the upstream routes on the Host header that was checked.
            req.authority = ""
        if not self.pipeline.needs_body(ex):
            # Nothing left to decide on the body: inject now and let it stream to the upstream.
            await self.pipeline.forward(ex, conn, req, _upstream(req))
            req.stream = True

    @guarded("request")
    async def request(self, flow: http.HTTPFlow) -> None:
        ex: Exchange | None = flow.metadata.get(_STATE)
        if ex is None:
            # requestheaders did not run for this flow: never forward what was not decided.
            raise KeylessError("internal_error", "request reached Keyless undecided")
        if ex.refused or ex.forwarded or flow.response is not None:
            return
        if ex.decision is None and ex.mcp is not None:
            # An MCP message: decided now that its (bounded) body is in (proxy.agents.gate).
            await self.pipeline.decide_body(ex, flow.request.raw_content)
        await self.pipeline.forward(ex, connection(flow.client_conn), flow.request, _upstream(flow.request))

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Runs before any byte reaches the upstream; setting server.error aborts the connection.
        try:
            pin = self.pipeline.check_upstream(data.client.id, data.server.address)
            name = data.server.address
            if name is None:
                raise KeylessError("forbidden", "upstream connection without a destination")
            # mitmproxy dials server.address with asyncio.open_connection, which would resolve the
            # name again: give it a reserved name that only the pin's checked addresses answer
            # (egress.DialNames). SNI and the certificate check use server.sni, which mitmproxy
            # set to the name (set it here if not, as tls_start_server would).
            if data.server.tls and data.server.sni is None:
                data.server.sni = data.client.sni or name[0]
            egress = self.pipeline.egress
            dial = egress.dial_names.name_for(pin)
            data.server.address = (dial, pin.port)
            self._dialling[data.server] = (name, dial)
        except KeylessError as e:
            log.warning("refused upstream connection from %s: %s", data.client.peername, e.message)
            self._upstream_failed(data.client, data.server.address, e)
            data.server.error = f"keyless: {e.message}"
        except Exception as e:  # noqa: BLE001 - fail closed on anything
            data.server.error = f"keyless: {internal('server_connect', e).message}"

    def tls_failed_server(self, data: tls.TlsData) -> None:
        server = data.conn
        if isinstance(server, mconnection.Server):
            self._upstream_failed(data.context.client, server.address, answers.tls_error(server.error or "failed"))

    def _upstream_failed(self, client: mconnection.Connection, address: Any, error: KeylessError) -> None:
        # Keyed by the (host, port) the request asked for: the name, not a pin's dial name.
        if address is not None:
            self._upstream_failures.setdefault(client.id, {})[(str(address[0]), int(address[1]))] = error

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Back to the name: mitmproxy reuses a connection whose address equals the request's
        # (host, port), so it keeps serving that name only, and only from the checked address.
        self._restore_name(data)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore_name(data)

    def _restore_name(self, data: server_hooks.ServerConnectionHookData) -> None:
        dialled = self._dialling.pop(data.server, None)
        if dialled is not None:
            name, dial = dialled
            self.pipeline.egress.dial_names.forget(dial)
            # Server.__setattr__ refuses a new address on an open connection, because changing it
            # would not move the socket; here it must not move: the socket stays on the checked
            # address (peername) and only the label that reuse matches on goes back to the name.
            object.__setattr__(data.server, "address", name)

    @guarded("responseheaders")
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex = self._exchange(flow)
        if flow.response is not None:
            if not ex.refused:
                try:
                    self._scan_headers(flow, ex)
                except KeylessError as e:
                    self._refuse_response(flow, ex, e)
                except Exception as e:  # noqa: BLE001 - never hand on an unscanned response
                    self._refuse_response(flow, ex, internal("responseheaders", e))
            flow.response.headers[DECISION_HEADER] = ex.decision_id

    @guarded("response")
    async def response(self, flow: http.HTTPFlow) -> None:
        ex = self._exchange(flow)
        if flow.response is not None:
            # A KeylessError here (a streamed body that overflowed or would not decode) reaches
            # the guard, which cuts a streamed response and replaces a buffered one.
            self._scan_body(flow, ex)
            if ex.mcp is not None and ex.mcp.lists_tools and not ex.refused and flow.response.status_code == 200:
                # After reflection's redaction: the agent sees only the tools policy allows it.
                listed = await self.pipeline.filter_tools(ex, flow.response.get_content() or b"",
                                                          flow.response.headers.get("content-type"))
                if listed is not None:
                    flow.response.set_content(listed)
            flow.response.headers[DECISION_HEADER] = ex.decision_id
            self.pipeline.note_upstream(ex, flow.server_conn.peername if flow.server_conn else None)
            self._audit(ex, flow.response.status_code)

    def _scan_headers(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        """Redact the response headers and choose how its body is handled (proxy.reflect)."""
        resp = flow.response
        if resp is None:
            return
        try:
            expected = expected_http_body_size(flow.request, resp)
        except ValueError:
            expected = None
        lists = ex.mcp is not None and ex.mcp.lists_tools
        if lists and expected != 0:
            # A tools/list result is filtered whole (JSON or a finite SSE stream): buffered,
            # bounded by mcp.max_list_body, and redacted whole like any small body.
            if expected is not None and expected > self.pipeline.config.mcp.max_list_body:
                raise KeylessError("response_too_large", "tools/list response exceeds mcp.max_list_body")
            expected = 1
        p = prepare_response(ex.grant.secret_forms if ex.grant is not None else (), list(resp.headers.fields),
                             expected=expected, client_http11=flow.request.http_version == "HTTP/1.1",
                             limits=self.limits)
        resp.headers.fields = tuple(p.fields)
        resp.stream = p.stream
        if lists and p.stream:
            raise KeylessError("response_unscannable", "tools/list response cannot be decoded to filter it")
        flow.metadata[_SCAN] = p.scan
        if p.scan is not None:
            # Already true of the headers; a flow that dies mid-body is audited with it.
            ex.reflected = p.scan.as_audit()

    def _scan_body(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        resp = flow.response
        if resp is None:
            return
        refusing: RefusalStream | None = flow.metadata.get(_REFUSAL)
        if refusing is not None:
            if not refusing.sent and ex.error is not None:
                # The upstream sent no body, so the streamed refusal never went out.
                flow.response = refusal(ex.error, ex.decision_id)
            return
        scan: ResponseScan | None = flow.metadata.get(_SCAN)
        done = finish_response(scan, resp.stream, trailers=list(resp.trailers.fields) if resp.trailers else None,
                               raw=resp.raw_content, content_encoding=resp.headers.get("content-encoding"),
                               limits=self.limits)
        if scan is not None:
            ex.reflected = scan.as_audit()
        if done.trailers is not None and resp.trailers is not None:
            resp.trailers.fields = tuple(done.trailers)
        if done.body is not None:
            resp.headers.pop("content-encoding", None)
            resp.set_content(done.body)

    def _refuse_response(self, flow: http.HTTPFlow, ex: Exchange, error: KeylessError) -> None:
        """Answer with a refusal instead of the upstream response whose headers just arrived.

        Not ``refuse``: a response set here would be filled with the upstream body that
        mitmproxy reads next. The refusal streams out with the first body chunk instead and the
        rest of the upstream body is discarded, never kept; ``response`` writes the record."""
        self.pipeline.refuse(ex, error)
        answer = refusal(error, ex.decision_id)
        flow.metadata[_REFUSAL] = answer.stream = RefusalStream(answer.raw_content or b"")
        flow.response = answer

    @guarded("error")
    async def error(self, flow: http.HTTPFlow) -> None:
        ex: Exchange | None = flow.metadata.get(_STATE)
        if ex is None:
            return
        # Taken, not read: a later failure to the same upstream on this connection has its own cause.
        failure = self._upstream_failures.get(flow.client_conn.id, {}).pop((flow.request.host, flow.request.port), None)
        found = error_answer(flow, ex.error, failure, ex.decision_id)
        if found is not None:
            # Keyless answers it (proxy.answer_layers sends the JSON refusal) unless the
            # upstream's headers already went out; either way the outcome names the cause.
            error, answered = found
            self.pipeline.refuse(ex, error)
            self._audit(ex, error.status if answered else flow.response.status_code if flow.response else None)
            return
        if flow.error is not None:
            # Not a refusal: the request was allowed but the client or the upstream went away.
            self.pipeline.fail(ex, flow.error.msg)
        self.pipeline.note_upstream(ex, flow.server_conn.peername if flow.server_conn else None)
        self._audit(ex, flow.response.status_code if flow.response else None)

    @guarded("tcp_start")
    async def tcp_start(self, flow: tcp.TCPFlow) -> None:
        # Keyless brokers HTTP only; a raw tunnel would carry traffic no policy has seen.
        # kill() alone does not stop mitmproxy's TCP layer: it still opens the server connection
        # and relays the bytes. A connection marked with an error is never opened.
        flow.server_conn.error = "non-HTTP traffic is not relayed"
        ex = self._exchange(flow)
        server = flow.server_conn.address
        ex.request = RequestRecord(None, "tcp", server[0] if server else None, server[1] if server else None, None)
        raise KeylessError("bad_request", "non-HTTP traffic is not relayed")

    def client_connected(self, client: Any) -> None:
        self.pipeline.telemetry.connections.inc()
        self.pipeline.telemetry.connections_total.inc()

    def client_disconnected(self, client: Any) -> None:
        self._upstream_failures.pop(client.id, None)
        self.pipeline.telemetry.connections.dec()
        self.pipeline.disconnected(client.id)

    def audit_wire_refusal(self, error: KeylessError, peer: Any, decision_id: str) -> None:
        """Audit a refusal proxy/wirepatch.py wrote before any request existed (a connection
        over the cap, a head that never named a destination): like tcp_start, no request."""
        ex = self.pipeline.begin(peer, decision_id=decision_id)
        self.pipeline.refuse(ex, error)
        self._audit(ex, error.status)

    # -- proxy.answer_layers.Seam: answers mitmproxy's HTTP layer sends -----------------------

    def orphan(self, client: mconnection.Connection, request: http.Request | None, error: KeylessError,
               flow: http.HTTPFlow | None = None) -> str:
        """Audit a refusal no hook chose (mitmproxy runs none for it); return its decision id."""
        ex: Exchange | None = flow.metadata.get(_STATE) if flow is not None else None
        if ex is None:
            ex = self.pipeline.begin(client.peername)
            if request is not None:
                ex.request = RequestRecord(request.method, request.scheme, cut(request.host), request.port,
                                           request.path.split("?", 1)[0])
            else:  # not even a request line could be read
                ex.request = RequestRecord(None, "", None, None, None)
            if flow is not None:
                flow.metadata[_STATE] = ex
        if not ex.audited:
            self.pipeline.refuse(ex, error)
            self._audit(ex, error.status)
        return ex.decision_id
