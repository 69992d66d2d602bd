"""``keyless policy test``: run ``test_`` rules in ``*_test.rego`` files, as ``opa test`` does."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
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


_CHILD = [sys.executable, "-m", "proxy.policy.testing"]


def _request(source: PolicySource) -> bytes:
    return json.dumps({"modules": [list(m) for m in source.modules], "data": source.data,
                       "revision": source.revision}).encode()


def _results(code: int | None, out: bytes, err: bytes) -> list[TestResult]:
    if code != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise PolicyLoadError(lines if code == 2 and lines else [f"policy tests crashed (exit code {code})"])
    return [TestResult(name, passed, detail) for name, passed, detail in json.loads(out)]


def run_source_tests_isolated_sync(source: PolicySource, timeout: float = 120.0) -> list[TestResult]:
    """``run_source_tests`` in a child process (at start and in ``keyless check``).

    rego-cpp aborts the whole process on some test constructs (``with input as {...}`` when the
    policy calls built-ins): in a child, that is a rejected version, not a dead proxy.
    """
    try:
        done = subprocess.run(_CHILD, input=_request(source), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PolicyLoadError([f"policy tests did not finish within {timeout:g} s"]) from None
    return _results(done.returncode, done.stdout, done.stderr)


async def run_source_tests_isolated(source: PolicySource, timeout: float = 120.0) -> list[TestResult]:
    """``run_source_tests`` in a child process, for hot reload.

    Running a version's tests takes far longer than compiling it (a third of a second for the
    default policy): in a child process they neither stall the event loop nor share rego-cpp's
    state with the engine serving requests, and a test that crashes rego-cpp cannot take the
    proxy down. Raises PolicyLoadError when the tests cannot be run at all.
    """
    proc = await asyncio.create_subprocess_exec(
        *_CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(_request(source)), timeout)
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
        results = run_source_tests(source)
    except PolicyLoadError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    json.dump([[r.name, r.passed, r.detail] for r in results], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
