"""proxy.agents: the MCP message parser, the tools/list filter and the pins, as plain functions."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from proxy.agents.mcp import McpError, jsonrpc_refusal, parse_message
from proxy.agents.tools import ToolPins, filter_tools_list
from proxy.errors import KeylessError


def body(**doc: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", **doc}).encode()


CALL = {"id": 5, "method": "tools/call", "params": {"name": "create_issue", "arguments": {"repo": "acme/app"}}}


def test_a_tools_call_becomes_input_mcp() -> None:
    m = parse_message(body(**CALL), [("Mcp-Session-Id", "s1"), ("MCP-Protocol-Version", "2025-11-25"),
                                     ("Mcp-Method", "tools/call"), ("Mcp-Name", "create_issue")])
    assert m.as_input("github", tool_changed=False) == {
        "server": "github", "kind": "request", "method": "tools/call", "id": 5, "protocol_version": "2025-11-25",
        "session_id": "s1", "tool": "create_issue", "arguments": {"repo": "acme/app"}, "tool_changed": False}


def test_the_protocol_version_of_initialize_and_of_the_envelope() -> None:
    init = parse_message(body(id=0, method="initialize", params={"protocolVersion": "2025-06-18"}), [])
    assert init.protocol_version == "2025-06-18"
    modern = parse_message(body(id=1, method="tools/list",
                                params={"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}), [])
    assert modern.protocol_version == "2026-07-28"
    with pytest.raises(McpError, match="MCP-Protocol-Version"):
        parse_message(body(id=0, method="initialize", params={"protocolVersion": "2025-06-18"}),
                      [("mcp-protocol-version", "2025-11-25")])


@pytest.mark.parametrize(("raw", "code", "text"), [
    (b"", -32700, "not valid JSON"),
    (b"\xff\xfe", -32700, "not valid JSON"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","id":2}', -32700, "duplicate key"),
    (b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}', -32700, "not valid JSON"),
    (b"[]", -32600, "batches"),
    (b'"ping"', -32600, "not an object"),
    (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', -32600, "jsonrpc"),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', -32600, "id must be"),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', -32600, "id must be"),
    (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', -32600, "id must be"),
    (b'{"jsonrpc":"2.0","id":1,"method":""}', -32600, "method"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[]}', -32600, "params must be an object"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Name":"b"}}', -32600, "case"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":3}}', -32600, "params.name"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":[1]}}', -32600, "arguments"),
    # A tools/call without an id is not a notification a policy allowing notifications lets through.
    (b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"delete_repo"}}', -32600, "not a notification"),
    (b'{"jsonrpc":"2.0","id":1}', -32600, "neither"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}', -32600, "no result"),
])
def test_malformed_messages_are_refused(raw: bytes, code: int, text: str) -> None:
    with pytest.raises(McpError) as e:
        parse_message(raw, [])
    assert e.value.rpc_code == code and text in e.value.message and e.value.code == "bad_request"


def test_routing_headers_must_agree_with_the_body() -> None:
    with pytest.raises(McpError, match="Mcp-Method") as e:
        parse_message(body(**CALL), [("Mcp-Method", "tools/list")])
    assert e.value.rpc_id == 5 and e.value.rpc_code == -32020
    with pytest.raises(McpError, match="Mcp-Name"):
        parse_message(body(**CALL), [("Mcp-Name", "delete_repo")])
    with pytest.raises(McpError, match="Mcp-Name"):
        parse_message(body(id=1, method="tools/list"), [("Mcp-Name", "create_issue")])
    with pytest.raises(McpError, match="more than once"):
        parse_message(body(**CALL), [("Mcp-Method", "tools/call"), ("mcp-method", "tools/call")])
    # Non-ASCII names travel base64-wrapped, as the SDKs send them.
    name = "créer"
    wrapped = "=?base64?" + base64.b64encode(name.encode()).decode() + "?="
    m = parse_message(body(id=1, method="tools/call", params={"name": name}), [("Mcp-Name", wrapped)])
    assert m.tool == name


def test_notifications_and_client_responses() -> None:
    n = parse_message(body(method="notifications/initialized"), [])
    assert (n.kind, n.id) == ("notification", None)
    r = parse_message(body(id="srv-1", result={"content": []}), [])
    assert (r.kind, r.method) == ("response", None)


def test_refusals_are_json_rpc_errors_with_the_id() -> None:
    status, raw = jsonrpc_refusal(KeylessError("forbidden", "no grant"), "d" * 32, 9)
    doc = json.loads(raw)
    assert status == 200 and doc["id"] == 9 and doc["error"]["code"] == -32003
    assert doc["error"]["data"] == {"error": "forbidden", "message": "no grant", "decision_id": "d" * 32}
    status, raw = jsonrpc_refusal(McpError("bad_request", "x", -32700), "d" * 32, None)
    assert status == 400 and json.loads(raw)["id"] is None
    status, _ = jsonrpc_refusal(KeylessError("credential_unavailable", "down"), "d" * 32, 1)
    assert status == 503


def tools(*names: str, description: str = "d") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 3, "result": {"tools": [
        {"name": n, "description": description, "inputSchema": {"type": "object"}} for n in names]}}


def run_filter(raw: bytes, ctype: str, pins: ToolPins, allowed: set[str]) -> tuple[bytes | None, Any]:
    async def allow(name: str, changed: bool) -> bool:
        return name in allowed and not changed
    return asyncio.run(filter_tools_list(raw, ctype, "srv", pins, allow))


def test_listing_json_and_sse_keep_only_allowed_tools() -> None:
    out, listing = run_filter(json.dumps(tools("a", "b", "c")).encode(), "application/json", ToolPins(), {"a"})
    assert out is not None and [t["name"] for t in json.loads(out)["result"]["tools"]] == ["a"]
    assert listing.as_audit() == {"listed": ["a", "b", "c"], "allowed": ["a"], "changed": []}
    stream = (b"event: message\r\ndata: " + json.dumps({"jsonrpc": "2.0", "method": "notifications/progress"}).encode()
              + b"\r\n\r\nid: 7\nevent: message\ndata: " + json.dumps(tools("a", "b")).encode() + b"\n\n")
    out, _ = run_filter(stream, "text/event-stream", ToolPins(), {"b"})
    assert out is not None
    text = out.decode()
    assert "notifications/progress" in text and "id: 7" in text
    result = json.loads(text.split("data: ")[-1])
    assert [t["name"] for t in result["result"]["tools"]] == ["b"]


def test_a_result_under_another_id_is_filtered_too() -> None:
    doc = tools("a", "b")
    doc["id"] = "not-the-request"
    out, _ = run_filter(json.dumps(doc).encode(), "application/json", ToolPins(), set())
    assert out is not None and json.loads(out)["result"]["tools"] == []


def test_unreadable_listings_are_refused() -> None:
    for raw, ctype in ((b"<html>", "application/json"), (b"data: {oops\n\n", "text/event-stream"),
                       (b"\xff", "application/json")):
        with pytest.raises(KeylessError) as e:
            run_filter(raw, ctype, ToolPins(), {"a"})
        assert e.value.code == "response_unscannable"


def test_pins_mark_a_changed_tool_until_restart() -> None:
    pins = ToolPins()
    run_filter(json.dumps(tools("a")).encode(), "application/json", pins, {"a"})
    assert not pins.changed("srv", "a")
    _, listing = run_filter(json.dumps(tools("a", description="evil")).encode(), "application/json", pins, {"a"})
    assert listing.changed == ["a"] and listing.allowed == [] and pins.changed("srv", "a")
    # Changing it back does not clear it: the server has shown it changes descriptions.
    run_filter(json.dumps(tools("a")).encode(), "application/json", pins, {"a"})
    assert pins.changed("srv", "a") and not pins.changed("other", "a")


def test_the_mcp_section_reports_every_problem_with_its_key_path(tmp_path: Any) -> None:
    from proxy.config import parse_config
    from proxy.errors import ConfigError

    raw = {"mcp": {"servers": [{"host": "mcp.example", "path": "mcp?x=1"}, {"port": 99999}, "nope"],
                   "max_body": "lots", "user_token": {"header": "bad header", "issuers": []}, "servers_": 1}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path / "keyless.yaml")
    problems = "\n".join(e.value.problems)
    for where in ("mcp.servers[0].path", "mcp.servers[1].host", "mcp.servers[1].port", "mcp.servers[2]",
                  "mcp.max_body", "mcp.user_token.header", "mcp.user_token.issuers", "mcp.servers_"):
        assert where in problems, (where, problems)
    ok = parse_config({"mcp": {"servers": [{"host": "MCP.Example.", "path": "/mcp/"}]}}, tmp_path / "k.yaml").mcp
    assert ok.servers[0].host == "mcp.example" and ok.servers[0].port == 443 and ok.servers[0].name == "mcp.example:443"
    assert ok.server_for("mcp.example", 443, "/mcp?session=1") is ok.servers[0]
    assert ok.server_for("mcp.example", 443, "/mcp/x") is None and ok.server_for("mcp.example", 8443, "/mcp") is None
