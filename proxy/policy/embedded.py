"""The embedded engine: a policy version compiled once, evaluated in the Keyless process.

Which engine compiles it is ``policy.engine`` (``proxy.policy.engines``); the default is regorus
compiled to its RVM. Reading policy directories lives in ``proxy.policy.source``, re-exported here.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.errors import KeylessError
from proxy.model import Decision
from proxy.policy import PolicyUnavailable
from proxy.policy.engines import DEFAULT_EMBEDDED, compile_modules, resolve
from proxy.policy.rego import check_compiles
from proxy.policy.result import UNDEFINED, parse_decision
from proxy.policy.source import PolicyLoadError, PolicySource, entrypoint, read_policy_dir

__all__ = ["EmbeddedEngine", "PolicyLoadError", "PolicySource", "compile_modules", "entrypoint",
           "evaluate", "read_policy_dir"]


def evaluate(compiled: Any, rule: str, input_doc: Any) -> tuple[bool, Any]:
    """(defined, value) of ``rule`` (``data.a.b``); raises ValueError on an evaluation error."""
    result: tuple[bool, Any] = compiled.evaluate(rule, input_doc)
    return result


class EmbeddedEngine:
    def __init__(self, source: PolicySource, query: str, engine: str = DEFAULT_EMBEDDED) -> None:
        self.query = query
        self.revision = source.revision
        self.engine = resolve(engine).name
        if not rule_declared(source, query):
            # The interpreter would answer "undefined" forever, which would deny every request
            # with no hint why.
            raise PolicyLoadError([f"no rule {query} in the policy (check policy.decision)"])
        # The compiler checks every rule the decision reaches (the interpreter finds a misspelt
        # built-in only when a request reaches it); the RVM compiles it anyway.
        if self.engine != "regorus-rvm":
            check_compiles(source.without_tests(), [query])
        self._compiled = compile_modules(source.without_tests(), [query], engine)
        self._source = f"policy({query})"

    @classmethod
    def from_dir(cls, directory: Path, query: str, engine: str = DEFAULT_EMBEDDED) -> EmbeddedEngine:
        return cls(read_policy_dir(directory), query, engine)

    def decide_sync(self, input_doc: dict[str, Any]) -> Decision:
        try:
            defined, value = self._compiled.evaluate(self.query, input_doc)
        except ValueError as e:
            raise PolicyUnavailable("policy_error", f"evaluation failed: {e}", self._source) from None
        if not defined:
            return replace(UNDEFINED, revision=self.revision)
        try:
            decision = parse_decision(value, self._source)
        except KeylessError as e:
            raise PolicyUnavailable("malformed_decision", e.message) from None
        return replace(decision, revision=self.revision)

    async def decide(self, input_doc: dict[str, Any]) -> Decision:
        # Evaluation is CPU-only (about 70 us for the default policy): no reason to leave the loop.
        return self.decide_sync(input_doc)


def rule_declared(source: PolicySource, query: str) -> bool:
    """Whether some module declares the package of ``query`` and a rule of its name."""
    package, _, rule = query.removeprefix("data.").rpartition(".")
    head = re.compile(rf"^(default\s+)?{re.escape(rule)}\b", re.MULTILINE)
    decl = re.compile(rf"^package\s+{re.escape(package)}\s*$", re.MULTILINE)
    return any(decl.search(text) and head.search(text) for _, text in source.modules)
