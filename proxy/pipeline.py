"""The request path in security order, written once, as plain functions over typed values.

    framing      nothing proxy.wirepatch flagged or mitmproxy will not forward; no declared
                 body over listen.max_request_body
    destination  the canonical Target (proxy.authority); in transparent mode the name behind the
                 dialled address
    attest       every trust provider, combined into one Identity
    trace        TRACE never carries a credential (egress.trace), whatever the policy says
    authority    CONNECT authority == TLS SNI == Host header == absolute-form target, else 421
    path         no dot-segments that a server would normalise past a path-prefix grant
    input        one builder (proxy.policy.input); the decision-cache key derives from it
    mcp          for a configured MCP server, the decision waits for the JSON-RPC body
                 (``decide_body``, bounded by mcp.max_body) and reads it as ``input.mcp``
    decide       the engine's strictly parsed decision; a deny ends here
    audit        the trail can be written, or nothing credentialed leaves (audit_unavailable)
    pin          resolve the destination once; every answer checked; only those are dialled
    strip        whatever credential the app sent
    inject       the credential the decision named, minted for the canonical name
    forward      only to a connection an allowed request asked for (``check_upstream``)
    record       exactly one terminal record per request (``finish``)

``proxy.addon`` is the only caller: it turns each mitmproxy hook into one of the methods below
and wraps every hook in one guard, so any exception raised here becomes a refusal and one audit
record. Nothing in this module imports mitmproxy.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from proxy import answers
from proxy.agents.gate import McpCall, McpGate
from proxy.audit import AuditSink
from proxy.audit.event import AuditEvent, Outcome, RequestRecord, ShadowRecord
from proxy.audit.mask import mask_input
from proxy.authority import Target, check_authority, cut, target
from proxy.config import Config
from proxy.credentials import CREDENTIALS, CredentialProvider, Runtime
from proxy.egress import Egress, Pin, describe_peer
from proxy.errors import ConfigError, KeylessError
from proxy.governance.discover import Discovery, scrub_query
from proxy.governance.finding import Finding
from proxy.governance.shadow import Shadow
from proxy.model import ANONYMOUS, Attestation, Decision, Grant, GrantContext, Identity, OutboundRequest, Source
from proxy.paths import check_path
from proxy.policy import PolicyEngine, PolicyUnavailable
from proxy.policy.input import build_input
from proxy.reflect import injects, trace_refusal
from proxy.shared.revocation import Revocations
from proxy.shared.store import SharedStore
from proxy.signing import Signer
from proxy.strip import strip_credentials
from proxy.telemetry import Telemetry
from proxy.trust import TRUST_PROVIDERS, Caller, TrustProvider
from proxy.trust.combine import combine, merge_carried
from proxy.trust.evidence import caller_evidence


@dataclass(frozen=True, slots=True)
class Connection:
    """The client connection a request arrived on, as the pipeline needs it."""

    id: str
    peer: tuple[str, int]
    # In transparent mode mitmproxy reports the original destination as the local end, which is
    # what the client's own socket names as its remote end: process attestation matches on it.
    local: tuple[str, int] | None
    tls: bool
    sni: str | None
    certificates: Sequence[x509.Certificate] = ()


@dataclass(frozen=True, slots=True)
class RequestView:
    """One request's head, copied out of mitmproxy once; everything the decision may read."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    host_header: str | None
    # The request target's authority when the client sent absolute-form over HTTP/1 (None for
    # HTTP/2 and HTTP/3, whose :authority mitmproxy already folded into host and port).
    authority: str | None
    query: Sequence[tuple[str, str]]
    headers: Sequence[tuple[str, str]]
    proxy_authorization: Sequence[str] = ()
    # Why mitmproxy's HTTP layer would not forward this request (smuggling-prone framing).
    wire_error: str | None = None
    # A header block over listen.limits, or a malformed field (proxy/limits.py).
    wire_refusal: KeylessError | None = None


