"""The fail-closed guard, in process: mitmproxy's real flows (``mitmproxy.test.tflow``), the real
pipeline with the real embedded engine and a real audit file; faults come from plug-ins that
raise (a trust provider, a credential provider, a resolver), as a broken plug-in would.

Each fault must end in a JSON refusal with the decision id and exactly one audit record, and
nothing may be left for mitmproxy to forward.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow, tutils

from proxy.addon import DECISION_HEADER, KeylessAddon, guarded
from proxy.audit import JsonLinesSink
from proxy.config import parse_config
from proxy.egress import Egress
from proxy.errors import KeylessError
from proxy.model import Attestation, Grant, GrantContext, OutboundRequest
from proxy.pipeline import Pipeline
from proxy.server import prepare
from proxy.trust import Caller
from tests.harness import REPO

HOOKS = ("http_connect", "requestheaders", "request", "responseheaders", "response", "error", "tcp_start")


class ExplodingTrust:
    """A trust provider with a bug: it raises on a presented token."""

    name, type = "exploding", "jwt"

    async def attest(self, caller: Caller) -> Attestation | None:
        if caller.proxy_authorization is not None:
            raise RuntimeError("bug in a trust provider")
        return None


class ExplodingCredential:
    name, type = "broken", "static"

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        request.headers["authorization"] = "half-injected"
        raise ZeroDivisionError


async def resolver(host: str, port: int) -> list[str]:
    """A resolver with a bug for one name and a metadata answer for another."""
    if host == "boom.example":
        raise RuntimeError("resolver bug")
    return ["169.254.169.254"] if host == "meta.example" else ["127.0.0.1"]


class Rig:
    def __init__(self, tmp: Path) -> None:
        raw = {
            "listen": {"port": 18080}, "tls": {"ca_dir": str(tmp / "ca")},
            "policy": {"dir": str(REPO / "tests" / "policies" / "hooks"), "reload": {"enabled": False}},
            "trust": [{"name": "loopback", "type": "source_ip",
                       "workloads": [{"cidr": "127.0.0.0/8", "id": "spiffe://test/app"}]}],
            # "signed" needs the whole body before it runs (SigV4), so it runs in the request hook.
            "credentials": {"signed": {"type": "aws_sigv4", "endpoints": [{"host": "s3.example", "service": "s3"}]}},
            "audit": {"path": str(tmp / "audit.log")},
            "egress": {"allow_cleartext": [{"host": "api.example"}, {"host": "boom.example"}]},
        }
        config = parse_config(raw, tmp / "keyless.yaml")
        prep = prepare(config)
        self.audit_path = tmp / "audit.log"
        credentials = {**prep.credentials, "broken": ExplodingCredential(), "signed": ExplodingCredential()}
        egress = Egress(config.egress, [("127.0.0.1", 18080)], resolve=resolver)
        self.pipeline = Pipeline(config, prep.engine, prep.signer, JsonLinesSink(str(self.audit_path)),
                                 [*prep.trust, ExplodingTrust()], credentials, egress)  # type: ignore[list-item]
        self.addon = KeylessAddon(self.pipeline)

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def run(self, hook: Callable[[Any], Awaitable[None]], flow: Any) -> None:
        asyncio.run(hook(flow))


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def plain_flow() -> http.HTTPFlow:
    """A flow on a cleartext client connection (tflow's default client speaks TLS with SNI)."""
    f = tflow.tflow()
    f.client_conn.timestamp_tls_setup = None
    f.client_conn.sni = None
    return f


def flow(path: str = "/open/x", method: str = "GET", host: str = "api.example", **headers: str) -> http.HTTPFlow:
    f = plain_flow()
    f.request = http.Request.make(method, f"http://{host}:8000{path}", b"{}", {"Host": f"{host}:8000", **headers})
    return f


def assert_refused(rig: Rig, f: http.HTTPFlow, status: int, code: str) -> dict[str, Any]:
    assert f.response is not None, "no refusal: mitmproxy would forward the request"
    assert f.response.status_code == status
    body = json.loads(f.response.content or b"")
    assert body["error"] == code
    assert f.response.headers[DECISION_HEADER] == body["decision_id"]
    records = rig.records()
    assert len(records) == 1, records
    assert records[0]["decision_id"] == body["decision_id"]
    assert records[0]["outcome"]["error"] == code
    assert records[0]["outcome"]["status"] == status
    return records[0]


def test_every_flow_hook_runs_inside_the_guard() -> None:
    for name in HOOKS:
        assert hasattr(getattr(KeylessAddon, name), "__wrapped__"), f"{name} is not guarded"


def test_allowed_request_is_forwarded_with_one_record(rig: Rig) -> None:
    f = flow()
    rig.run(rig.addon.requestheaders, f)
    rig.run(rig.addon.request, f)
    assert f.response is None and f.request.stream is True
    f.response = tutils.tresp()
    rig.run(rig.addon.responseheaders, f)
    rig.run(rig.addon.response, f)
    assert f.response.headers[DECISION_HEADER]
    [record] = rig.records()
    assert record["outcome"] == {"status": 200, "error": None, "message": None}
    assert record["request"]["host"] == "api.example"


def test_fault_in_http_connect_refuses_the_tunnel(rig: Rig) -> None:
    f = plain_flow()
    f.request = http.Request.make("CONNECT", "http://api.example:443", b"", {"Proxy-Authorization": "Bearer x"})
    f.request.authority, f.request.path = "api.example:443", ""
    rig.run(rig.addon.http_connect, f)
    record = assert_refused(rig, f, 500, "internal_error")
    assert record["request"]["method"] == "CONNECT"


def test_fault_in_requestheaders_attestation(rig: Rig) -> None:
    f = flow(**{"Proxy-Authorization": "Bearer x"})
    rig.run(rig.addon.requestheaders, f)
    assert_refused(rig, f, 500, "internal_error")
    # The later hooks of the same flow add nothing and forward nothing.
    rig.run(rig.addon.request, f)
    rig.run(rig.addon.response, f)
    assert len(rig.records()) == 1


def test_fault_in_credential_apply_during_requestheaders(rig: Rig) -> None:
    f = flow("/cred/broken/x")
    rig.run(rig.addon.requestheaders, f)
    assert_refused(rig, f, 500, "internal_error")


def test_fault_in_request_hook(rig: Rig) -> None:
    f = flow("/cred/signed/x", "POST")
    rig.run(rig.addon.requestheaders, f)
    assert f.response is None and not f.request.stream, "a body-signing credential must wait for the body"
    rig.run(rig.addon.request, f)
    assert_refused(rig, f, 500, "internal_error")


def test_request_hook_without_a_decision_refuses(rig: Rig) -> None:
    f = flow()
    rig.run(rig.addon.request, f)
    assert_refused(rig, f, 500, "internal_error")


def test_denied_request_is_refused_once(rig: Rig) -> None:
    f = flow("/deny/x")
    rig.run(rig.addon.requestheaders, f)
    rig.run(rig.addon.request, f)
    rig.run(rig.addon.response, f)
    assert_refused(rig, f, 403, "forbidden")


def test_fault_in_the_resolver_refuses_before_injecting(rig: Rig) -> None:
    f = flow("/cred/broken/x", host="boom.example")
    rig.run(rig.addon.requestheaders, f)
    assert_refused(rig, f, 500, "internal_error")
    assert "authorization" not in f.request.headers


def test_a_refused_address_is_refused_before_injecting(rig: Rig) -> None:
    f = flow("/cred/broken/x", host="meta.example")
    rig.run(rig.addon.requestheaders, f)
    assert_refused(rig, f, 403, "forbidden")
    assert "authorization" not in f.request.headers


def test_server_connect_dials_only_the_pin(rig: Rig) -> None:
    f = flow()
    rig.run(rig.addon.requestheaders, f)
    server = f.server_conn
    server.address, server.tls = ("api.example", 8000), False
    data = server_hooks.ServerConnectionHookData(server=server, client=f.client_conn)
    asyncio.run(rig.addon.server_connect(data))
    assert data.server.error is None and data.server.address[0].endswith(".invalid")
    # The dial never happens here: the failed-connect hook gives the name back and the dial
    # name is forgotten (the table is per process).
    rig.addon.server_connect_error(data)
    assert data.server.address == ("api.example", 8000)


def test_upstream_not_asked_for_is_not_dialled(rig: Rig) -> None:
    f = flow()
    server = f.server_conn
    server.address = ("other.example", 443)
    data = server_hooks.ServerConnectionHookData(server=server, client=f.client_conn)
    asyncio.run(rig.addon.server_connect(data))
    assert data.server.error and "no allowed request" in data.server.error


@pytest.mark.parametrize("name", HOOKS)
def test_the_guard_refuses_whatever_a_hook_raises(rig: Rig, name: str) -> None:
    async def broken(self: KeylessAddon, f: Any) -> None:
        raise RuntimeError("bug")

    hook = guarded(name)(broken)
    f: Any = tflow.ttcpflow() if name == "tcp_start" else flow()
    asyncio.run(hook(rig.addon, f))
    records = rig.records()
    assert len(records) == 1 and records[0]["outcome"]["error"] == "internal_error"
    if name == "tcp_start":
        assert f.error is not None and f.error.msg == "Connection killed."
    else:
        assert f.response is not None and f.response.status_code == 500


def test_the_guard_cuts_a_streamed_response_it_cannot_replace(rig: Rig) -> None:
    async def broken(self: KeylessAddon, f: Any) -> None:
        raise RuntimeError("bug")

    f = flow()
    f.response = tutils.tresp()
    f.response.stream = True
    asyncio.run(guarded("response")(broken)(rig.addon, f))
    assert f.error is not None and f.error.msg == "Connection killed."
    [record] = rig.records()
    assert record["outcome"]["error"] == "internal_error" and record["outcome"]["status"] is None


def test_keyless_errors_keep_their_code(rig: Rig) -> None:
    async def refusing(self: KeylessAddon, f: Any) -> None:
        raise KeylessError("misdirected_request", "nope")

    f = flow()
    asyncio.run(guarded("requestheaders")(refusing)(rig.addon, f))
    assert_refused(rig, f, 421, "misdirected_request")
