"""proxy.policy.fastinput builds the same rego-cpp input as regopy.Input, as the policy sees it."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import regopy

from proxy.policy.embedded import PolicySource, compile_modules, evaluate
from proxy.policy.fastinput import InputError, set_input

ECHO = """package bench.echo
import rego.v1
doc := input
kinds := {k: type_name(v) | some k, v in input}
"""

DOCS: list[Any] = [
    {"source": {"address": "127.0.0.1", "port": 50312},
     "identity": {"id": "spiffe://example.org/ns/ci/sa/builder",
                  "attestations": [{"provider": "ci", "type": "jwt", "id": None, "facts": {"sub": "x", "n": 3}}]},
     "request": {"method": "GET", "scheme": "https", "host": "api.github.com", "port": 443, "path": "/repos/a",
                 "query": {"page": ["2", "3"]}, "headers": {"user-agent": "curl/8", "x-unicode": "h\u00e9llo \u2603"}},
     "context": {"time": "2026-11-22T10:00:00Z", "mode": "regular"}},
    {"empty_obj": {}, "empty_list": [], "tuple": (1, "two", None), "floats": [0.5, -1.25, 1e300],
     "bools": [True, False], "big": 2**62, "neg": -7, "set": frozenset({"a", "b"}),
     "ordered": OrderedDict([("z", 1), ("a", 2)]), "nested": [[{"k": [None]}]]},
    "just a string",
    42,
    None,
]


def _engine() -> tuple[regopy.Interpreter, regopy.Bundle]:
    return compile_modules(PolicySource((("echo.rego", ECHO),), {}, "test"), ["bench/echo/doc", "bench/echo/kinds"])


def _via(interp: regopy.Interpreter, bundle: regopy.Bundle, entry: str) -> Any:
    impl = regopy.rego_shared.rego_bundle_query_entrypoint(interp._impl, bundle._impl, entry)
    try:
        return json.loads(regopy.rego_shared.rego_output_string(impl))
    finally:
        regopy.rego_shared.rego_free_output(impl)


@pytest.mark.parametrize("doc", DOCS, ids=range(len(DOCS)))
def test_same_input_as_regopy(doc: Any) -> None:
    interp, bundle = _engine()
    seen = []
    for setter in (lambda: interp.set_input(regopy.Input(doc)), lambda: set_input(interp._impl, doc)):
        setter()
        seen.append((_via(interp, bundle, "bench/echo/doc"), _via(interp, bundle, "bench/echo/kinds")))
    assert seen[0] == seen[1]


def test_evaluate_uses_it_and_fails_closed_on_unconvertible_values() -> None:
    interp, bundle = _engine()
    defined, value = evaluate(interp, bundle, "bench/echo/doc", {"a": [1, "b"]})
    assert defined and value == {"a": [1, "b"]}
    with pytest.raises(InputError):
        set_input(interp._impl, {"a": object()})
    with pytest.raises(ValueError):
        evaluate(interp, bundle, "bench/echo/doc", {"when": Path("/x")})


LEAK_PROBE = """
import aiohttp  # loads libstdc++ (through frozenlist) before regopy, as `keyless run` does
from pathlib import Path
from proxy.policy.embedded import EmbeddedEngine

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

e = EmbeddedEngine.from_dir(Path({policies!r}), "data.keyless.egress.decision")
doc = {{"source": {{"address": "127.0.0.1", "port": 1}},
        "identity": {{"id": "spiffe://demo.local/billing", "attestations": []}},
        "request": {{"method": "GET", "scheme": "http", "host": "127.0.0.1", "port": 80, "path": "/v1/x",
                    "query": {{}}, "headers": {{"user-agent": "t"}}}},
        "context": {{"time": "2026-01-01T00:00:00Z", "mode": "regular"}}}}
for _ in range(1000):
    e.decide_sync(doc)
before = rss_mb()
for _ in range(6000):
    e.decide_sync(doc)
print(rss_mb() - before)
"""


def test_no_native_leak_after_cpp_extension() -> None:
    """rego-cpp leaked ~5 KB per evaluation when another C++ extension loaded first (30 MB here)."""
    import subprocess
    import sys

    policies = Path(__file__).resolve().parent.parent / "policies"
    out = subprocess.run([sys.executable, "-c", LEAK_PROBE.format(policies=str(policies))],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 8, f"RSS grew {out.stdout.strip()} MB over 6,000 decisions"
