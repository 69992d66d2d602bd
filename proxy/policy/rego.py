"""Microsoft's regorus (Rust) as the embedded Rego engine: its RVM and its interpreter.

Both compile a :class:`PolicySource` once and then evaluate rules for one input at a time:

- :class:`RvmProgram` compiles the rules to regorus's register VM (``Program.compile_from_modules``
  + ``Rvm``): about 70 us per decision of the default policy, against about 200 us for the
  interpreter and 1.2 ms for rego-cpp. It does not compile ``with`` (so it cannot run tests) and
  regorus 0.13.0's compiler gets some Rego wrong (``default`` functions are undefined, see
  :data:`RVM_UNSUPPORTED`): a policy using those is refused when it loads, naming the engine that
  runs it.
- :class:`Interpreter` walks the AST (``Engine.eval_rule``): the whole language regorus has,
  ``with`` included, so it runs ``*_test.rego`` for both.

Both answer ``(defined, value)``; regorus marks an undefined rule with the string
``"<undefined>"``, so a rule whose value is that string reads as undefined (a deny). Every regorus
error is one line ``file:line:col: message``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from proxy.policy.source import PolicyLoadError, PolicySource

# regorus's errors come from Rust's anyhow, which captures (and symbolises) a backtrace whenever
# RUST_BACKTRACE is set: milliseconds per policy error, and noise in every message.
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

import regorus  # noqa: E402

_UNDEFINED = '"<undefined>"'
_WHERE = re.compile(r"-->\s*(.+?):(\d+):(\d+)")
_MESSAGE = re.compile(r"^error:\s*(.+)$", re.MULTILINE)

# Constructs regorus 0.13.0's RVM compiler accepts but evaluates unlike OPA (found by running
# OPA's conformance cases on it): refused at load, so a policy never gets a wrong answer from it.
RVM_UNSUPPORTED: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^default\s+[\w.\[\]\"]+\(", re.MULTILINE),
     "a default function (the RVM evaluates it as undefined)"),
)


def describe(error: BaseException) -> str:
    """One line: ``file:line:col: message`` when regorus names a place, else its first line."""
    text = str(error).split("Stack backtrace:", 1)[0].split("Caused by:", 1)[0]
    where = _WHERE.search(text)
    message = _MESSAGE.search(text)
    if where and message:
        return f"{where.group(1)}:{where.group(2)}:{where.group(3)}: {message.group(1).strip()}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


def _engine_error(e: BaseException) -> bool:
    # A Rust panic inside regorus (strings.count(s, "") in 0.13.0) reaches Python as pyo3's
    # PanicException, a BaseException: it must become a policy error, never escape the
    # fail-closed guards (which catch Exception). The RVM is reset by every run and stays usable;
    # the interpreter is replaced by a fresh copy (tests/test_policy_engines.py checks both).
    return isinstance(e, RuntimeError | TypeError | ValueError) or type(e).__name__ == "PanicException"


def _value(out: str) -> tuple[bool, Any]:
    if out == _UNDEFINED:
        return False, None
    return True, json.loads(out)


class RvmProgram:
    """The rules compiled to regorus's RVM; evaluation is one VM run over a JSON input."""

    def __init__(self, source: PolicySource, rules: Sequence[str]) -> None:
        problems = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {why} is not supported by "
                    "policy.engine regorus-rvm; use policy.engine: regorus"
                    for name, text in source.modules for pattern, why in RVM_UNSUPPORTED
                    for m in pattern.finditer(text)]
        if problems:
            raise PolicyLoadError(problems)
        data = json.dumps(source.data)
        try:
            program = regorus.Program.compile_from_modules(data, list(source.modules), list(rules))
            self._vm = regorus.Rvm()
            self._vm.load_program(program)
            # compile_from_modules does not carry the data into the VM: it must be set here.
            self._vm.set_data_json(data)
        except BaseException as e:
            if not _engine_error(e):
                raise
            raise PolicyLoadError([describe(e)]) from None

    def evaluate(self, rule: str, input_doc: Any) -> tuple[bool, Any]:
        """(defined, value) of ``rule``; raises ValueError on an evaluation error."""
        try:
            self._vm.set_input_json(json.dumps(input_doc))
            return _value(self._vm.execute_entry_point(rule))
        except BaseException as e:
            if not _engine_error(e):
                raise
            raise ValueError(describe(e)) from None


class Interpreter:
    """regorus's tree-walking interpreter: slower, and the whole of what regorus implements."""

    def __init__(self, source: PolicySource, rules: Sequence[str]) -> None:
        try:
            self._loaded = regorus.Engine()
            for name, text in source.modules:
                self._loaded.add_policy(name, text)
            self._loaded.add_data_json(json.dumps(source.data))
        except BaseException as e:
            if not _engine_error(e):
                raise
            raise PolicyLoadError([describe(e)]) from None
        self._engine = self._loaded.clone()
        self.rules = tuple(rules)

    def evaluate(self, rule: str, input_doc: Any) -> tuple[bool, Any]:
        try:
            self._engine.set_input_json(json.dumps(input_doc))
            return _value(self._engine.eval_rule_as_json(rule))
        except BaseException as e:
            if not _engine_error(e):
                raise
            if type(e).__name__ == "PanicException":
                # A panic unwinds past the interpreter's bookkeeping (the next evaluation of the
                # rule reports "recursion detected"): continue on a fresh copy of the parsed policy.
                self._engine = self._loaded.clone()
            raise ValueError(describe(e)) from None


def check_compiles(source: PolicySource, rules: Sequence[str]) -> None:
    """Compile ``rules`` with the RVM compiler only to find mistakes with their place.

    The interpreter reports an unknown function only when it evaluates the call, so a misspelt
    built-in in a branch no test reaches would go unnoticed; the compiler checks every rule it
    compiles. Features the compiler lacks (``with``) are not mistakes and are not reported.
    """
    try:
        regorus.Program.compile_from_modules(json.dumps(source.data), list(source.modules), list(rules))
    except BaseException as e:
        if not _engine_error(e):
            raise
        line = describe(e)
        if "not supported by the compiler" not in line:
            raise PolicyLoadError([line]) from None
