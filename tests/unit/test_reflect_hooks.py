"""The response hooks in process: mitmproxy's real flows (``mitmproxy.test.tflow``), the real
pipeline with the real embedded engine, a real static credential and a real audit file.

What the end-to-end tests (tests/test_reflection.py) cannot reach directly: the refusal streamed
in place of an oversize body, and a streamed body that fails after its head went out.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from proxy.addon import DECISION_HEADER, KeylessAddon
from proxy.audit import JsonLinesSink
from proxy.config import parse_config
from proxy.egress import Egress
from proxy.pipeline import Pipeline
from proxy.server import prepare
from tests.harness import REPO

SECRET = "canary-hook-secret-0123456789"


async def loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


class Rig:
    def __init__(self, tmp: Path, listen: dict[str, Any] | None = None, trace: str = "refuse") -> None:
        (tmp / "key").write_text(SECRET)
        raw = {
            "listen": {"port": 18080, **(listen or {})}, "tls": {"ca_dir": str(tmp / "ca")},
            "policy": {"dir": str(REPO / "tests" / "policies" / "hooks"), "reload": {"enabled": False}},
            "trust": [{"name": "loopback", "type": "source_ip",
                       "workloads": [{"cidr": "127.0.0.0/8", "id": "spiffe://test/app"}]}],
            "credentials": {"key": {"type": "static", "from": "file", "file": str(tmp / "key")}},
            "audit": {"path": str(tmp / "audit.log")},
            "egress": {"allow_cleartext": [{"host": "api.example"}], "trace": trace},
        }
        config = parse_config(raw, tmp / "keyless.yaml")
        prep = prepare(config)
        self.audit_path = tmp / "audit.log"
        # Nothing is dialled here; the destination check still resolves the name.
        egress = Egress(config.egress, [("127.0.0.1", 18080)], resolve=loopback)
        self.addon = KeylessAddon(Pipeline(config, prep.engine, prep.signer, JsonLinesSink(str(self.audit_path)),
                                           prep.trust, prep.credentials, egress))

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def forward(self, path: str = "/cred/key/x", method: str = "GET") -> http.HTTPFlow:
        f = tflow.tflow()
        f.client_conn.timestamp_tls_setup = None
        f.client_conn.sni = None
        f.request = http.Request.make(method, f"http://api.example:8000{path}", b"", {"Host": "api.example:8000"})
        asyncio.run(self.addon.requestheaders(f))
        asyncio.run(self.addon.request(f))
        return f

    def respond(self, f: http.HTTPFlow, body: bytes, **headers: str) -> None:
        f.response = http.Response.make(200)
        # Set after make(): make() would rewrite Content-Length for its empty body.
        f.response.headers.clear()
        f.response.headers.update(headers)
        asyncio.run(self.addon.responseheaders(f))
        if callable(f.response.stream):
            # What mitmproxy does with a streamed body: every chunk through the callable, then b"".
            out = b"".join(b"".join(f.response.stream(body[i:i + 1000])) for i in range(0, len(body), 1000))
            f.response.data.content = out + b"".join(f.response.stream(b""))
        else:
            f.response.data.content = body
        asyncio.run(self.addon.response(f))


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path, {"max_response_body": "10k"})


def test_buffered_echo_is_redacted_with_one_record(rig: Rig) -> None:
    f = rig.forward()
    assert f.request.headers["authorization"] == f"Bearer {SECRET}"
    body = json.dumps({"headers": {"Authorization": f"Bearer {SECRET}"}}).encode()
    rig.respond(f, body, **{"Content-Type": "application/json", "Content-Length": str(len(body)),
                            "X-Echo": SECRET})
    assert f.response is not None and SECRET.encode() not in f.response.content
    assert f.response.headers["x-echo"] == "[keyless:redacted]"
    assert f.response.headers["content-length"] == str(len(f.response.raw_content or b""))
    [record] = rig.records()
    assert record["reflected"] == {"headers": ["x-echo"], "body": True, "body_scan": "full"}
    assert record["outcome"]["status"] == 200 and SECRET not in json.dumps(record)


def test_oversize_response_becomes_a_streamed_refusal(rig: Rig) -> None:
    f = rig.forward()
    f.response = http.Response.make(200)
    f.response.headers["Content-Type"] = "application/octet-stream"
    f.response.headers["Content-Length"] = "20000"
    asyncio.run(rig.addon.responseheaders(f))
    # The refusal replaced the upstream head; the upstream body is never kept.
    assert f.response.status_code == 502 and callable(f.response.stream)
    first = b"".join(f.response.stream(b"x" * 8000))
    assert json.loads(first)["error"] == "response_too_large"
    assert b"".join(f.response.stream(b"x" * 12000)) == b"" and b"".join(f.response.stream(b"")) == b""
    asyncio.run(rig.addon.response(f))
    assert f.response.headers[DECISION_HEADER] == json.loads(first)["decision_id"]
    [record] = rig.records()
    assert record["outcome"]["error"] == "response_too_large" and record["outcome"]["status"] == 502


def test_stream_that_overflows_is_cut_with_one_record(rig: Rig) -> None:
    f = rig.forward()
    rig.respond(f, b"line\n" * 5000, **{"Content-Type": "text/plain", "Transfer-Encoding": "chunked"})
    assert f.error is not None and f.error.msg == "Connection killed."
    [record] = rig.records()
    assert record["outcome"]["error"] == "response_too_large" and record["outcome"]["status"] is None


def test_streamed_text_is_redacted_and_framed(rig: Rig) -> None:
    f = rig.forward()
    body = b"x" * 3000 + f"Bearer {SECRET}".encode() + b"y" * 3000
    rig.respond(f, body, **{"Content-Type": "text/plain", "Transfer-Encoding": "chunked"})
    assert f.error is None and f.response is not None
    assert f.response.content == b"x" * 3000 + b"[keyless:redacted]" + b"y" * 3000
    assert f.response.headers["transfer-encoding"] == "chunked"
    [record] = rig.records()
    assert record["reflected"] == {"headers": [], "body": True, "body_scan": "stream"}


def test_trace_is_refused_before_the_policy(rig: Rig) -> None:
    f = rig.forward("/cred/key/x", "TRACE")
    assert f.response is not None and f.response.status_code == 403
    assert "authorization" not in f.request.headers
    [record] = rig.records()
    assert record["outcome"]["error"] == "forbidden" and record["decision"] is None


def test_trace_forward_bare_injects_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path, trace="forward_bare")
    f = rig.forward("/cred/key/x", "TRACE")
    assert f.response is None and "authorization" not in f.request.headers
    rig.respond(f, b"TRACE / HTTP/1.1\r\n\r\n", **{"Content-Type": "message/http"})
    [record] = rig.records()
    assert record["decision"]["credential"] == "key" and record["credential"] is None
    assert record["reflected"] is None


def test_config_keys_are_validated_with_their_path(tmp_path: Path) -> None:
    from proxy.errors import ConfigError

    raw = {"policy": {"dir": str(REPO / "policies")}, "tls": {"ca_dir": str(tmp_path / "ca")},
           "listen": {"redact_max_body": "lots", "max_response_body": "0"}, "egress": {"trace": "allow"}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "keyless.yaml")
    text = "\n".join(e.value.problems)
    assert "listen.redact_max_body: must be a size such as 512k, 64m or 1g" in text
    assert "listen.max_response_body: must be a size" in text
    assert "egress.trace:" in text and "refuse, forward_bare" in text
    ok = parse_config({**raw, "listen": {"max_response_body": "2g"}, "egress": {}}, tmp_path / "keyless.yaml")
    assert ok.listen.redact_max_body == "4m" and ok.listen.max_response_body == "2g" and ok.egress.trace == "refuse"


def test_the_guard_streams_its_refusal_in_responseheaders(rig: Rig) -> None:
    from proxy.addon import guarded

    async def broken(self: KeylessAddon, f: Any) -> None:
        raise RuntimeError("bug")

    f = rig.forward()
    f.response = http.Response.make(200)
    f.response.timestamp_end = None  # as mitmproxy leaves it until the body is read
    f.response.headers["Content-Length"] = "5000"
    asyncio.run(guarded("responseheaders")(broken)(rig.addon, f))
    # Not a plain refusal (mitmproxy would fill it with the upstream body): a streamed one.
    assert f.response.status_code == 500 and callable(f.response.stream)
    assert json.loads(b"".join(f.response.stream(b"upstream body")))["error"] == "internal_error"
    assert b"".join(f.response.stream(b"more")) == b""
    asyncio.run(rig.addon.response(f))
    [record] = rig.records()
    assert record["outcome"]["error"] == "internal_error" and record["outcome"]["status"] == 500
