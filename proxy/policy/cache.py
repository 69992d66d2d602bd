"""Decision cache for the embedded engine: reuse a decision when nothing the policy reads changed.

Evaluating the default policy in rego-cpp costs a few hundred microseconds, most of Keyless's
own work per request, and successive requests from one workload usually differ only in fields
the policy never reads (source port, time, headers). The cache is keyed on exactly the parts of
``input`` that the policy's modules reference, so a hit returns what evaluation would have.

That is only sound when the references are known and the policy is deterministic, so the
modules are scanned (comments and strings removed) and the cache is off when any module:

- uses ``input`` other than as ``input.a.b...`` (bare ``input``, ``input[...]``, ``import input``,
  ``with input as``): the whole document could matter;
- calls a built-in whose answer is not a function of its arguments (``time.now_ns``,
  ``rand.*``, ``uuid.*``, ``http.send``, ``net.lookup_ip_addr``, ``opa.runtime``, and
  ``io.jwt.decode_verify`` and ``crypto.x509.parse_and_verify_certificates*``, which read the
  clock);
- contains a template string (``$"...{input.x}..."``), whose embedded code the scan cannot see.

``data`` is compiled in once and never changes within an engine, and each engine instance has
its own cache, so a policy reload (a new engine) starts empty. Errors are never cached.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from types import MappingProxyType
from typing import Any

from proxy.model import Decision

MAX_ENTRIES = 10_000

_NONDETERMINISTIC = re.compile(
    r"\b(?:time\.now_ns|rand\.\w+|uuid\.\w+|http\.send|net\.lookup_ip_addr|opa\.runtime|io\.jwt\.decode_verify"
    r"|crypto\.x509\.parse_and_verify_certificates\w*)\b")
# Template strings ($"...{expr}...") hold code inside quotes, which the scan below drops.
_TEMPLATE = re.compile(r"\$\s*[\"`]")
_INPUT = re.compile(r"(?<![\w.])input\b((?:\s*\.\s*[A-Za-z_]\w*)*)")


def _code_only(text: str) -> str:
    """The module without comments and string literals (both could mention ``input``)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "`":
            end = text.find("`", i + 1)
            i = n if end < 0 else end + 1
            out.append('""')
        else:
            out.append(c)
            i += 1
    return "".join(out)


def input_paths(modules: Iterable[tuple[str, str]]) -> tuple[tuple[str, ...], ...] | None:
    """The ``input`` paths the policy reads, or None when the cache must stay off."""
    paths: set[tuple[str, ...]] = set()
    for _name, text in modules:
        if _TEMPLATE.search(text):
            return None
        code = _code_only(text)
        if _NONDETERMINISTIC.search(code):
            return None
        for m in _INPUT.finditer(code):
            dotted = m.group(1)
            if not dotted:
                return None  # bare input: passed whole, indexed, imported or replaced
            paths.add(tuple(part.strip() for part in dotted.split(".")[1:]))
    # input.request makes input.request.host redundant; keep the shortest prefixes.
    kept = [p for p in paths if not any(q != p and p[:len(q)] == q for q in paths)]
    return tuple(sorted(kept))


_MISSING = object()


def describe(cache: DecisionCache | None) -> str:
    """One line for the start-up log: whether decisions are cached, and on what."""
    if cache is None:
        return "decision cache off (the policy reads input as a whole or calls a clock or network built-in)"
    keys = ", ".join("input." + ".".join(p) for p in cache.paths) or "nothing (constant policy)"
    return f"decision cache on, keyed on {keys}"


class DecisionCache:
    def __init__(self, paths: tuple[tuple[str, ...], ...]) -> None:
        self.paths = paths
        self._entries: dict[str, Decision] = {}

    def key(self, doc: dict[str, Any]) -> str:
        values: list[Any] = []
        for path in self.paths:
            v: Any = doc
            for part in path:
                v = v.get(part, _MISSING) if isinstance(v, dict) else _MISSING
                if v is _MISSING:
                    break
            # A marker no JSON value can equal keeps "absent" apart from null.
            values.append({"\0missing": True} if v is _MISSING else v)
        return json.dumps(values, sort_keys=True, separators=(",", ":"), default=repr)

    def get(self, key: str) -> Decision | None:
        return self._entries.get(key)

    def put(self, key: str, decision: Decision) -> Decision:
        """Store ``decision``; returns the stored copy, which every later hit shares."""
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        # Shared between requests from now on: hand out a read-only view of params.
        stored = Decision(decision.allow, decision.reason, decision.credential, MappingProxyType(dict(decision.params)))
        self._entries[key] = stored
        return stored
