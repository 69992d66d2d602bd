"""tools/list: pin each server's tools, and hand on only the tools the policy would allow.

Pins are trust on first use, per server endpoint: the first hash Keyless sees for a tool's
description and schemas is its pin; a later tools/list showing another hash marks the tool
changed (``input.mcp.tool_changed``) until Keyless restarts, so a policy can quarantine a tool
whose description changed under the agent (the "rug pull"). A changed tool stays changed even
if the description changes back: the server has shown it can change it.

The listing is filtered by asking the policy, for each tool, the question a ``tools/call`` of it
would ask with ``input.mcp.listing: true`` and no arguments (they are not known yet).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.agents.mcp import (
    filter_message,
    is_sse,
    listed_tools,
    loads,
    sse_events,
    sse_replace_data,
    sse_write,
    tool_hash,
)
from proxy.errors import KeylessError


class ToolPins:
    """Per server key: tool name -> (pinned hash, changed since the pin)."""

    def __init__(self) -> None:
        self._pins: dict[str, dict[str, tuple[str, bool]]] = {}

    def record(self, server: str, tool: dict[str, Any]) -> bool:
        """Note the tool as listed now; whether it has changed since it was pinned."""
        pins = self._pins.setdefault(server, {})
        name, digest = tool["name"], tool_hash(tool)
        pinned = pins.get(name)
        if pinned is None:
            pins[name] = (digest, False)
            return False
        changed = pinned[1] or pinned[0] != digest
        pins[name] = (pinned[0], changed)
        return changed

    def changed(self, server: str, tool: str | None) -> bool:
        pinned = self._pins.get(server, {}).get(tool or "")
        return pinned is not None and pinned[1]

    def hashes(self, server: str) -> dict[str, str]:
        return {name: digest for name, (digest, _) in self._pins.get(server, {}).items()}


# (tool name, changed) -> would a tools/call of it be allowed
Allow = Callable[[str, bool], Awaitable[bool]]


@dataclass(slots=True)
class Listing:
    """What filtering one tools/list response did, for the audit record."""

    listed: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def as_audit(self) -> dict[str, Any]:
        return {"listed": self.listed, "allowed": self.allowed, "changed": self.changed}


async def _filter_one(message: Any, server: str, pins: ToolPins, allow: Allow,
                      listing: Listing) -> dict[str, Any] | None:
    """The filtered message when it is a tools/list result, else None. Whatever its id: a result
    under another id (or a second one) is filtered too, never handed on whole."""
    tools = listed_tools(message)
    if tools is None:
        return None
    permitted: set[str] = set()
    for tool in tools:
        name = tool["name"]
        changed = pins.record(server, tool)
        listing.listed.append(name)
        if changed:
            listing.changed.append(name)
        if await allow(name, changed):
            permitted.add(name)
            listing.allowed.append(name)
    return filter_message(message, permitted)


def _dump(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


async def filter_tools_list(body: bytes, content_type: str | None, server: str, pins: ToolPins,
                            allow: Allow) -> tuple[bytes | None, Listing]:
    """The response body with only allowed tools (None: leave it as it is), plain JSON or SSE.

    Fails closed: a body Keyless cannot read as JSON-RPC (or as an event stream of it) raises
    ``response_unscannable`` rather than reaching the agent unfiltered."""
    listing = Listing()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise KeylessError("response_unscannable", "tools/list response is not UTF-8", "mcp") from None
    if is_sse(content_type):
        events = sse_events(text)
        out, touched = [], False
        for event in events:
            if event.data is None:
                out.append(event)
                continue
            try:
                message = loads(event.data.encode())
            except ValueError:
                raise KeylessError("response_unscannable", "tools/list event is not JSON", "mcp") from None
            filtered = await _filter_one(message, server, pins, allow, listing)
            if filtered is not None:
                event, touched = sse_replace_data(event, _dump(filtered)), True
            out.append(event)
        return (sse_write(out) if touched else None), listing
    try:
        message = loads(body)
    except ValueError:
        raise KeylessError("response_unscannable", "tools/list response is not JSON", "mcp") from None
    filtered = await _filter_one(message, server, pins, allow, listing)
    return (None if filtered is None else _dump(filtered).encode()), listing
