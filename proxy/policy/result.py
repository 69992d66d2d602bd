"""Strict parsing of the decision document, after opa-envoy-plugin's ``EvalResult``.

Anything but an object with a boolean ``allow`` is a policy error, never an allow.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import KeylessError
from proxy.model import Decision

UNDEFINED = Decision(allow=False, reason="policy decision is undefined")


def parse_decision(value: Any, source: str) -> Decision:
    def bad(why: str) -> KeylessError:
        return KeylessError("policy_unavailable", f"malformed decision: {why}", source)

    if not isinstance(value, dict):
        raise bad(f"expected an object with a boolean 'allow', got {type(value).__name__}")
    allow = value.get("allow")
    if not isinstance(allow, bool):
        raise bad("'allow' must be true or false")
    reason = value.get("reason", "")
    if not isinstance(reason, str):
        raise bad("'reason' must be a string")
    credential = value.get("credential")
    if credential is not None and not (isinstance(credential, str) and credential):
        raise bad("'credential' must be a non-empty string or null")
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise bad("'params' must be an object")
    ttl = value.get("cache_ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0):
        raise bad("'cache_ttl' must be a number of seconds >= 0")
    return Decision(allow=allow, reason=reason, credential=credential, params=params,
                    cache_ttl=float(ttl) if ttl else None)