@dataclass(slots=True)
class Exchange:
    """What is known about one request so far. The pipeline routes on it; at the end it
    becomes one immutable AuditEvent."""

    source: Source
    decision_id: str = field(default_factory=lambda: new_decision_id())
    started: float = field(default_factory=time.perf_counter)
    # When the request arrived, in Unix milliseconds: context.time and the record's time.
    time_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    identity: Identity = ANONYMOUS
    request: RequestRecord = field(default_factory=lambda: RequestRecord(None, "", None, None, None))
    decision: Decision | None = None
    grant: Grant | None = None
    stripped: tuple[str, ...] = ()
    error: KeylessError | None = None
    failure: str | None = None
    # The canonical destination the decision is for: the upstream is dialled at and told it.
    target: Target | None = None
    # Strip and inject have run: the request may leave (and must not be injected twice).
    forwarded: bool = False
    # What proxy.redact removed from the response (ResponseScan.as_audit()); None when no
    # credential was injected, so nothing could be reflected.
    reflected: dict[str, Any] | None = None
    audited: bool = False
    # The policy input document as the engine saw it (the audit record keeps a masked copy).
    input: dict[str, Any] | None = None
    # What the policy.shadow candidate would have decided (recorded, never enforced).
    shadow: ShadowRecord | None = None
    # A request to a configured MCP server (proxy.agents.gate).
    mcp: McpCall | None = None
    # Static secrets the app sent (proxy.governance.discover), and whether its body is buffered
    # for that inspection.
    found: tuple[Finding, ...] = ()
    inspect_body: bool = False

    @property
    def time(self) -> str:
        """``time_ms`` as RFC 3339 UTC with milliseconds (``2026-12-01T10:00:00.123Z``)."""
        return iso_ms(self.time_ms)

    @property
    def refused(self) -> bool:
        return self.error is not None

    @property
    def host(self) -> str:
        """The canonical name the decision was made for (credentials are minted for it)."""
        return self.request.host or ""


