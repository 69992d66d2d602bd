"""``keyless policy test``: run ``test_`` rules in ``*_test.rego`` files, as ``opa test`` does."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from proxy.policy.embedded import PolicyLoadError, PolicySource, compile_modules, evaluate, read_policy_dir

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class TestResult:
    name: str
    passed: bool
    detail: str = ""


def discover(modules: tuple[tuple[str, str], ...]) -> list[str]:
    """Rule paths (``data.pkg.test_x``) of every test rule, in file order."""
    found: list[str] = []
    for name, text in modules:
        if not name.endswith("_test.rego"):
            continue
        pkg = _PACKAGE.search(text)
        if pkg is None:
            continue
        for rule in dict.fromkeys(_TEST_RULE.findall(text)):
            found.append(f"data.{pkg.group(1)}.{rule}")
    return found


def run_tests(directory: Path) -> list[TestResult]:
    source = read_policy_dir(directory, with_tests=True)
    if not discover(source.modules):
        raise PolicyLoadError([f"{directory}: no test_ rules in *_test.rego files"])
    return run_source_tests(source)


def run_source_tests(source: PolicySource) -> list[TestResult]:
    """Run the test rules of an already-read directory or bundle (hot reload vets versions so)."""
    tests = discover(source.modules)
    if not tests:
        return []
    entries = [t.removeprefix("data.").replace(".", "/") for t in tests]
    interp, bundle = compile_modules(source, entries)
    results: list[TestResult] = []
    for test, entry in zip(tests, entries, strict=True):
        try:
            defined, value = evaluate(interp, bundle, entry, {})
        except ValueError as e:
            results.append(TestResult(test, False, f"error: {e}"))
            continue
        passed = defined and value is True
        results.append(TestResult(test, passed, "" if passed else ("undefined" if not defined else f"got {value!r}")))
    return results
