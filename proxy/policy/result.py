"""Strict parsing of the decision document, after opa-envoy-plugin's ``EvalResult``.

Anything but an object with a boolean ``allow`` is a policy error, never an allow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.errors import KeylessError
from proxy.model import Decision
from proxy.policy.input import INPUT_FIELDS

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
    vary: tuple[str, ...] | None = None
    cache = value.get("cache")
    if cache is not None:
        if ttl is not None:
            raise bad("set one of 'cache_ttl' or 'cache', not both")
        if not isinstance(cache, dict) or "ttl" not in cache or not set(cache) <= {"ttl", "vary"}:
            raise bad("'cache' must be an object {\"ttl\": seconds, \"vary\": [input paths]}")
        ttl = cache["ttl"]
        if "vary" in cache:
            vary = _vary(cache["vary"], bad)
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0):
        raise bad("'cache_ttl' must be a number of seconds >= 0")
    return Decision(allow=allow, reason=reason, credential=credential, params=params,
                    cache_ttl=float(ttl) if ttl else None, vary=vary if ttl else None)


def _vary(raw: Any, bad: Callable[[str], KeylessError]) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise bad("'cache.vary' must be a list of input paths such as \"request.path_template\"")
    for path in raw:
        if not vary_path_known(path):
            raise bad(f"'cache.vary' names {path!r}, which is not a field of the input")
    # Sorted and deduplicated: the same fields in another order are the same cache key.
    return tuple(sorted(set(raw)))


def vary_path_known(path: str) -> bool:
    """A declared input field, a part of one that is a map (``request.headers.x-tenant``), or a
    prefix that covers declared fields (``identity``, ``context.posture``)."""
    for f in INPUT_FIELDS:
        if path == f.path or (f.subtree and path.startswith(f.path + ".")) or f.path.startswith(path + "."):
            return True
    return False


def decision_document(d: Decision) -> dict[str, Any]:
    """The decision as the policy gave it, parsed: what ``keyless policy eval`` prints."""
    out: dict[str, Any] = {"allow": d.allow, "reason": d.reason, "credential": d.credential,
                           "params": dict(d.params)}
    if d.cache_ttl is not None:
        ttl: float | int = int(d.cache_ttl) if d.cache_ttl.is_integer() else d.cache_ttl
        out["cache"] = {"ttl": ttl, **({"vary": list(d.vary)} if d.vary is not None else {})}
    if d.revision is not None:
        out["revision"] = d.revision
    return out
