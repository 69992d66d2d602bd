"""One MCP message (JSON-RPC 2.0 over Streamable HTTP) -> the policy's ``input.mcp``.

Only well-formed MCP is accepted, because the policy decides on what it is shown and the server
acts on what it parses: a message the two could read differently must never pass. So:

* the body is one JSON object (a JSON array, a batch, is refused: the 2025-06-18 revision
  removed batching, and one decision per message is the only sound reading);
* ``jsonrpc`` is ``"2.0"``; ``method`` a string; ``id`` a string or an integer (never null,
  never a float or boolean); ``params`` an object when present;
* duplicate keys anywhere are refused (Python's json keeps the last, other parsers the first),
  and in the envelope and ``params`` also keys that differ only in case (a case-insensitive
  server binding ``Name`` would call another tool than the one decided on);
* a notification is a ``notifications/*`` method: a ``tools/call`` without an id would
  otherwise pass as a notification that a lenient server still runs;
* the ``Mcp-Method`` and ``Mcp-Name`` headers, where sent, equal the body's method and the
  named parameter (``name`` for tools/call and prompts/get, ``uri`` for resources/read), and
  ``MCP-Protocol-Version`` equals a version the body names.

A refusal is an ``McpError``: a KeylessError that also knows its JSON-RPC code and the
request id, so the agent's SDK gets a JSON-RPC error it can read (``jsonrpc_refusal``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import KeylessError
from proxy.model import fingerprint

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
HEADER_MISMATCH = -32020  # MCP 2026-07-28's code for headers that disagree with the body
# Keyless's own, in the implementation-defined band -32000..-32019 (the SDKs use -32000/-32001).
POLICY_DENIED = -32003
KEYLESS_ERROR = -32004

NAME_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
PROTOCOL_META = "io.modelcontextprotocol/protocolVersion"
_B64 = re.compile(r"=\?base64\?(?P<payload>.*)\?=")


class McpError(KeylessError):
    """A refusal of an MCP message, with the JSON-RPC code and the id it answers (None: the
    message's id could not be read)."""

    def __init__(self, code: str, message: str, rpc_code: int, rpc_id: str | int | None = None) -> None:
        super().__init__(code, message, "mcp")
        self.rpc_code = rpc_code
        self.rpc_id = rpc_id


@dataclass(frozen=True, slots=True)
class McpMessage:
    """One parsed client-to-server message."""

    kind: str  # request | notification | response
    method: str | None
    id: str | int | None
    params: dict[str, Any] = field(default_factory=dict)
    protocol_version: str | None = None
    session_id: str | None = None

    @property
    def tool(self) -> str | None:
        name = self.params.get("name") if self.method == "tools/call" else None
        return name if isinstance(name, str) else None

    @property
    def arguments(self) -> dict[str, Any] | None:
        args = self.params.get("arguments") if self.method == "tools/call" else None
        return args if isinstance(args, dict) else None

    def as_input(self, server: str, tool_changed: bool | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "server": server, "kind": self.kind, "method": self.method, "id": self.id,
            "protocol_version": self.protocol_version, "session_id": self.session_id,
        }
        if self.method == "tools/call":
            doc["tool"] = self.tool
            doc["arguments"] = self.arguments if self.arguments is not None else {}
            doc["tool_changed"] = bool(tool_changed)
        elif self.method in NAME_PARAMS:
            doc["name"] = self.params.get(NAME_PARAMS[self.method])
        return doc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for k, v in pairs:
        if k in doc:
            raise ValueError(f"duplicate key {k[:40]!r}")
        doc[k] = v
    return doc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(body: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity. Raises ValueError."""
    return json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def header(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def decode_header_value(value: str) -> str | None:
    """``Mcp-Name`` carries non-ASCII values as ``=?base64?...?=`` (the SDKs' encoding)."""
    m = _B64.fullmatch(value)
    if m is None:
        return value
    try:
        raw = base64.b64decode(m.group("payload"), validate=True)
        return raw.decode("utf-8") if base64.b64encode(raw).decode() == m.group("payload") else None
    except (binascii.Error, UnicodeDecodeError):
        return None


def _one(headers: Sequence[tuple[str, str]], name: str, rpc_id: str | int | None) -> str | None:
    values = header(headers, name)
    if len(values) > 1:
        raise McpError("bad_request", f"{name} is sent more than once", HEADER_MISMATCH, rpc_id)
    return values[0] if values else None


def parse_message(body: bytes, headers: Sequence[tuple[str, str]]) -> McpMessage:
    """Parse and check one POSTed MCP message (see the module docstring); raises McpError."""
    try:
        doc = loads(body)
    except (ValueError, RecursionError) as e:
        reason = str(e) if isinstance(e, ValueError) and "duplicate" in str(e) else "the body is not valid JSON"
        raise McpError("bad_request", f"malformed JSON-RPC: {reason}", PARSE_ERROR) from None
    if isinstance(doc, list):
        raise McpError("bad_request", "JSON-RPC batches are refused: send one message per request",
                       INVALID_REQUEST)
    if not isinstance(doc, dict):
        raise McpError("bad_request", "malformed JSON-RPC: the body is not an object", INVALID_REQUEST)
    rpc_id = doc.get("id")
    good_id = isinstance(rpc_id, str) or (isinstance(rpc_id, int) and not isinstance(rpc_id, bool))
    answer_id = rpc_id if good_id else None
    if doc.get("jsonrpc") != "2.0":
        raise McpError("bad_request", 'malformed JSON-RPC: "jsonrpc" must be "2.0"', INVALID_REQUEST, answer_id)
    if "id" in doc and not good_id:
        raise McpError("bad_request", "malformed JSON-RPC: id must be a string or an integer", INVALID_REQUEST)
    method = doc.get("method")
    if "method" in doc:
        if not isinstance(method, str) or not method:
            raise McpError("bad_request", "malformed JSON-RPC: method must be a non-empty string",
                           INVALID_REQUEST, answer_id)
        kind = "request" if "id" in doc else "notification"
        if kind == "notification" and not method.startswith("notifications/"):
            raise McpError("bad_request", f"malformed JSON-RPC: {method[:60]!r} without an id is not a notification",
                           INVALID_REQUEST)
        if "result" in doc or "error" in doc:
            raise McpError("bad_request", "malformed JSON-RPC: a request has no result or error",
                           INVALID_REQUEST, answer_id)
    elif good_id and (("result" in doc) != ("error" in doc)):
        kind = "response"  # the client answering a server request (sampling, elicitation)
    else:
        raise McpError("bad_request", "malformed JSON-RPC: neither a request nor a response", INVALID_REQUEST,
                       answer_id)
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise McpError("bad_request", "malformed JSON-RPC: params must be an object", INVALID_REQUEST, answer_id)
    for obj in (doc, params):
        if len({k.casefold() for k in obj}) != len(obj):
            raise McpError("bad_request", "malformed JSON-RPC: keys that differ only in case", INVALID_REQUEST,
                           answer_id)
    if method == "tools/call":
        if not isinstance(params.get("name"), str):
            raise McpError("bad_request", "malformed tools/call: params.name must be a string", INVALID_REQUEST,
                           answer_id)
        if "arguments" in params and not isinstance(params["arguments"], dict):
            raise McpError("bad_request", "malformed tools/call: params.arguments must be an object",
                           INVALID_REQUEST, answer_id)
    # The routing headers, where sent, must say what the body says: a gateway that routes on
    # the header and a policy that reads the body must never see two different calls.
    sent_method = _one(headers, "mcp-method", answer_id)
    if sent_method is not None and sent_method != method:
        raise McpError("bad_request", f"Mcp-Method header {sent_method[:60]!r} does not match the body's method",
                       HEADER_MISMATCH, answer_id)
    sent_name = _one(headers, "mcp-name", answer_id)
    if sent_name is not None:
        key = NAME_PARAMS.get(method or "")
        if key is None or decode_header_value(sent_name) != params.get(key):
            raise McpError("bad_request", f"Mcp-Name header does not match the body's {key or 'name'} parameter",
                           HEADER_MISMATCH, answer_id)
    version = _one(headers, "mcp-protocol-version", answer_id)
    meta = params.get("_meta")
    body_version = meta.get(PROTOCOL_META) if isinstance(meta, dict) else None
    if body_version is None and method == "initialize":
        body_version = params.get("protocolVersion")
    if version is not None and body_version is not None and version != body_version:
        raise McpError("bad_request", "MCP-Protocol-Version header does not match the body's protocol version",
                       HEADER_MISMATCH, answer_id)
    version = version if version is not None else body_version if isinstance(body_version, str) else None
    return McpMessage(kind, method if isinstance(method, str) else None, answer_id, params, version,
                      _one(headers, "mcp-session-id", answer_id))


def transport_input(server: str, http_method: str, headers: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``input.mcp`` for a request without a message: GET (the server's event stream), DELETE
    (the end of a session)."""
    versions, sessions = header(headers, "mcp-protocol-version"), header(headers, "mcp-session-id")
    return {"server": server, "kind": "transport", "method": None, "id": None,
            "protocol_version": versions[0] if versions else None,
            "session_id": sessions[0] if sessions else None, "http_method": http_method}


def arguments_fingerprint(arguments: dict[str, Any] | None) -> str | None:
    """A keyed fingerprint of the canonical arguments, for the audit record: arguments can
    carry personal data or secrets, so the record correlates calls without holding them."""
    if arguments is None:
        return None
    return fingerprint(json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def jsonrpc_refusal(error: KeylessError, decision_id: str, rpc_id: str | int | None) -> tuple[int, bytes]:
    """The status and body that answer a refused MCP message: a JSON-RPC error with the same id.

    A policy denial is HTTP 200: the JSON-RPC error is the whole answer and every SDK reads a
    200 body (some only raise on a 4xx). A message that is not well-formed MCP keeps its 4xx,
    as the Streamable HTTP transport asks; the Python SDK surfaces the JSON-RPC error either way.
    """
    rpc_code = error.rpc_code if isinstance(error, McpError) else (
        POLICY_DENIED if error.code == "forbidden" else KEYLESS_ERROR)
    # With no id to answer (the message was not read) only an error status lets a client pair
    # the answer with its request.
    status = 200 if error.code == "forbidden" and rpc_id is not None else error.status
    body = {"jsonrpc": "2.0", "id": rpc_id, "error": {
        "code": rpc_code, "message": f"keyless: {error.code}: {error.message}",
        "data": {"error": error.code, "message": error.message, "decision_id": decision_id}}}
    return status, json.dumps(body, separators=(",", ":")).encode()


# --- tools/list ---------------------------------------------------------------------------------


def tool_hash(tool: dict[str, Any]) -> str:
    """What a tool tells the model: its description, title, annotations and schemas, hashed.
    The name is the key it is recorded under."""
    shown = {k: tool.get(k) for k in ("description", "title", "inputSchema", "outputSchema", "annotations")}
    return "sha256:" + hashlib.sha256(json.dumps(shown, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def listed_tools(message: Any) -> list[dict[str, Any]] | None:
    """The tools of a tools/list result message; None when it is not one."""
    if not isinstance(message, dict) or not isinstance(message.get("result"), dict):
        return None
    tools = message["result"].get("tools")
    if not isinstance(tools, list):
        return None
    return [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]


def filter_message(message: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """The tools/list result with only the ``allowed`` tools (and nothing malformed)."""
    result = dict(message["result"])
    result["tools"] = [t for t in result["tools"] if isinstance(t, dict) and t.get("name") in allowed]
    return {**message, "result": result}


def is_sse(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "text/event-stream"


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event as written: its lines, and the joined ``data`` when it has any."""

    lines: tuple[str, ...]
    data: str | None


def sse_events(text: str) -> list[SseEvent]:
    """Split an event stream into events (WHATWG: blank lines end an event; CR, LF or CRLF)."""
    events: list[SseEvent] = []
    current: list[str] = []
    for line in re.split(r"\r\n|\r|\n", text):
        if line == "":
            if current:
                events.append(_event(current))
                current = []
            continue
        current.append(line)
    if current:
        events.append(_event(current))
    return events


def _event(lines: list[str]) -> SseEvent:
    data = [ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:") or ln == "data"]
    return SseEvent(tuple(lines), "\n".join(data) if data else None)


def sse_write(events: Iterable[SseEvent]) -> bytes:
    return "".join("\n".join(e.lines) + "\n\n" for e in events).encode()


def sse_replace_data(event: SseEvent, data: str) -> SseEvent:
    kept = [ln for ln in event.lines if not (ln.startswith("data:") or ln == "data")]
    return SseEvent((*kept, *(f"data: {ln}" for ln in data.split("\n"))), data)
