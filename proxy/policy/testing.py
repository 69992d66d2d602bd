"""``keyless policy test``: run ``test_`` rules in ``*_test.rego`` files, as ``opa test`` does."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.policy.embedded import PolicyLoadError, PolicySource, compile_modules, evaluate, read_policy_dir
from proxy.policy.engines import resolve
from proxy.policy.rego import check_compiles

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


def run_tests(directory: Path, engine: str = "embedded") -> list[TestResult]:
    source = read_policy_dir(directory, with_tests=True)
    if not discover(source.modules):
        raise PolicyLoadError([f"{directory}: no test_ rules in *_test.rego files"])
    return run_source_tests(source, engine)


def policy_rules(source: PolicySource) -> list[str]:
    """``data.pkg.rule`` of every rule without arguments in the modules that are not tests."""
    from proxy.policy.explain import rule_names

    packages = dict.fromkeys(m.group(1) for _, text in source.without_tests().modules
                             if (m := _PACKAGE.search(text)) is not None)
    return [f"data.{pkg}.{rule}" for pkg in packages for rule in rule_names(source, pkg, "")]


def run_source_tests(source: PolicySource, engine: str = "embedded") -> list[TestResult]:
    """Run the test rules of an already-read directory or bundle (hot reload vets versions so).

    Tests run on the engine's ``tests`` engine (the RVM cannot compile ``with``). Before that the
    policy's own rules are compiled, so that a mistake anywhere in them (a misspelt built-in in a
    branch no test reaches) is reported with its file, line and column.
    """
    tests = discover(source.modules)
    if not tests:
        return []
    check_compiles(source.without_tests(), policy_rules(source))
    compiled = compile_modules(source, tests, resolve(engine).tests)
    results: list[TestResult] = []
    for test in tests:
        try:
            defined, value = evaluate(compiled, test, {})
        except ValueError as e:
            results.append(TestResult(test, False, f"error: {e}"))
            continue
        passed = defined and value is True
        results.append(TestResult(test, passed, "" if passed else ("undefined" if not defined else f"got {value!r}")))
    results.extend(check_vary(source, compiled, engine))
    return results


# --- the cache promise -------------------------------------------------------------------------
_SAMPLES = re.compile(r"^vary_samples\b", re.MULTILINE)
_PROBE = "keyless-vary-probe"
_LITERAL = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_MAX_LITERALS = 300
# A derived field is covered when the field it is derived from is.
_DERIVED = {"request.path_template": "request.path"}


def check_vary(source: PolicySource, tests: Any, engine: str) -> list[TestResult]:
    """Check each cached decision's promise on the sample inputs of ``vary_samples`` rules.

    A test package may define ``vary_samples := {"data.pkg.decision": [input, ...]}``. For each
    sample whose decision is cached, every input field the cache key does not cover (the fields
    not in ``cache.vary``; without ``vary``, the fields declared uncacheable) is changed in turn
    (removed, emptied, replaced) and the decision evaluated again: if it changes, the decision
    depends on a field its key leaves out, and a cached copy would be served where the policy
    would have decided otherwise. A failure names the field.
    """
    results: list[TestResult] = []
    # The policy's own string constants are the values most likely to change a decision
    # ("fail", a host, a method): each string field is also set to each of them.
    literals = list(dict.fromkeys(json.loads(f'"{m}"') for _, text in source.without_tests().modules
                                  for m in _LITERAL.findall(text)))[:_MAX_LITERALS]
    for name, text in source.modules:
        pkg = _PACKAGE.search(text)
        if not name.endswith("_test.rego") or pkg is None or not _SAMPLES.search(text):
            continue
        rule = f"data.{pkg.group(1)}.vary_samples"
        try:
            defined, samples = evaluate(tests, rule, {})
        except ValueError as e:
            results.append(TestResult(rule, False, f"error: {e}"))
            continue
        if not defined or not isinstance(samples, dict):
            results.append(TestResult(rule, False, "must be an object {decision rule path: [input, ...]}"))
            continue
        spec, reference_name = resolve(engine), resolve(resolve(engine).tests).name
        for query, inputs in samples.items():
            try:
                decision = compile_modules(source.without_tests(), [query], engine)
                # The samples double as a cross-engine check: the engine that serves requests
                # must decide each one as the engine that ran the tests does.
                reference = (compile_modules(source.without_tests(), [query], reference_name)
                             if reference_name != spec.name else None)
            except PolicyLoadError as e:
                results.append(TestResult(f"{rule}[{query}]", False, "; ".join(e.problems)))
                continue
            for i, sample in enumerate(inputs if isinstance(inputs, list) else []):
                name = f"{rule}[{query!r}][{i}]"
                if reference is not None and isinstance(sample, dict):
                    ours, theirs = _safe(decision, query, sample), _safe(reference, query, sample)
                    if ours != theirs:
                        why = (f"{spec.name} decides {ours!r} but {reference_name} decides {theirs!r}: "
                               f"use policy.engine: {reference_name}")
                        results.append(TestResult(name, False, why))
                        continue
                results.append(_check_sample(decision, query, name, sample, literals))
    return results


def _safe(compiled: Any, query: str, doc: Any) -> Any:
    from proxy.policy.input import path_template

    doc = json.loads(json.dumps(doc))
    req = doc.get("request")
    if isinstance(req, dict) and isinstance(req.get("path"), str) and "path_template" not in req:
        req["path_template"] = path_template(req["path"])
    try:
        return evaluate(compiled, query, doc)
    except ValueError as e:
        return ("error", str(e))


def _check_sample(compiled: Any, query: str, name: str, sample: Any, literals: list[str]) -> TestResult:
    from proxy.policy.input import INPUT_FIELDS, path_template
    from proxy.policy.result import parse_decision

    if not isinstance(sample, dict):
        return TestResult(name, False, "a sample must be an input object")
    sample = json.loads(json.dumps(sample))
    req = sample.get("request")
    if isinstance(req, dict) and isinstance(req.get("path"), str) and "path_template" not in req:
        req["path_template"] = path_template(req["path"])  # as Keyless builds it

    def decide(doc: Any) -> Any:
        try:
            return evaluate(compiled, query, doc)
        except ValueError as e:
            return ("error", str(e))

    first = decide(sample)
    try:
        d = parse_decision(first[1], query) if first[0] is True else None
    except Exception:  # noqa: BLE001 - a malformed decision is the tests' business, not this check's
        d = None
    if d is None or not d.cache_ttl:
        return TestResult(name, True, "not cached")
    if d.vary is not None:
        covered = list(d.vary)
        promise = f"cache.vary {list(d.vary)}"
    else:
        covered = [f.path for f in INPUT_FIELDS if f.cacheable]
        promise = "cache_ttl (the strict key)"
    for path in _leaves(sample):
        dotted = ".".join(path)
        if _covered(dotted, covered) or _covered(_DERIVED.get(dotted, "\0"), covered):
            continue
        for changed in _mutations(sample, path, literals):
            if decide(changed) != first:
                return TestResult(name, False, f"the decision sets {promise} but changes when {dotted} "
                                               "changes: add it to cache.vary, or do not cache this decision")
    return TestResult(name, True)


def _covered(path: str, covered: list[str]) -> bool:
    return any(path == c or path.startswith(c + ".") for c in covered)


def _leaves(doc: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(doc, dict) and doc:
        return [leaf for k, v in doc.items() for leaf in _leaves(v, (*prefix, str(k)))]
    return [prefix] if prefix else []


def _mutations(doc: Any, path: tuple[str, ...], literals: list[str]) -> list[Any]:
    out: list[Any] = []
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    value = parent[path[-1]]
    replacements: list[Any] = [_PROBE]
    if isinstance(value, bool):
        replacements = [not value]
    elif isinstance(value, int | float):
        replacements = [value + 1, value - 1, 0]
    elif isinstance(value, str):
        replacements = ["", _PROBE, value + "/" + _PROBE, *(lit for lit in literals if lit != value)]
    elif isinstance(value, list):
        replacements = [[], [_PROBE]]
    for new in [None, *replacements]:
        changed = json.loads(json.dumps(doc))
        target = changed
        for p in path[:-1]:
            target = target[p]
        if new is None:
            del target[path[-1]]
        else:
            target[path[-1]] = new
        out.append(changed)
    return out


_CHILD = [sys.executable, "-m", "proxy.policy.testing"]


def _request(source: PolicySource, engine: str) -> bytes:
    return json.dumps({"modules": [list(m) for m in source.modules], "data": source.data,
                       "revision": source.revision, "engine": engine}).encode()


def _results(code: int | None, out: bytes, err: bytes) -> list[TestResult]:
    if code != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise PolicyLoadError(lines if code == 2 and lines else [f"policy tests crashed (exit code {code})"])
    return [TestResult(name, passed, detail) for name, passed, detail in json.loads(out)]


def run_source_tests_isolated_sync(source: PolicySource, engine: str = "embedded",
                                   timeout: float = 120.0) -> list[TestResult]:
    """``run_source_tests`` in a child process (at start and in ``keyless check``).

    In a child, a test that panics or loops in the engine is a rejected version, not a dead or
    stalled proxy, and the engine serving requests shares no state with the tests.
    """
    try:
        done = subprocess.run(_CHILD, input=_request(source, engine), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PolicyLoadError([f"policy tests did not finish within {timeout:g} s"]) from None
    return _results(done.returncode, done.stdout, done.stderr)


async def run_source_tests_isolated(source: PolicySource, engine: str = "embedded",
                                    timeout: float = 120.0) -> list[TestResult]:
    """``run_source_tests`` in a child process, for hot reload.

    Running a version's tests takes far longer than compiling it (a third of a second for the
    default policy): in a child process they neither stall the event loop nor share the engine's
    state with the engine serving requests, and a test that crashes the engine cannot take the
    proxy down. Raises PolicyLoadError when the tests cannot be run at all.
    """
    proc = await asyncio.create_subprocess_exec(
        *_CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(_request(source, engine)), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PolicyLoadError([f"policy tests did not finish within {timeout:g} s"]) from None
    return _results(proc.returncode, out, err)


def _child() -> int:
    """``python -m proxy.policy.testing``: a PolicySource as JSON on stdin, results on stdout."""
    doc = json.load(sys.stdin)
    source = PolicySource(tuple((m[0], m[1]) for m in doc["modules"]), doc["data"], doc["revision"])
    try:
        results = run_source_tests(source, doc.get("engine", "embedded"))
    except PolicyLoadError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    json.dump([[r.name, r.passed, r.detail] for r in results], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
