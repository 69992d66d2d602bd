"""The embedded engine: rego-cpp through regopy, in process, compiled once at start.

A policy directory is an OPA bundle directory: ``*.rego`` modules, optional ``data.json`` or
``data.yaml`` at its root, and an optional ``.manifest`` with a ``revision``. Test files
(``*_test.rego``) are left out of the engine and run by ``keyless policy test``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import regopy
import yaml
from regopy.rego_shared import (
    rego_bundle_query_entrypoint,
    rego_free_output,
    rego_output_ok,
    rego_output_string,
)

from proxy.errors import KeylessError
from proxy.model import Decision
from proxy.policy import PolicyUnavailable
from proxy.policy.fastinput import set_input
from proxy.policy.result import UNDEFINED, parse_decision

# rego-cpp prints diagnostics to stdout by default; Keyless reports them itself, on one line.
regopy.set_default_log_level("None")

_ERROR = re.compile(r"\(error \d+:([^|]*)\|(\d+)\|\d+\s*\(errormsg \d+:([^)]*)\)")
_ERRMSG = re.compile(r"\(errormsg \d+:([^)]*)\)")


class PolicyLoadError(Exception):
    """One line per problem, each naming the file and line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class PolicySource:
    modules: tuple[tuple[str, str], ...]  # (path shown in errors, source text)
    data: dict[str, Any]
    revision: str

    def without_tests(self) -> PolicySource:
        """The modules the engine serves: ``*_test.rego`` files run only under ``policy test``."""
        kept = tuple(m for m in self.modules if not m[0].endswith("_test.rego"))
        return replace(self, modules=kept)

    @property
    def has_tests(self) -> bool:
        return any(name.endswith("_test.rego") for name, _ in self.modules)


def read_policy_dir(directory: Path, *, with_tests: bool = False) -> PolicySource:
    if not directory.is_dir():
        raise PolicyLoadError([f"{directory}: policy directory not found"])
    problems: list[str] = []
    modules: list[tuple[str, str]] = []
    digest = hashlib.sha256()
    for file in sorted(directory.rglob("*.rego")):
        if file.name.endswith("_test.rego") and not with_tests:
            continue
        text = file.read_text()
        modules.append((_show(file), text))
        digest.update(file.name.encode() + b"\0" + text.encode() + b"\0")
    if not modules:
        problems.append(f"{directory}: no .rego files")
    data: dict[str, Any] = {}
    for name in ("data.json", "data.yaml", "data.yml"):
        file = directory / name
        if not file.is_file():
            continue
        text = file.read_text()
        digest.update(text.encode())
        try:
            loaded = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            problems.append(f"{_show(file)}: malformed data file ({str(e).splitlines()[0]})")
            continue
        if not isinstance(loaded, dict):
            problems.append(f"{_show(file)}: data must be an object at the top level")
            continue
        data.update(loaded)
    revision = "sha256:" + digest.hexdigest()[:12]
    manifest = directory / ".manifest"
    if manifest.is_file():
        try:
            rev = json.loads(manifest.read_text()).get("revision")
        except (json.JSONDecodeError, AttributeError):
            problems.append(f"{_show(manifest)}: malformed manifest (expected a JSON object)")
        else:
            if isinstance(rev, str) and rev:
                revision = rev
    if problems:
        raise PolicyLoadError(problems)
    return PolicySource(tuple(modules), data, revision)


def entrypoint(query: str) -> str:
    """``data.keyless.egress.decision`` -> ``keyless/egress/decision``."""
    return query.removeprefix("data.").replace(".", "/")


def rule_declared(source: PolicySource, query: str) -> bool:
    """Whether some module declares the package of ``query`` and a rule of its name."""
    package, _, rule = query.removeprefix("data.").rpartition(".")
    head = re.compile(rf"^(default\s+)?{re.escape(rule)}\b", re.MULTILINE)
    decl = re.compile(rf"^package\s+{re.escape(package)}\s*$", re.MULTILINE)
    return any(decl.search(text) and head.search(text) for _, text in source.modules)


