"""The policy input document (``input`` in Rego): a pure function of what Keyless knows.

Credential-bearing headers and query parameters never reach the input, so a policy (or an OPA
decision log) can never leak them.

``INPUT_FIELDS`` declares every field of the document once, each either part of the decision
cache's strict key or uncacheable with the reason; ``proxy.policy.cache`` derives its keys from
it, and a test builds a full input and fails when a field is in neither list.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from proxy.model import Identity, Source
from proxy.paths import MEMO_PATH

# Always withheld from the input, whatever the strip config says.
_NEVER_IN_INPUT = frozenset({"authorization", "proxy-authorization", "cookie"})


@dataclass(frozen=True, slots=True)
class InputField:
    """One field of the input. ``subtree``: the field is a map whose keys the caller chooses
    (headers, query parameters, attestation facts), taken as one value."""

    path: str
    cacheable: bool
    why: str = ""  # why an uncacheable field is left out of the strict key
    subtree: bool = False


INPUT_FIELDS: tuple[InputField, ...] = (
    InputField("source.address", True),
    InputField("source.port", False, "a new ephemeral port per connection: nothing would ever hit"),
    InputField("identity.id", True),
    InputField("identity.attestations", True, subtree=True),
    InputField("identity.revoked", True),
    InputField("request.method", True),
    InputField("request.scheme", True),
    InputField("request.host", True),
    InputField("request.port", True),
    InputField("request.path", True),
    InputField("request.path_template", True),
    InputField("request.query", True, subtree=True),
    InputField("request.headers", False, "clients change them per request (user-agent, tracing ids); "
               "a decision that reads one names it in cache.vary", subtree=True),
    InputField("context.time", False, "the clock"),
    InputField("context.time_ns", False, "the clock"),
    InputField("context.mode", True),
    InputField("context.posture.workload", True, subtree=True),
    InputField("context.posture.stale", True),
    InputField("context.posture.age_seconds", False, "changes every millisecond; `stale` is in the key"),
    InputField("destination.address", True),
    InputField("destination.port", True),
    # proxy.agents: a request to a configured MCP server, and the user an agent acts for.
    InputField("mcp.server", True),
    InputField("mcp.kind", True),
    InputField("mcp.method", True),
    InputField("mcp.id", False, "a new JSON-RPC id per request: nothing would ever hit"),
    InputField("mcp.protocol_version", True),
    InputField("mcp.session_id", False, "a new id per session; a decision that reads it names it in cache.vary"),
    InputField("mcp.http_method", True),
    InputField("mcp.name", True),
    InputField("mcp.tool", True),
    InputField("mcp.arguments", True, subtree=True),
    InputField("mcp.tool_changed", True),
    InputField("mcp.listing", True),
    InputField("user.provider", True),
    InputField("user.type", True),
    InputField("user.id", True),
    InputField("user.facts", True, subtree=True),
)

# --- request.path_template ---------------------------------------------------------------------
# A path segment is an identifier, and becomes "{id}", when it is all decimal digits, a UUID, or
# at least 16 characters of [A-Za-z0-9_-] with at least one digit (hex digests, ObjectIds, Stripe
# ids). Anything else is kept as written: "v1", "invoices", "acme", "billing" stay.
_DIGITS = re.compile(r"[0-9]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TOKEN = re.compile(r"(?=[A-Za-z_-]*[0-9])[A-Za-z0-9_-]{16,}")
ID_PLACEHOLDER = "{id}"


def path_template(path: str) -> str:
    """``/v1/invoices/123/lines/9f1c...`` -> ``/v1/invoices/{id}/lines/{id}`` (rule above)."""
    return _template_memo(path) if len(path) <= MEMO_PATH else _template(path)


@functools.lru_cache(maxsize=4096)
def _template_memo(path: str) -> str:
    return _template(path)


def _template(path: str) -> str:
    return "/".join(ID_PLACEHOLDER if _is_id(seg) else seg for seg in path.split("/"))


def _is_id(segment: str) -> bool:
    return bool(segment) and (_DIGITS.fullmatch(segment) is not None or _UUID.fullmatch(segment) is not None
                              or _TOKEN.fullmatch(segment) is not None)


def build_input(
    *,
    source: Source,
    identity: Identity,
    method: str,
    scheme: str,
    host: str,
    port: int,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Iterable[tuple[str, str]],
    secret_headers: frozenset[str],
    secret_params: frozenset[str],
    time: str,
    mode: str,
    time_ns: int | None = None,
    posture: dict[str, Any] | None = None,
    destination: dict[str, Any] | None = None,
) -> dict[str, Any]:
    hdrs: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in _NEVER_IN_INPUT or key in secret_headers:
            continue
        hdrs[key] = f"{hdrs[key]}, {value}" if key in hdrs else value
    q: dict[str, list[str]] = {}
    for name, value in query:
        if name.lower() not in secret_params:
            q.setdefault(name, []).append(value)
    context: dict[str, Any] = {"time": time, "mode": mode}
    if time_ns is not None:
        context["time_ns"] = time_ns
    if posture is not None:
        context["posture"] = posture
    doc: dict[str, Any] = {
        "source": {"address": source.address, "port": source.port},
        "identity": identity.as_input(),
        "request": {
            "method": method,
            "scheme": scheme,
            "host": host,
            "port": port,
            "path": path,
            "path_template": path_template(path),
            "query": q,
            "headers": hdrs,
        },
        "context": context,
    }
    if destination is not None:
        doc["destination"] = destination
    return doc
