"""``keyless policy explain``: which definition of the decision rule produced the decision.

The embedded engines have no evaluation trace, so Keyless asks Rego itself: every definition of the decision
rule (each ``if`` body of an ``else`` chain, each incremental definition, the ``default``) is
found in the source, and each body is compiled as a rule of its own in the same package and
evaluated against the same input. The first true body of a chain is the one Rego used (``else``
semantics); when none is true, the ``default`` applies. The package's other rules without
arguments are evaluated too, since they are usually the "why" (``granted`` in the default policy).

Definitions need Rego v1 syntax (``if`` before each body), which ``import rego.v1`` enforces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.policy.embedded import PolicyLoadError, PolicySource, compile_modules, evaluate

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)
_IMPORT = re.compile(r"^import\s+.*$", re.MULTILINE)
_RULE_NAME = re.compile(r"^(?:default\s+)?([A-Za-z_]\w*)\s*(\(|\[|:=|=|if\b|contains\b|\{|$)")


@dataclass(frozen=True, slots=True)
class Branch:
    where: str  # file:line
    head: str  # the rule head as written, on one line
    body: str | None  # None for ``default`` and a final body-less ``else``
    default: bool
    chain: int  # definitions of one ``else`` chain share a chain number


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Any
    defined: bool
    chosen: Branch | None
    tried: list[tuple[Branch, bool | None]]  # (branch, body true?) None: not evaluated
    rules: dict[str, Any]


def _scan(text: str) -> list[tuple[int, str, int]]:
    """(offset, char, depth) of every character outside strings and comments."""
    out: list[tuple[int, str, int]] = []
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch in "\"`":
            end = ch
            i += 1
            while i < n and text[i] != end:
                i += 2 if (end == '"' and text[i] == "\\") else 1
            i += 1
            out.append((i - 1, "s", depth))  # a placeholder: strings are opaque
            continue
        if ch in "{[(":
            out.append((i, ch, depth))
            depth += 1
        elif ch in "}])":
            depth -= 1
            out.append((i, ch, depth))
        else:
            out.append((i, ch, depth))
        i += 1
    return out


def _statements(text: str) -> list[tuple[int, int]]:
    """Top-level statements: each begins at column 0, at depth 0, with no comment."""
    starts = [off for off, ch, depth in _scan(text)
              if depth == 0 and (off == 0 or text[off - 1] == "\n") and not ch.isspace() and ch != "}"]
    return [(s, starts[k + 1] if k + 1 < len(starts) else len(text)) for k, s in enumerate(starts)]


def _keyword_at(text: str, off: int, word: str) -> bool:
    end = off + len(word)
    return (text.startswith(word, off) and (off == 0 or not (text[off - 1].isalnum() or text[off - 1] == "_"))
            and (end >= len(text) or not (text[end].isalnum() or text[end] == "_")))


def _branches(file: str, text: str, start: int, end: int, chain: int) -> list[Branch]:
    stmt = text[start:end]
    scan = [(o, c, d) for o, c, d in _scan(stmt) if d == 0]
    elses = [o for o, c, _ in scan if c == "e" and _keyword_at(stmt, o, "else")]
    cuts = [0, *elses, len(stmt)]
    out: list[Branch] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        seg = stmt[a:b]
        ifs = [o - a for o, c, _ in scan if a <= o < b and c == "i" and _keyword_at(stmt, o, "if")]
        line = text.count("\n", 0, start + a) + 1
        head = seg[: ifs[0]] if ifs else seg
        body: str | None = None
        if ifs:
            rest = seg[ifs[0] + 2:].strip()
            if rest.startswith("{"):
                rest = rest[1:]
                rest = rest[: rest.rfind("}")] if "}" in rest else rest
            body = rest.strip()
        head_text = " ".join(head.split()).lstrip("} ").strip()
        out.append(Branch(f"{file}:{line}", head_text, body, head_text.startswith("default "), chain))
    return out


def find_definitions(source: PolicySource, query: str) -> tuple[str, list[Branch], dict[str, list[str]]]:
    """(package, definitions of the rule, imports per module) for ``data.<package>.<rule>``."""
    path = query.removeprefix("data.")
    package, _, rule = path.rpartition(".")
    branches: list[Branch] = []
    imports: dict[str, list[str]] = {}
    chain = 0
    for file, text in source.without_tests().modules:
        pkg = _PACKAGE.search(text)
        if pkg is None or pkg.group(1) != package:
            continue
        imports[file] = _IMPORT.findall(text)
        for s, e in _statements(text):
            m = _RULE_NAME.match(text[s:e])
            if m is None or m.group(1) != rule:
                continue
            branches.extend(_branches(file, text, s, e, chain))
            chain += 1
    return package, branches, imports


def rule_names(source: PolicySource, package: str, skip: str) -> list[str]:
    """Rules of the package that take no arguments (functions cannot be evaluated alone)."""
    names: dict[str, None] = {}
    for _, text in source.without_tests().modules:
        pkg = _PACKAGE.search(text)
        if pkg is None or pkg.group(1) != package:
            continue
        for s, e in _statements(text):
            m = _RULE_NAME.match(text[s:e])
            if m and m.group(1) not in ("package", "import", skip) and m.group(2) != "(":
                names[m.group(1)] = None
    return list(names)


def explain(source: PolicySource, query: str, input_doc: Any) -> Explanation:
    package, branches, imports = find_definitions(source, query)
    if not branches:
        raise PolicyLoadError([f"{query}: no definition found in the policy"])
    probes = [b for b in branches if b.body]
    extra = [f"package {package}", *sorted({i for lines in imports.values() for i in lines})]
    for k, b in enumerate(probes):
        extra.append(f"__keyless_explain_{k} if {{\n{b.body}\n}}")
    others = rule_names(source, package, query.rsplit(".", 1)[1])
    entries = [query] + [f"data.{package}.__keyless_explain_{k}" for k in range(len(probes))]
    entries += [f"data.{package}.{r}" for r in others]
    probe_source = PolicySource((*source.without_tests().modules, ("(explain)", "\n".join(extra))),
                                source.data, source.revision)
    # The interpreter: the probes are rules of their own, and it evaluates all of regorus's Rego.
    compiled = compile_modules(probe_source, entries, "regorus")
    defined, decision = evaluate(compiled, entries[0], input_doc)
    truth: dict[Branch, bool] = {}
    for k, b in enumerate(probes):
        ok, value = evaluate(compiled, entries[1 + k], input_doc)
        truth[b] = ok and value is True
    # Rego's else semantics, per chain: the first true body wins and later ones are not consulted.
    chosen: Branch | None = None
    tried: list[tuple[Branch, bool | None]] = []
    done: set[int] = set()
    for b in branches:
        if b.default or b.chain in done:
            tried.append((b, None))
            continue
        t = True if b.body is None else truth[b]  # a final body-less `else` applies when reached
        tried.append((b, t))
        if t:
            done.add(b.chain)
            chosen = chosen or b
    if chosen is None and defined:
        chosen = next((b for b in branches if b.default), None)
    rules: dict[str, Any] = {}
    for r, entry in zip(others, entries[1 + len(probes):], strict=True):
        ok, value = evaluate(compiled, entry, input_doc)
        rules[r] = value if ok else "<undefined>"
    return Explanation(decision, defined, chosen, tried, rules)
