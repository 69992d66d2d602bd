"""What the request path does for a request to a configured MCP server (``proxy.pipeline``).

    head      the request head is in: a POST waits for its body (buffered up to mcp.max_body);
              GET and DELETE are decided on the head with a transport-only ``input.mcp``; the
              user's token (mcp.user_token.header) is verified into ``input.user``
    body      the body is in: one well-formed message becomes ``input.mcp``
    listing   a tools/list result is filtered per tool and its tools pinned (proxy.agents.tools)
    refusal   a refused message is answered as a JSON-RPC error with its id
    audit     the record's ``mcp``: server, method, tool, the arguments' fingerprint, the user
              and the agent
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.agents.mcp import (
    INVALID_REQUEST,
    McpError,
    McpMessage,
    arguments_fingerprint,
    header,
    jsonrpc_refusal,
    parse_message,
    transport_input,
)
from proxy.agents.options import McpConfig, McpServer
from proxy.agents.tools import Allow, Listing, ToolPins, filter_tools_list
from proxy.errors import KeylessError
from proxy.model import Attestation, Identity
from proxy.trust import Caller


@dataclass(slots=True)
class McpCall:
    """One request to an MCP server, as far as it is known."""

    server: McpServer
    http_method: str
    headers: tuple[tuple[str, str], ...] = ()
    # The decision waits for the body (a POST).
    pending: bool = False
    message: McpMessage | None = None
    tool_changed: bool = False
    user: Attestation | None = None
    listing: Listing | None = None

    @property
    def user_token(self) -> str | None:
        return self.user.evidence if self.user is not None else None

    @property
    def lists_tools(self) -> bool:
        return self.message is not None and self.message.method == "tools/list" and self.message.kind == "request"


@dataclass(slots=True)
class McpGate:
    config: McpConfig
    pins: ToolPins = field(default_factory=ToolPins)
    user_verifier: Any = None

    def __post_init__(self) -> None:
        if self.config.user_token is not None:
            from proxy.trust.jwt import JwtProvider

            self.user_verifier = JwtProvider("mcp.user_token", self.config.user_token.jwt)

    @property
    def user_header(self) -> str | None:
        return self.config.user_token.header if self.config.user_token is not None else None

    def open(self, host: str, port: int, method: str, path: str,
             headers: Sequence[tuple[str, str]]) -> McpCall | None:
        """The MCP request this is (None: not to a configured server). A POST's decision waits
        for its body."""
        server = self.config.server_for(host, port, path) if self.config.servers else None
        if server is None:
            return None
        method = method.upper()
        return McpCall(server, method, tuple(headers), pending=method == "POST")

    async def head(self, call: McpCall | None, doc: dict[str, Any], headers: Sequence[tuple[str, str]]) -> None:
        """Fill ``doc`` with what the head says: the verified user, a transport's ``input.mcp``."""
        user = await self._user(headers)
        if user is not None:
            doc["user"] = user.as_input()
        if call is None:
            return
        call.user = user
        if call.pending:
            self.check_declared(call)
        else:
            doc["mcp"] = transport_input(call.server.name, call.http_method, headers)

    def check_declared(self, call: McpCall) -> None:
        """Refuse a POST whose Content-Length is over mcp.max_body before its body is read."""
        declared = header(call.headers, "content-length")
        if declared and declared[0].strip().isdigit() and int(declared[0]) > self.config.max_body:
            raise self._too_large()

    def body(self, call: McpCall, body: bytes | None, doc: dict[str, Any]) -> None:
        """The buffered body of a POST: parse it into ``doc["mcp"]``; raises McpError."""
        call.pending = False
        if body is not None and len(body) > self.config.max_body:
            raise self._too_large()
        encodings = [v.strip().lower() for v in header(call.headers, "content-encoding")]
        if any(e not in ("", "identity") for e in encodings):
            # What the policy reads must be what the server parses: no second decoder.
            raise McpError("bad_request", "a compressed JSON-RPC body is refused", INVALID_REQUEST)
        message = parse_message(body or b"", call.headers)
        call.message = message
        call.tool_changed = self.pins.changed(call.server.key, message.tool)
        doc["mcp"] = message.as_input(call.server.name, call.tool_changed)

    def _too_large(self) -> McpError:
        return McpError("body_too_large", f"JSON-RPC body exceeds mcp.max_body ({self.config.max_body} bytes)",
                        INVALID_REQUEST)

    async def _user(self, headers: Sequence[tuple[str, str]]) -> Attestation | None:
        name = self.user_header
        if name is None:
            return None
        values = header(headers, name)
        if not values:
            return None
        if len(values) > 1:
            raise KeylessError("attestation_failed", f"{name} is sent more than once", "mcp.user_token")
        token = values[0].strip()
        token = token[7:].strip() if token[:7].lower() == "bearer " else token
        # A user token that does not verify is refused, never ignored: the agent claimed a user.
        user: Attestation | None = await self.user_verifier.attest(
            Caller(address="", port=0, proxy_authorization=f"Bearer {token}"))
        if user is None:
            raise KeylessError("attestation_failed", "no mcp.user_token issuer accepts the user's token",
                               "mcp.user_token")
        return user

    def listing_input(self, doc: dict[str, Any], call: McpCall, tool: str, changed: bool) -> dict[str, Any]:
        """The input a tools/call of ``tool`` would be decided on, as the listing asks it."""
        m = call.message
        mcp: dict[str, Any] = {
               "server": call.server.name, "kind": "request", "method": "tools/call", "id": m.id if m else None,
               "protocol_version": m.protocol_version if m else None, "session_id": m.session_id if m else None,
               "tool": tool, "arguments": {}, "tool_changed": changed, "listing": True}
        return {**doc, "mcp": mcp}

    async def listing(self, call: McpCall, body: bytes, content_type: str | None, allow: Allow) -> bytes | None:
        """The filtered tools/list response body (None: unchanged)."""
        if len(body) > self.config.max_list_body:
            raise KeylessError("response_too_large", "tools/list response exceeds mcp.max_list_body", "mcp")
        out, call.listing = await filter_tools_list(body, content_type, call.server.key, self.pins, allow)
        return out

    @staticmethod
    def refusal(call: McpCall | None, error: KeylessError, decision_id: str) -> tuple[int, bytes] | None:
        """A JSON-RPC error answering a refused POST (None: answer with the plain refusal)."""
        if call is None or call.http_method != "POST":
            return None
        if isinstance(error, McpError):
            return jsonrpc_refusal(error, decision_id, error.rpc_id)
        m = call.message
        if m is None:
            # Refused on its head (the user's token): id null, which an SDK pairs with the
            # request it sent when the status is an error.
            return jsonrpc_refusal(error, decision_id, None)
        if m.kind != "request":
            return None  # nothing to answer (a notification, a response): the plain refusal
        return jsonrpc_refusal(error, decision_id, m.id)

    @staticmethod
    def audit(call: McpCall | None, identity: Identity) -> dict[str, Any] | None:
        if call is None:
            return None
        m = call.message
        out: dict[str, Any] = {"server": call.server.name, "method": m.method if m else None,
                               "id": m.id if m else None, "session_id": m.session_id if m else None,
                               "agent": identity.id, "user": call.user.id if call.user is not None else None}
        if m is not None and m.method == "tools/call":
            out["tool"] = m.tool
            out["arguments_fingerprint"] = arguments_fingerprint(m.arguments or {})
            out["tool_changed"] = call.tool_changed
        if call.listing is not None:
            out["tools"] = call.listing.as_audit()
        return out
