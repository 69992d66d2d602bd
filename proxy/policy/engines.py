"""Policy engines: one registry, like ``proxy.credentials.CREDENTIALS``; ``policy.engine`` picks one.

An embedded engine compiles a policy version once (``compile(source, rules)``) and then answers
``evaluate(rule, input) -> (defined, value)`` in process; ``policy.dir`` or ``policy.bundle``
feed it, with hot reload. A server engine (``opa``) evaluates elsewhere and has no ``compile``.
Every engine's ``*_test.rego`` tests run on ``tests``, an embedded engine that implements ``with``.

``embedded`` names the default embedded engine, so configs written before the registry keep
working. The default is the fastest engine that evaluates every policy right: regorus's
interpreter (docs/policy.md, "Engines"; figures in docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.policy.rego import Interpreter, RvmProgram
from proxy.policy.source import PolicyLoadError, PolicySource


class Compiled(Protocol):
    def evaluate(self, rule: str, input_doc: Any) -> tuple[bool, Any]:
        """(defined, value) of the rule ``data.a.b`` for ``input_doc``; ValueError on an error."""
        ...


@dataclass(frozen=True, slots=True)
class EngineSpec:
    name: str
    summary: str
    # Raises PolicyLoadError with ``file:line:col: message`` lines. None: a server engine.
    compile: Callable[[PolicySource, Sequence[str]], Compiled] | None
    tests: str = "regorus"  # the embedded engine that runs this engine's *_test.rego files


ENGINES: dict[str, EngineSpec] = {
    spec.name: spec for spec in (
        EngineSpec("regorus-rvm", "regorus (Rust) compiled to its register VM, in process", RvmProgram),
        EngineSpec("regorus", "regorus's interpreter, in process: all of regorus's Rego, `with` included",
                   Interpreter),
        EngineSpec("opa", "an OPA server, over its REST data API", None),
    )
}
# The interpreter, not the faster RVM: regorus 0.13.0's RVM skips an ``else`` whose first body
# iterates (``some x in xs``) and finds nothing, leaving the rule undefined where OPA takes the
# else; under ``not`` that can turn a deny into an allow. The RVM stays selectable
# (``policy.engine: regorus-rvm``) for policies known to avoid it.
DEFAULT_EMBEDDED = "regorus"
ALIASES: dict[str, str] = {"embedded": DEFAULT_EMBEDDED}
NAMES: tuple[str, ...] = (*ALIASES, *ENGINES)


def resolve(name: str) -> EngineSpec:
    """The spec for a ``policy.engine`` value (an alias resolves to the engine it names)."""
    return ENGINES[ALIASES.get(name, name)]


def compile_modules(source: PolicySource, rules: Sequence[str], engine: str = DEFAULT_EMBEDDED) -> Compiled:
    spec = resolve(engine)
    if spec.compile is None:
        raise PolicyLoadError([f"policy.engine {engine} does not evaluate in process"])
    return spec.compile(source, rules)
