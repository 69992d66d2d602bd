"""What of the policy input an audit record keeps: OPA's ``mask_decision``, configured as paths.

Header values are never recorded: the strip list removes known credential headers from the
input, but an app can put a secret in any header. Their names stay (a replay can still see which
headers were sent), each value replaced by ``"[masked]"``, and the record lists
``/input/request/headers`` under ``masked`` as OPA does. ``audit.mask`` names more paths to
erase (JSON pointers under ``/input``, e.g. ``/input/request/query``); erased paths are listed
under ``erased``. The input document itself is never modified: only the dicts on a masked path
are copied.
"""

from __future__ import annotations

from typing import Any

HEADERS = "/input/request/headers"
MASKED = "[masked]"


def mask_input(doc: dict[str, Any], erase: tuple[str, ...]) -> tuple[dict[str, Any], list[str], list[str]]:
    """``doc`` as the record keeps it, the erased paths that existed, and the masked paths."""
    out = dict(doc)
    masked: list[str] = []
    request = out.get("request")
    if isinstance(request, dict) and isinstance(request.get("headers"), dict):
        out["request"] = request = dict(request)
        request["headers"] = dict.fromkeys(request["headers"], MASKED)
        masked.append(HEADERS)
    context = out.get("context")
    if isinstance(context, dict) and "time_ns" in context:
        # Keyless's own derivative of context.time (for rego-cpp); a replay recomputes it. Left
        # out because JSON canonicalisation (RFC 8785) cannot hold an integer that large.
        out["context"] = {k: v for k, v in context.items() if k != "time_ns"}
    erased = [path for path in erase if _erase(out, path)]
    return out, erased, masked


def _erase(doc: dict[str, Any], path: str) -> bool:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[2:]]
    if not parts:
        return False
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            return False
        # Copy on the way down: the input document is shared with the decision cache.
        node[part] = node = dict(child)
    return node.pop(parts[-1], _MISSING) is not _MISSING


_MISSING = object()


def check_path(path: str) -> str | None:
    """Why ``path`` is not a mask path, or None."""
    if not path.startswith("/input/") or len(path) <= len("/input/"):
        return "must be a JSON pointer under /input, e.g. /input/request/query"
    return None
