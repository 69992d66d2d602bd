"""The policy input document (``input`` in Rego): a pure function of what Keyless knows.

Credential-bearing headers and query parameters never reach the input, so a policy (or an OPA
decision log) can never leak them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.model import Identity, Source

# Always withheld from the input, whatever the strip config says.
_NEVER_IN_INPUT = frozenset({"authorization", "proxy-authorization", "cookie"})


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
    return {
        "source": {"address": source.address, "port": source.port},
        "identity": identity.as_input(),
        "request": {
            "method": method,
            "scheme": scheme,
            "host": host,
            "port": port,
            "path": path,
            "query": q,
            "headers": hdrs,
        },
        "context": {"time": time, "mode": mode},
    }
