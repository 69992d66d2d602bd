"""The request path without mitmproxy: attest, decide, strip, inject, describe for audit.

``proxy.addon`` translates mitmproxy's hooks into calls on a Broker; everything here can be
exercised with plain objects.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.audit import AuditSink
from proxy.config import Config
from proxy.credentials import CREDENTIALS, CredentialProvider, Runtime
from proxy.errors import ConfigError, KeylessError
from proxy.model import ANONYMOUS, Attestation, Decision, Grant, GrantContext, Identity, OutboundRequest, Source
from proxy.policy import PolicyEngine, PolicyUnavailable
from proxy.policy.input import build_input
from proxy.signing import Signer
from proxy.strip import strip_credentials
from proxy.trust import TRUST_PROVIDERS, Caller, TrustProvider
from proxy.trust.combine import combine, merge_carried


@dataclass(slots=True)
class Exchange:
    """Everything known about one request so far; becomes its audit record."""

    source: Source
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    time: str = field(default_factory=lambda: _now_iso())
    identity: Identity = ANONYMOUS
    request: dict[str, Any] = field(default_factory=dict)
    decision: Decision | None = None
    grant: Grant | None = None
    stripped: list[str] = field(default_factory=list)
    error: KeylessError | None = None
    failure: str | None = None
    audited: bool = False

    @property
    def refused(self) -> bool:
        return self.error is not None


class Broker:
    def __init__(self, config: Config, engine: PolicyEngine, signer: Signer, sink: AuditSink,
                 trust: list[TrustProvider], credentials: dict[str, CredentialProvider]) -> None:
        self.config = config
        self.engine = engine
        self.signer = signer
        self.sink = sink
        self.trust = trust
        self.credentials = credentials
        self.mode = config.listen.mode
        self._secret_headers = frozenset(config.strip.headers)
        self._secret_params = frozenset(config.strip.query_params)
        # Posture by workload id for input.context.posture (set by the server when configured).
        self.posture: Callable[[str | None], dict[str, Any]] | None = None

    @staticmethod
    def build_plugins(config: Config, signer: Signer) -> tuple[list[TrustProvider], dict[str, CredentialProvider]]:
        """Instantiate trust providers and credentials; raise ConfigError with every problem."""
        problems: list[str] = []
        trust = [TRUST_PROVIDERS[p.type].create(p.name, p.options) for p in config.trust]
        runtime = Runtime(signer=signer)
        credentials: dict[str, CredentialProvider] = {}
        for name, p in config.credentials.items():
            try:
                credentials[name] = CREDENTIALS[p.type].create(name, p.options, runtime)
            except ConfigError as e:
                problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        return trust, credentials

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

    def describe_request(self, ex: Exchange, method: str, scheme: str, host: str, port: int, path: str) -> None:
        # The path goes to the audit log without its query: query values may carry secrets.
        ex.request = {"method": method, "scheme": scheme, "host": host, "port": port,
                      "path": path.split("?", 1)[0]}

    def policy_input(self, ex: Exchange, *, method: str, scheme: str, host: str, port: int, path: str,
                     query: list[tuple[str, str]], headers: list[tuple[str, str]],
                     destination: dict[str, Any] | None = None) -> dict[str, Any]:
        # Every field comes from build_input: the decision-cache key is derived from its declaration.
        return build_input(
            source=ex.source, identity=ex.identity, method=method, scheme=scheme, host=host, port=port,
            path=path.split("?", 1)[0], query=query, headers=headers,
            secret_headers=self._secret_headers, secret_params=self._secret_params,
            time=ex.time, mode=self.mode, time_ns=_time_ns(ex.time),
            posture=self.posture(ex.identity.id) if self.posture is not None else None,
            destination=destination,
        )

    async def decide(self, ex: Exchange, input_doc: dict[str, Any]) -> Decision:
        decision = await self.engine.decide(input_doc)
        ex.decision = decision
        if not decision.allow:
            raise KeylessError("forbidden", decision.reason or "denied by policy")
        if decision.credential is not None and decision.credential not in self.credentials:
            raise KeylessError("credential_unavailable",
                               f"policy chose credential {decision.credential!r}, which is not configured")
        return decision

    async def inject(self, ex: Exchange, request: OutboundRequest) -> None:
        """Strip whatever the app sent, then add the credential the decision named (if any)."""
        ex.stripped = strip_credentials(request, self.config.strip)
        decision = ex.decision
        assert decision is not None and decision.allow
        if decision.credential is None:
            return
        provider = self.credentials[decision.credential]
        # In transparent mode request.host is the dialled address; credentials are minted for
        # the name the policy decided on.
        name = str(ex.request.get("host") or request.host)
        ctx = GrantContext(ex.identity, decision, request.scheme, name, request.port)
        ex.grant = await provider.apply(request, ctx)

    def audit(self, ex: Exchange, status: int | None) -> None:
        if ex.audited:
            return
        ex.audited = True
        d = ex.decision
        record: dict[str, Any] = {
            "decision_id": ex.decision_id,
            "time": ex.time,
            "source": {"address": ex.source.address, "port": ex.source.port},
            "identity": ex.identity.as_input(),
            "request": ex.request,
            "decision": None if d is None else {
                "allow": d.allow, "reason": d.reason, "credential": d.credential,
                "policy": self.engine.query, "revision": d.revision or self.engine.revision,
                "engine_decision_id": d.engine_decision_id, "cached": d.cached,
            },
            "policy_revision": d.revision if d is not None and d.revision else self.engine.revision,
            "credential": None if ex.grant is None else ex.grant.as_audit(),
            "stripped": ex.stripped,
            "outcome": _outcome(ex, status),
            "latency_ms": round((time.perf_counter() - ex.started) * 1000, 3),
        }
        self.sink.emit(record)


def _outcome(ex: Exchange, status: int | None) -> dict[str, Any]:
    if isinstance(ex.error, PolicyUnavailable):
        # No decision was made: the reason code (opa_timeout, malformed_decision, ...) says why,
        # with OPA's decision id when it answered at all.
        return {"status": status, "error": ex.error.code, "message": ex.error.message,
                "reason": ex.error.reason, "engine_decision_id": ex.error.engine_decision_id}
    if ex.error is not None:
        return {"status": status, "error": ex.error.code, "message": ex.error.message}
    if ex.failure is not None:
        return {"status": status, "error": "connection_failed", "message": ex.failure}
    return {"status": status, "error": None, "message": None}


def _time_ns(iso: str) -> int:
    """``context.time`` (millisecond precision) as Unix nanoseconds."""
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000) * 1_000_000


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _norm(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_host_header(value: str, default_port: int) -> tuple[str, int] | None:
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = value.partition(":")
    if not host:
        return None
    if not port_text:
        return _norm(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return _norm(host), int(port_text)


def check_authority(*, scheme: str, host: str, port: int, host_header: str | None,
                    connect: tuple[str, int] | None, tls: bool, sni: str | None,
                    authority: str | None = None) -> None:
    """The CONNECT authority, TLS SNI and Host header must all name the destination.

    mitmproxy never compares them; a mismatch could route a credential meant for one host to
    another (domain fronting), so it is refused with 421 before anything is injected.
    """
    target = _norm(host)

    def misdirected(why: str) -> KeylessError:
        return KeylessError("misdirected_request", why)

    if connect is not None and (_norm(connect[0]), connect[1]) != (target, port):
        raise misdirected(f"request for {host}:{port} inside a tunnel to {connect[0]}:{connect[1]}")
    if tls:
        if sni is None:
            if not _is_ip(target):
                raise misdirected("TLS without SNI for a named host")
        elif _norm(sni) != target:
            raise misdirected(f"TLS SNI {sni!r} does not match {host!r}")
    default_port = 443 if scheme == "https" else 80
    # An absolute-form request line inside a tunnel names a third authority; servers must
    # prefer it over Host (RFC 9112 3.2.2), so it has to agree as well.
    for what, value in (("request target", authority), ("Host header", host_header)):
        if not value:
            continue
        parsed = split_host_header(value, default_port)
        if parsed is None:
            raise KeylessError("bad_request", f"malformed {what}")
        if parsed != (target, port):
            raise misdirected(f"{what} {value!r} does not match {host}:{port}")