class Pipeline:
    """One running Keyless's request path and the per-connection state it keeps."""

    def __init__(self, config: Config, engine: PolicyEngine, signer: Signer, sink: AuditSink,
                 trust: list[TrustProvider], credentials: dict[str, CredentialProvider],
                 egress: Egress | None = None) -> None:
        self.config = config
        self.engine = engine
        self.signer = signer
        self.sink = sink
        self.trust = trust
        self.credentials = credentials
        listen = config.listen
        self.mode = listen.mode
        self.transparent = listen.mode == "transparent"
        self.egress = egress or Egress(config.egress, [(listen.address, listen.port)])
        self.mcp = McpGate(config.mcp)
        # The user's token for on-behalf-of credentials is addressed to Keyless: never forwarded,
        # never in the input.
        user_header = self.mcp.user_header
        self._strip = config.strip if user_header is None or user_header in config.strip.headers else \
            dataclasses.replace(config.strip, headers=(*config.strip.headers, user_header))
        self._secret_headers = frozenset(self._strip.headers)
        self._secret_params = frozenset(config.strip.query_params)
        self._needs_body = frozenset(name for name, p in config.credentials.items()
                                     if CREDENTIALS[p.type].requires_request_body)
        self.discovery = Discovery(config.discovery, config.strip) if config.discovery.enabled else None
        # Posture by workload id for input.context.posture (set by the server when configured).
        self.posture: Callable[[str | None], dict[str, Any]] | None = None
        # policy.shadow (set by the server when configured): asked beside the engine, never raises.
        self.shadow: Shadow | None = None
        # Shared revocations (proxy/shared/revocation.py), set by the server with cache.redis.
        self.revocations: Revocations | None = None
        # Per client connection: the CONNECT authority its tunnel was opened for; what that
        # CONNECT's Proxy-Authorization proved (inside the tunnel nothing is re-presented); and
        # the upstream (host, port) pairs an allowed request asked for, each with the checked
        # addresses it resolved to (nothing else is dialled, and never by name).
        self._tunnels: dict[str, Target] = {}
        self._carried: dict[str, tuple[Attestation, ...]] = {}
        self._allowed: dict[str, dict[tuple[str, int], Pin]] = {}
        # Requests not yet audited, by decision id: what a SIGTERM drain waits for (and cuts).
        self.inflight: dict[str, Exchange] = {}
        self.telemetry = Telemetry()
        audit = config.audit
        self._mask = audit.mask
        self.labels: dict[str, str] = dict(audit.labels)

    @staticmethod
    def build_plugins(config: Config, signer: Signer, shared: SharedStore | None = None,
                      ) -> tuple[list[TrustProvider], dict[str, CredentialProvider]]:
        """Instantiate trust providers and credentials; raise ConfigError with every problem.
        ``shared``: the Redis store behind their token caches (``cache.redis``)."""
        problems: list[str] = []
        trust = [TRUST_PROVIDERS[p.type].create(p.name, p.options) for p in config.trust]
        runtime = Runtime(signer=signer, shared=shared)
        credentials: dict[str, CredentialProvider] = {}
        for name, p in config.credentials.items():
            try:
                credentials[name] = CREDENTIALS[p.type].create(name, p.options, runtime)
            except ConfigError as e:
                problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        return trust, credentials

    # --- one request, in order ------------------------------------------------------------------

    def begin(self, peer: tuple[str, int] | None, decision_id: str | None = None) -> Exchange:
        ex = Exchange(Source(str(peer[0]), int(peer[1])) if peer else Source("", 0))
        if decision_id is not None:
            ex.decision_id = decision_id
        self.inflight[ex.decision_id] = ex
        return ex

    async def open_tunnel(self, ex: Exchange, conn: Connection, host: str, port: int,
                          proxy_authorization: Sequence[str]) -> Target:
        """A CONNECT: attest once (inside the tunnel no Proxy-Authorization is sent again).

        Only a CONNECT that succeeds opens a tunnel: a refused one leaves the connection usable
        for plain proxy requests, with nothing carried. Returns the canonical tunnel target,
        which the caller must make the address mitmproxy dials.
        """
        ex.request = RequestRecord("CONNECT", "", cut(host), port, "")
        tunnel = target(host, port)
        ex.request = RequestRecord("CONNECT", "", tunnel.host, port, "")
        if proxy_authorization:
            identity = await self.attest(self._caller(conn, proxy_authorization))
            self._carried[conn.id] = identity.attestations
        self._tunnels[conn.id] = tunnel
        # An open tunnel has no record of its own: each request inside it gets one.
        self.inflight.pop(ex.decision_id, None)
        return tunnel

    async def decide(self, ex: Exchange, conn: Connection, view: RequestView) -> Decision | None:
        """Everything up to and including the decision; raises KeylessError to refuse. None: an
        MCP message, decided on its body by ``decide_body``."""
        # destination: the raw host (cut short) is recorded until it is known to parse
        path = view.path.split("?", 1)[0]
        ex.request = RequestRecord(view.method, view.scheme, cut(view.host), view.port, path)
        # framing: what mitmproxy will not forward is never decided, and a declared body over
        # the limit is refused before a byte of it is read
        if view.wire_refusal is not None:
            raise view.wire_refusal
        if view.wire_error is not None:
            raise answers.wire_refusal(answers.WireError("REQUEST_VALIDATION_FAILED", view.wire_error))
        answers.check_declared_size([v for n, v in view.headers if n.lower() == "content-length"],
                                    self.config.listen.max_request_body)
        dest = target(view.host, view.port)
        host = dest.host
        ex.request = RequestRecord(view.method, view.scheme, host, view.port, path)
        destination: dict[str, Any] | None = None
        if self.transparent:
            # view.host is the original destination address; the policy sees the name.
            destination = {"address": view.host, "port": view.port}
            host = await self.egress.transparent_host(
                dst=(view.host, view.port), tls=conn.tls, sni=conn.sni, host_header=view.host_header)
            dest = target(host, view.port)
            ex.request = RequestRecord(view.method, view.scheme, host, view.port, path, destination=destination)
        # attest
        ex.identity = await self.attest(self._caller(conn, view.proxy_authorization))
        if self.revocations is not None:
            # input.identity.revoked; a revocation-sensitive identity is refused here while the
            # revocation state is unknown.
            ex.identity = self.revocations.mark(ex.identity)
        # TRACE echoes the request, credential included: refused (egress.trace) before the
        # policy is asked, so no policy can allow it.
        trace = trace_refusal(view.method, self.config.egress.trace)
        if trace is not None:
            raise trace
        # authority
        check_authority(scheme=view.scheme, target=dest, host_header=view.host_header,
                        connect=self._tunnels.get(conn.id), tls=conn.tls, sni=conn.sni,
                        authority=view.authority)
        ex.target = dest
        # path
        check_path(view.path)
        # input
        doc = self.policy_input(ex, method=view.method, scheme=view.scheme, host=host, port=view.port,
                                path=view.path, query=view.query, headers=view.headers, destination=destination)
        ex.input = doc
        # mcp: a JSON-RPC message is decided on its body, which mitmproxy buffers for it
        ex.mcp = self.mcp.open(host, view.port, view.method, view.path, view.headers)
        await self.mcp.head(ex.mcp, doc, view.headers)
        # discovery: a small JSON or form body is held back to be inspected before strip
        ex.inspect_body = self.discovery is not None and self.discovery.wants_body(view.headers)
        if ex.mcp is not None and ex.mcp.pending:
            return None
        return await self.decide_input(ex, doc)

    async def decide_body(self, ex: Exchange, body: bytes | None) -> Decision:
        """The decision for an MCP message whose head ``decide`` took: parse, then decide."""
        if ex.mcp is None or ex.input is None or ex.decision is not None:
            raise KeylessError("internal_error", "a body decision without a pending MCP request")
        self.mcp.body(ex.mcp, body, ex.input)
        return await self.decide_input(ex, ex.input)

    async def decide_input(self, ex: Exchange, doc: dict[str, Any]) -> Decision:
        """The decision for a complete input (the head's, or an MCP message's with its body)."""
        # shadow: the candidate sees the same input first, so that an enforcing error or deny
        # still leaves its answer in the record; it cannot change what follows
        if self.shadow is not None:
            ex.shadow = s = await self.shadow.decide(doc)
            self.telemetry.shadowed(s.revision, s.allow, s.error)
        # decide
        started = time.perf_counter()
        try:
            decision = await self.engine.decide(doc)
        except PolicyUnavailable as e:
            self.telemetry.decided("error", False, time.perf_counter() - started)
            self.telemetry.health("policy engine", f"{e.reason or e.code}: {e.message}")
            raise
        self.telemetry.decided("allow" if decision.allow else "deny", decision.cached, time.perf_counter() - started)
        self.telemetry.health("policy engine", None)
        ex.decision = decision
        if self.revocations is not None:
            self.revocations.enforce(ex.identity)
        if not decision.allow:
            raise KeylessError("forbidden", decision.reason or "denied by policy")
        if decision.credential is not None and decision.credential not in self.credentials:
            raise KeylessError("credential_unavailable",
                               f"policy chose credential {decision.credential!r}, which is not configured")
        return decision

    def self_check(self, ex: Exchange, method: str, scheme: str, host: str, port: int, path: str) -> None:
        """A request Keyless answers itself (``keyless env --check``): no decision, no upstream."""
        ex.request = RequestRecord(method, scheme, cut(host), port, path.split("?", 1)[0], self_check=True)

    def needs_body(self, ex: Exchange) -> bool:
        """Whether the request body must be buffered before ``forward`` (SigV4 signs its hash)."""
        d = ex.decision
        if ex.inspect_body:  # discovery reads a small JSON or form body before strip
            return True
        if ex.mcp is not None and ex.mcp.pending:
            return True
        return d is not None and d.credential is not None and d.credential in self._needs_body

    async def forward(self, ex: Exchange, conn: Connection, request: OutboundRequest,
                      set_upstream: Callable[[str, int], None]) -> None:
        """Strip, inject and allow the upstream connection, for a request the policy allowed.

        ``set_upstream(host, port)`` switches an ``egress.tls_origination`` destination to
        HTTPS on its upstream port (the caller owns the mitmproxy request it rewrites).
        """
        decision = ex.decision
        if ex.forwarded or ex.refused or decision is None or not decision.allow:
            # Unreachable through the addon; a refusal here keeps it so if that ever changes.
            raise KeylessError("internal_error", "request reached forwarding without an allow decision")
        if decision.credential is not None and not self.sink.accepting():
            # Fail closed before anything is injected: a credential never leaves unaudited.
            raise KeylessError("audit_unavailable", "the audit trail cannot be written")
        name = ex.host
        upgrade = self.egress.origination(name, request.port, request.scheme)
        if upgrade is not None:
            set_upstream(upgrade.host, upgrade.upstream_port)
            ex.request = _with_upstream(ex.request, f"https://{upgrade.host}:{upgrade.upstream_port}")
        self.egress.check_injection(
            credential=decision.credential, scheme=request.scheme, host=name, port=request.port,
            transparent_tls_without_sni=self.transparent and conn.tls and not conn.sni)
        # Resolve once, check every answer (refused networks, Keyless itself): the upstream
        # connection dials this pin. Before inject, so no credential is minted for a refusal.
        pins = self._allowed.setdefault(conn.id, {})
        pin = await self.egress.pin_for((request.host, request.port), pins)
        if self.discovery is not None:
            # Discovery sees what the app sent, so it runs before strip removes it.
            ex.found = self.discovery.inspect(request, body=ex.inspect_body)
        ex.stripped = tuple(strip_credentials(request, self._strip))
        if decision.credential is not None and injects(request.method):
            # (Never on TRACE, whatever the decision names: egress.trace forward_bare.)
            provider = self.credentials[decision.credential]
            # In transparent mode request.host is the dialled address; credentials are minted
            # for the name the policy decided on.
            ctx = GrantContext(ex.identity, decision, request.scheme, name, request.port,
                               path=request.path.split("?", 1)[0],
                               user_token=ex.mcp.user_token if ex.mcp is not None else None)
            started = time.perf_counter()
            try:
                ex.grant = await provider.apply(request, ctx)
            except KeylessError as e:
                self.telemetry.credential(decision.credential, time.perf_counter() - started, False)
                self.telemetry.health(f"credential {decision.credential}", e.message)
                raise
            self.telemetry.credential(decision.credential, time.perf_counter() - started, True)
            self.telemetry.health(f"credential {decision.credential}", None)
        ex.forwarded = True
        pins[Egress.allow_key(request.host, request.port)] = pin

    def check_upstream(self, conn_id: str, address: tuple[str, int] | None) -> Pin:
        """``server_connect``: the checked addresses this connection may dial (a request allowed
        on the same client connection pinned them); raises KeylessError for anything else."""
        return self.egress.dial_target(address, self._allowed.get(conn_id, {}))

    def note_upstream(self, ex: Exchange, peername: tuple[str, int] | None) -> None:
        """Record the address really dialled (a refused request was forwarded nowhere)."""
        peer = describe_peer(peername)
        if peer is not None and ex.error is None:
            r = ex.request
            ex.request = dataclasses.replace(r, upstream_address=peer)

    def refuse(self, ex: Exchange, error: KeylessError) -> None:
        ex.error = error

    def fail(self, ex: Exchange, message: str) -> None:
        """The request was allowed but died on the way (client gone, upstream down)."""
        if ex.error is None:
            ex.failure = message

    def finish(self, ex: Exchange, status: int | None) -> None:
        """Write the request's one terminal audit record (later calls are no-ops)."""
        self.inflight.pop(ex.decision_id, None)
        if ex.audited:
            return
        ex.audited = True
        event = self.event(ex, status)
        self.sink.emit(event)
        self.telemetry.finished(event)

    def cut_inflight(self) -> int:
        """Drain over: every request still in flight gets its terminal ``drain_timeout`` record."""
        cut = list(self.inflight.values())
        for ex in cut:
            self.refuse(ex, KeylessError("drain_timeout", "still in flight when the drain period ended"))
            self.finish(ex, None)
        return len(cut)

    def disconnected(self, conn_id: str) -> None:
        self._tunnels.pop(conn_id, None)
        self._carried.pop(conn_id, None)
        self._allowed.pop(conn_id, None)

    # --- the steps' parts -----------------------------------------------------------------------

    async def attest(self, caller: Caller) -> Identity:
        """Run every trust provider and combine their evidence (see ``proxy.trust.combine``)."""
        found: list[Attestation] = []
        for provider in self.trust:
            att = await provider.attest(caller)
            if att is not None:
                found.append(att)
        if (caller.proxy_authorization is not None and not any(a.type == "jwt" for a in found)
                and any(p.type == "jwt" for p in self.trust)):
            # A token was presented and no provider verified it: never downgrade to "no identity".
            raise KeylessError("attestation_failed", "no trust provider accepts the token's issuer")
        return combine(merge_carried(found, caller.carried))

    def _caller(self, conn: Connection, proxy_authorization: Sequence[str]) -> Caller:
        return caller_evidence(
            peer=conn.peer, local=conn.local, connection_id=conn.id,
            proxy_authorization=proxy_authorization, certificates=conn.certificates,
            carried=self._carried.get(conn.id, ()),
        )

    def policy_input(self, ex: Exchange, *, method: str, scheme: str, host: str, port: int, path: str,
                     query: Sequence[tuple[str, str]], headers: Sequence[tuple[str, str]],
                     destination: dict[str, Any] | None = None) -> dict[str, Any]:
        # Every field comes from build_input: the decision-cache key is derived from its declaration.
        return build_input(
            source=ex.source, identity=ex.identity, method=method, scheme=scheme, host=host, port=port,
            path=path.split("?", 1)[0], query=query, headers=headers,
            secret_headers=self._secret_headers, secret_params=self._secret_params,
            time=ex.time, mode=self.mode, time_ns=ex.time_ms * 1_000_000,
            posture=self.posture(ex.identity.id) if self.posture is not None else None,
            destination=destination,
        )

    def event(self, ex: Exchange, status: int | None) -> AuditEvent:
        doc = scrub_query(ex.input, ex.found) if ex.input is not None and ex.found else ex.input
        recorded, erased, masked = mask_input(doc, self._mask) if doc is not None else (None, [], [])
        return AuditEvent(
            decision_id=ex.decision_id, time=ex.time, source=ex.source, identity=ex.identity,
            request=ex.request, decision=ex.decision, policy=self.engine.query,
            engine_revision=self.engine.revision, grant=ex.grant, stripped=ex.stripped, reflected=ex.reflected,
            outcome=outcome(ex, status), latency_ms=round((time.perf_counter() - ex.started) * 1000, 3),
            input=recorded, erased=tuple(erased), masked=tuple(masked),
            bundles={"keyless": {"revision": self.revision_of(ex)}}, labels=self.labels, shadow=ex.shadow,
            mcp=McpGate.audit(ex.mcp, ex.identity), found=ex.found,
        )

    async def filter_tools(self, ex: Exchange, body: bytes, content_type: str | None) -> bytes | None:
        """A tools/list response with only the tools the policy would let this caller call."""
        call, doc = ex.mcp, ex.input
        if call is None or doc is None:
            return None

        async def allow(tool: str, changed: bool) -> bool:
            return (await self.engine.decide(self.mcp.listing_input(doc, call, tool, changed))).allow

        return await self.mcp.listing(call, body, content_type, allow)

    def revision_of(self, ex: Exchange) -> str:
        d = ex.decision
        return d.revision if d is not None and d.revision else self.engine.revision


def outcome(ex: Exchange, status: int | None) -> Outcome:
    if isinstance(ex.error, PolicyUnavailable):
        # No decision was made: the reason code (opa_timeout, malformed_decision, ...) says why,
        # with OPA's decision id when it answered at all.
        return Outcome(status, ex.error.code, ex.error.message, ex.error.reason or "",
                       ex.error.engine_decision_id)
    if ex.error is not None:
        return Outcome(status, ex.error.code, ex.error.message)
    if ex.failure is not None:
        return Outcome(status, "connection_failed", ex.failure)
    return Outcome(status)


def _with_upstream(r: RequestRecord, upstream: str) -> RequestRecord:
    return dataclasses.replace(r, upstream=upstream)


def new_decision_id() -> str:
    """A random UUID (version 4) as 32 hex digits: ``uuid.uuid4().hex``, without building a UUID."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


_second: list[Any] = [None, ""]  # the last second formatted, and its text (strftime is slow)


def iso_ms(ms: int) -> str:
    """Unix milliseconds as RFC 3339 UTC, e.g. ``2026-12-01T10:00:00.123Z``."""
    sec = ms // 1000
    if _second[0] != sec:
        _second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_second[1]}.{ms % 1000:03d}Z"