def compile_modules(source: PolicySource, entrypoints: list[str]) -> tuple[regopy.Interpreter, regopy.Bundle]:
    interp = regopy.Interpreter()
    interp.log_level = regopy.LogLevel.NONE
    texts = dict(source.modules)
    try:
        for name, text in source.modules:
            interp.add_module(name, text)
        if source.data:
            interp.add_data(source.data)
        bundle = interp.build(None, entrypoints)
    except regopy.RegoError as e:
        raise PolicyLoadError(_describe(str(e), texts)) from None
    if not bundle.ok():
        raise PolicyLoadError(["policy failed to compile"])
    return interp, bundle


def evaluate(interp: regopy.Interpreter, bundle: regopy.Bundle, entry: str, input_doc: Any) -> tuple[bool, Any]:
    """(defined, value) of ``entry`` for ``input_doc``; raises ValueError on an evaluation error."""
    # Not regopy.Input(input_doc): its generic converter cost more than the evaluation itself.
    set_input(interp._impl, input_doc)
    # regopy's Output wrapper raises a bare JSONDecodeError on evaluation errors and drops the
    # message, so read the raw output through the same C API it uses.
    impl = rego_bundle_query_entrypoint(interp._impl, bundle._impl, entry)
    try:
        ok = rego_output_ok(impl)
        text = rego_output_string(impl)
    finally:
        rego_free_output(impl)
    if not ok:
        raise ValueError(f"cannot evaluate {entry}")
    if text == "undefined":
        return False, None
    try:
        out = json.loads(text)
    except json.JSONDecodeError:
        m = _ERRMSG.search(text)
        raise ValueError(m.group(1) if m else "evaluation error") from None
    results = out if isinstance(out, list) else [out]
    if len(results) != 1 or not results[0].get("expressions"):
        return False, None
    return True, results[0]["expressions"][0]


class EmbeddedEngine:
    def __init__(self, source: PolicySource, query: str) -> None:
        self.query = query
        self.revision = source.revision
        self._entry = entrypoint(query)
        if not rule_declared(source, query):
            # rego-cpp builds a plan for a missing rule and answers "undefined" forever, which
            # would deny every request with no hint why.
            raise PolicyLoadError([f"no rule {query} in the policy (check policy.decision)"])
        self._interp, self._bundle = compile_modules(source.without_tests(), [self._entry])
        self._source = f"policy({query})"

    @classmethod
    def from_dir(cls, directory: Path, query: str) -> EmbeddedEngine:
        return cls(read_policy_dir(directory), query)

    def decide_sync(self, input_doc: dict[str, Any]) -> Decision:
        try:
            defined, value = evaluate(self._interp, self._bundle, self._entry, input_doc)
        except (ValueError, regopy.RegoError) as e:
            raise PolicyUnavailable("policy_error", f"evaluation failed: {e}", self._source) from None
        if not defined:
            return replace(UNDEFINED, revision=self.revision)
        try:
            decision = parse_decision(value, self._source)
        except KeylessError as e:
            raise PolicyUnavailable("malformed_decision", e.message) from None
        return replace(decision, revision=self.revision)

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        # Evaluation is CPU-only (under a millisecond for the default policy): no reason to leave the loop.
        return self.decide_sync(input_doc)


def _describe(error: str, texts: dict[str, str]) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for name, offset, message in _ERROR.findall(error):
        # rego-cpp follows a real error with echoes of it at the package line; keep the first.
        if name in seen:
            continue
        seen.add(name)
        text = texts.get(name, "")
        pos = int(offset)
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        problems.append(f"{name}:{line}:{col}: {message.strip()}")
    return problems or [f"policy failed to compile: {error.strip().splitlines()[0]}"]


def _show(file: Path) -> str:
    try:
        return str(file.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(file)
