"""The mitmproxy addon: the only module that knows mitmproxy's hooks.

Each hook reads like a table of contents and delegates to ``proxy.broker``. mitmproxy logs an
exception raised by a hook and carries on with the flow, which would forward the request
unchecked, so every hook catches everything and answers with a refusal instead.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from mitmproxy import http, tcp
from mitmproxy.proxy import server_hooks

from proxy.broker import Broker, Exchange, check_authority
from proxy.egress import Egress
from proxy.errors import KeylessError
from proxy.model import Attestation, Source
from proxy.paths import check_path
from proxy.trust import Caller
from proxy.trust.evidence import caller_evidence

log = logging.getLogger("keyless")

_STATE = "keyless"
DECISION_HEADER = "Keyless-Decision-Id"


def refusal(error: KeylessError, decision_id: str) -> http.Response:
    body = json.dumps({"error": error.code, "message": error.message, "decision_id": decision_id})
    headers = {"Content-Type": "application/json", DECISION_HEADER: decision_id}
    if error.code == "attestation_failed":
        headers["Proxy-Authenticate"] = 'Bearer realm="keyless"'
    return http.Response.make(error.status, body, headers)


def _internal(where: str, exc: BaseException) -> KeylessError:
    # Only the exception type and where it was raised: exception text (and the locals a
    # traceback formatter may show) can echo request data or a credential.
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    log.error("internal error in %s: %s%s", where, type(exc).__name__, at)
    return KeylessError("internal_error", f"internal error in {where}")


class KeylessAddon:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # CONNECT authority per client connection: the tunnel's inner requests must match it.
        self._tunnels: dict[str, tuple[str, int]] = {}
        # What the CONNECT's Proxy-Authorization proved, kept for the requests inside the tunnel.
        self._carried: dict[str, tuple[Attestation, ...]] = {}
        listen = broker.config.listen
        self.egress = Egress(broker.config.egress, [(listen.address, listen.port)])
        self.transparent = listen.mode == "transparent"
        # Upstream (host, port) pairs an allowed request asked for, per client connection:
        # server_connect opens nothing else.
        self._allowed: dict[str, set[tuple[str, int]]] = {}
        # Decision ids of requests not yet audited: what a SIGTERM drain waits for.
        self.inflight: set[str] = set()

    def _refuse(self, flow: http.HTTPFlow, ex: Exchange, error: KeylessError) -> None:
        ex.error = error
        flow.response = refusal(error, ex.decision_id)

    def _caller(self, flow: http.HTTPFlow) -> Caller:
        conn = flow.client_conn
        return caller_evidence(
            # In transparent mode mitmproxy reports the original destination as sockname, which
            # is what the client's own socket names as its remote end: the match stays exact.
            peer=conn.peername, local=conn.sockname, connection_id=conn.id,
            proxy_authorization=flow.request.headers.get_all("proxy-authorization"),
            certificates=[c.to_cryptography() for c in conn.certificate_list],
            carried=self._carried.get(conn.id, ()),
        )

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        tunnel = (flow.request.host, flow.request.port)
        if "proxy-authorization" not in flow.request.headers:
            self._tunnels[flow.client_conn.id] = tunnel
            return
        # Attest once, on the CONNECT: inside the tunnel the client sends no Proxy-Authorization.
        addr = flow.client_conn.peername
        ex = Exchange(Source(str(addr[0]), int(addr[1])))
        try:
            identity = await self.broker.attest(self._caller(flow))
            self._carried[flow.client_conn.id] = identity.attestations
            # Only a CONNECT that succeeds opens a tunnel: a refused one leaves the connection
            # usable for plain proxy requests.
            self._tunnels[flow.client_conn.id] = tunnel
            return
        except KeylessError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - fail closed on anything
            error = _internal("http_connect", e)
        # A refused CONNECT never reaches the response hook: audit it here.
        req = flow.request
        self.broker.describe_request(ex, req.method, req.scheme, req.host, req.port, "")
        self._refuse(flow, ex, error)
        self._audit(ex, error.status)

    def client_disconnected(self, client: Any) -> None:
        self._tunnels.pop(client.id, None)
        self._carried.pop(client.id, None)
        self._allowed.pop(client.id, None)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Runs before any byte reaches the upstream; setting server.error aborts the connection.
        try:
            self.egress.check_connect(data.server.address, self._allowed.get(data.client.id, set()))
            assert data.server.address is not None
            await self.egress.check_addresses(data.server.address)
        except KeylessError as e:
            log.warning("refused upstream connection from %s: %s", data.client.peername, e.message)
            data.server.error = f"keyless: {e.message}"
        except Exception as e:  # noqa: BLE001
            data.server.error = f"keyless: {_internal('server_connect', e).message}"

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        addr = flow.client_conn.peername
        ex = Exchange(Source(str(addr[0]), int(addr[1])))
        flow.metadata[_STATE] = ex
        self.inflight.add(ex.decision_id)
        req = flow.request
        try:
            self.broker.describe_request(ex, req.method, req.scheme, req.host, req.port, req.path)
            host = req.host
            if self.transparent:
                # req.host is the original destination address; the policy sees the name.
                ex.request["destination"] = {"address": req.host, "port": req.port}
                host = await self.egress.transparent_host(
                    dst=(req.host, req.port), tls=flow.client_conn.tls_established, sni=flow.client_conn.sni,
                    host_header=req.host_header)
                ex.request["host"] = host
            ex.identity = await self.broker.attest(self._caller(flow))
            check_authority(
                scheme=req.scheme, host=host, port=req.port, host_header=req.host_header,
                connect=self._tunnels.get(flow.client_conn.id), tls=flow.client_conn.tls_established,
                sni=flow.client_conn.sni, authority=None if req.is_http2 or req.is_http3 else req.authority,
            )
            if not (req.is_http2 or req.is_http3):
                # Forward in origin-form so the upstream routes on the Host header that was checked.
                req.authority = ""
            check_path(req.path)
            doc = self.broker.policy_input(
                ex, method=req.method, scheme=req.scheme, host=host, port=req.port, path=req.path,
                query=list(req.query.items(multi=True)) if "?" in req.path else [],
                headers=list(req.headers.items(multi=True)),
                destination=ex.request["destination"] if self.transparent else None,
            )
            await self.broker.decide(ex, doc)
        except KeylessError as e:
            self._refuse(flow, ex, e)
        except Exception as e:  # noqa: BLE001 - fail closed on anything
            self._refuse(flow, ex, _internal("requestheaders", e))

    async def request(self, flow: http.HTTPFlow) -> None:
        ex: Exchange | None = flow.metadata.get(_STATE)
        if ex is None:
            # requestheaders did not run for this flow: never forward what was not decided.
            ex = Exchange(Source("", 0))
            flow.metadata[_STATE] = ex
            self._refuse(flow, ex, KeylessError("internal_error", "request reached Keyless undecided"))
            return
        if ex.refused or flow.response is not None:
            return
        try:
            req, client = flow.request, flow.client_conn
            name = str(ex.request.get("host", req.host))
            upgrade = self.egress.origination(name, req.port, req.scheme)
            if upgrade is not None:
                # Scheme and port first: the host setter rewrites the Host header from all three.
                req.scheme, req.port, req.host = "https", upgrade.upstream_port, upgrade.host
                ex.request["upstream"] = f"https://{upgrade.host}:{upgrade.upstream_port}"
            assert ex.decision is not None
            self.egress.check_injection(
                credential=ex.decision.credential, scheme=req.scheme, host=name, port=req.port,
                transparent_tls_without_sni=self.transparent and client.tls_established and not client.sni)
            await self.broker.inject(ex, req)
            self._allowed.setdefault(client.id, set()).add(Egress.allow_key(req.host, req.port))
        except KeylessError as e:
            self._refuse(flow, ex, e)
        except Exception as e:  # noqa: BLE001
            self._refuse(flow, ex, _internal("request", e))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ex: Exchange | None = flow.metadata.get(_STATE)
        if ex is not None and flow.response is not None:
            flow.response.headers[DECISION_HEADER] = ex.decision_id

    def response(self, flow: http.HTTPFlow) -> None:
        ex: Exchange | None = flow.metadata.get(_STATE)
        if ex is not None and flow.response is not None:
            flow.response.headers[DECISION_HEADER] = ex.decision_id
            self._audit(ex, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        ex: Exchange | None = flow.metadata.get(_STATE)
        if ex is None:
            return
        if ex.error is None and flow.error is not None:
            # Not a refusal: the request was allowed but the client or the upstream went away.
            ex.failure = flow.error.msg
        self._audit(ex, flow.response.status_code if flow.response else None)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        # Keyless brokers HTTP only; a raw tunnel would carry traffic no policy has seen.
        flow.kill()
        # kill() alone does not stop mitmproxy's TCP layer: it still opens the server connection
        # and relays the bytes. A connection marked with an error is never opened.
        flow.server_conn.error = "non-HTTP traffic is not relayed"
        addr = flow.client_conn.peername
        ex = Exchange(Source(str(addr[0]), int(addr[1])))
        server = flow.server_conn.address
        ex.request = {"method": None, "scheme": "tcp", "host": server[0] if server else None,
                      "port": server[1] if server else None, "path": None}
        ex.error = KeylessError("bad_request", "non-HTTP traffic is not relayed")
        self._audit(ex, None)

    def _audit(self, ex: Exchange, status: int | None) -> None:
        self.inflight.discard(ex.decision_id)
        try:
            self.broker.audit(ex, status)
        except Exception as e:  # noqa: BLE001 - an audit failure must be loud, not fatal to the loop
            log.error("audit sink failed: %s", type(e).__name__)
