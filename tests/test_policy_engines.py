"""The engine registry: every embedded engine gives the same decisions; errors name their place."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.policy import PolicyUnavailable
from proxy.policy.embedded import EmbeddedEngine, PolicyLoadError
from proxy.policy.engines import ALIASES, DEFAULT_EMBEDDED, ENGINES, resolve
from proxy.policy.runtime import build_policy
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit
from tests.test_policy_opa import BILLING, GUIDE_EXAMPLES, QUERY, TABLE, _essence, doc, docs_inputs, sample_inputs

EMBEDDED = [name for name, spec in ENGINES.items() if spec.compile is not None]


def keyless(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_registry_shape() -> None:
    assert resolve("embedded") is ENGINES[DEFAULT_EMBEDDED] and DEFAULT_EMBEDDED == "regorus"
    assert set(ALIASES.values()) <= set(ENGINES) and resolve("opa").compile is None
    for spec in ENGINES.values():
        assert resolve(spec.tests).compile is not None  # every engine's tests run somewhere


@pytest.mark.parametrize("engine", EMBEDDED)
def test_every_embedded_engine_gives_the_reference_decisions(engine: str) -> None:
    """The default policy and every guide example, on every input of the cross-engine tables,
    decided by each embedded engine exactly as by regorus's interpreter (and so, by
    tests/test_policy_opa.py, as by rego-cpp behind the OPA stand-in)."""
    inputs = TABLE + docs_inputs() + sample_inputs(REPO / "policies") + sample_inputs(REPO / "docs/policy-examples")
    ref = EmbeddedEngine.from_dir(REPO / "policies", QUERY, "regorus")
    got = EmbeddedEngine.from_dir(REPO / "policies", QUERY, engine)
    assert got.engine == engine and got.revision == ref.revision
    assert [_essence(got.decide_sync(d)) for d in inputs] == [_essence(ref.decide_sync(d)) for d in inputs]
    assert {got.decide_sync(d).allow for d in inputs} == {True, False}
    examples = REPO / "docs/policy-examples"
    for name in GUIDE_EXAMPLES:
        query = f"data.keyless.examples.{name}.decision"
        a = EmbeddedEngine.from_dir(examples, query, "regorus")
        b = EmbeddedEngine.from_dir(examples, query, engine)
        for d in inputs:
            d = {**d, "context": {**d["context"], "time_ns": 1795512600000000000}}
            assert _essence(a.decide_sync(d)) == _essence(b.decide_sync(d)), (name, d)


ELSE_AFTER_ITERATION = """package keyless.egress
import rego.v1
safe := ["/v1/"]
blocked := false if {
	some prefix in safe
	startswith(input.request.path, prefix)
} else := true
decision := {"allow": true, "reason": "not blocked"} if not blocked
"""


def test_the_default_engine_takes_an_else_after_an_iteration_that_found_nothing(tmp_path: Path) -> None:
    """Why the default is regorus's interpreter: its RVM (0.13.0) leaves ``blocked`` undefined
    instead of true for /admin, and ``not blocked`` then ALLOWS what OPA denies. Pinned so that
    a regorus that fixes it makes this test say so."""
    (tmp_path / "p.rego").write_text(ELSE_AFTER_ITERATION)
    admin, v1 = doc(BILLING, "GET", path="/admin"), doc(BILLING, "GET", path="/v1/x")
    for engine in ("embedded", "regorus"):
        e = EmbeddedEngine.from_dir(tmp_path, QUERY, engine)
        assert (e.decide_sync(admin).allow, e.decide_sync(v1).allow) == (False, True), engine
    rvm = EmbeddedEngine.from_dir(tmp_path, QUERY, "regorus-rvm")
    assert rvm.decide_sync(admin).allow is True, \
        "regorus's RVM now takes the else: reconsider making it the default (proxy/policy/engines.py)"


def test_the_rvm_refuses_what_it_would_get_wrong(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text(
        "package keyless.egress\n\nimport rego.v1\n\ndefault allowed(_) := false\n\n"
        'allowed(h) if h == "api.example"\n\n'
        'decision := {"allow": allowed(input.request.host)}\n')
    with pytest.raises(PolicyLoadError) as err:
        EmbeddedEngine.from_dir(tmp_path, QUERY, "regorus-rvm")
    assert err.value.problems == [f"{tmp_path}/p.rego:5: a default function (the RVM evaluates it as undefined) "
                                  "is not supported by policy.engine regorus-rvm; use policy.engine: regorus"]
    interp = EmbeddedEngine.from_dir(tmp_path, QUERY, "regorus")
    assert interp.decide_sync(doc(BILLING, host="other.example")).allow is False
    assert interp.decide_sync(doc(BILLING, host="api.example")).allow is True


PANIC_POLICY = """package keyless.egress

import rego.v1

# regorus 0.13.0 panics in Rust on strings.count with an empty needle.
decision := {"allow": strings.count(input.request.path, input.request.headers["x-needle"]) > 0} if {
	input.request.headers["x-needle"]
} else := {"allow": true, "reason": "ok"}
"""


@pytest.mark.parametrize("engine", EMBEDDED)
def test_an_engine_panic_is_a_policy_error(tmp_path: Path, engine: str) -> None:
    (tmp_path / "p.rego").write_text(PANIC_POLICY)
    e = EmbeddedEngine.from_dir(tmp_path, QUERY, engine)
    with pytest.raises(PolicyUnavailable) as err:
        e.decide_sync(doc(BILLING, headers={"x-needle": ""}))
    assert err.value.reason == "policy_error" and "window size must be non-zero" in err.value.message
    assert e.decide_sync(doc(BILLING)).allow is True  # the engine is still usable


def test_an_engine_panic_refuses_the_request_and_the_proxy_stays_up(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.rego").write_text(PANIC_POLICY)
    k = Keyless(tmp_path, base_config(tmp_path, upstream, policy={"dir": str(tmp_path / "policies")})).start()
    try:
        env = k.client_env()
        panicked = subprocess.run(["curl", "-sS", "-H", "X-Needle;", upstream.url("/v1/x")],
                                  env=env, capture_output=True, text=True, timeout=30)
        after = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", upstream.url("/v1/y")],
                               env=env, capture_output=True, text=True, timeout=30)
        assert k.proc is not None and k.proc.poll() is None
    finally:
        k.stop()
    assert json.loads(panicked.stdout)["error"] == "policy_unavailable" and after.stdout == "200"
    records = wait_for_audit(k, 2)
    assert [r["outcome"].get("reason") for r in records][0] == "policy_error"
    assert upstream.requests_seen() == ["/v1/y"] if hasattr(upstream, "requests_seen") else True


TYPO_POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false}

decision := {"allow": true, "reason": strings.lowr(input.request.host)} if input.request.port == 1
"""

TYPO_TEST = """package keyless.egress_test

import rego.v1

import data.keyless.egress

test_denied if {
	not egress.decision.allow with input.request as {"port": 443, "host": "h"}
}

test_typo_in_test if {
	strings.uper("a") == "A"
}
"""


def test_a_misspelt_builtin_is_named_with_its_place_by_every_command(tmp_path: Path) -> None:
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "egress.rego").write_text(TYPO_POLICY)
    where = f"{pol}/egress.rego:7:51: Unknown function: 'strings.lowr'"
    (tmp_path / "in.json").write_text(json.dumps(doc(BILLING)))
    for cmd in (["policy", "eval", "-i", str(tmp_path / "in.json"), "-d", str(pol)],
                ["policy", "eval", "-i", str(tmp_path / "in.json"), "-d", str(pol), "--engine", "regorus"]):
        out = keyless(*cmd)
        assert out.returncode == 2 and where in out.stderr, (cmd, out.stderr)
    (pol / "egress_test.rego").write_text(TYPO_TEST)
    out = keyless("policy", "test", str(pol))
    assert out.returncode == 2 and out.stderr.strip() == where, out.stderr
    (pol / "egress.rego").write_text(TYPO_POLICY.replace("strings.lowr", "lower"))
    out = keyless("policy", "test", str(pol))
    assert out.returncode == 1 and "PASS data.keyless.egress_test.test_denied" in out.stdout
    assert (f"FAIL data.keyless.egress_test.test_typo_in_test: error: {pol}/egress_test.rego:12:17: "
            "could not find function strings.uper") in out.stdout, out.stdout


def test_one_revision_everywhere(tmp_path: Path, upstream: Upstream) -> None:
    """`policy explain`, `policy eval`, `check`, /readyz and the audit log name one revision."""
    (tmp_path / "in.json").write_text(json.dumps(doc(BILLING)))
    explained = keyless("policy", "explain", "-i", str(tmp_path / "in.json"))
    m = re.search(r"\(revision (sha256:[0-9a-f]{12})\)", explained.stdout)
    assert m, explained.stdout
    revision = m.group(1)
    evaluated = json.loads(keyless("policy", "eval", "-i", str(tmp_path / "in.json")).stdout)
    assert evaluated["revision"] == revision
    (tmp_path / "key").write_text("canary-rev-key\n")
    cfg = base_config(tmp_path, upstream,
                      credentials={"demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")},
                                   "workload-jwt": {"type": "jwt"}})
    k = Keyless(tmp_path, cfg)
    checked = keyless("check", "-c", str(k.config_file), cwd=tmp_path)
    assert f"policy revision {revision}" in checked.stdout, checked.stdout + checked.stderr
    k.start()
    try:
        ready = requests.get(k.admin_url + "/readyz", timeout=5).json()
        requests.get(upstream.url("/v1/invoices"), proxies={"https": k.proxy_url}, verify=str(k.ca_cert), timeout=10)
    finally:
        k.stop()
    assert ready["policy"]["revision"] == revision
    assert wait_for_audit(k, 1)[0]["policy_revision"] == revision


def test_policy_eval_prints_the_whole_decision(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text(json.dumps(doc(BILLING, path="/v1/invoices/42")))
    out = json.loads(keyless("policy", "eval", "-i", str(tmp_path / "in.json")).stdout)
    assert out["allow"] is True and out["credential"] == "demo-api" and out["params"] == {}
    assert out["cache"] == {"ttl": 60, "vary": ["context.posture.workload", "identity", "request.host",
                                                "request.method", "request.path_template"]}
    (tmp_path / "deny.json").write_text(json.dumps(doc(BILLING, "DELETE")))
    out = json.loads(keyless("policy", "eval", "-i", str(tmp_path / "deny.json")).stdout)
    assert out["allow"] is False and out["cache"] == {"ttl": 60}


@pytest.mark.parametrize("engine", ["regorus", "embedded"])
def test_each_engine_runs_behind_the_proxy(tmp_path: Path, engine: str) -> None:
    runtime = build_policy(engine, REPO / "policies", QUERY, _extras())
    assert runtime.status()["engine"] == resolve(engine).name

    async def ask() -> Any:
        return [await runtime.engine.decide(d) for d in TABLE]

    assert [d.allow for d in asyncio.run(ask())][:3] == [True, True, True]


def _extras() -> Any:
    from proxy.policy.options import PolicyExtras, ReloadOptions

    return PolicyExtras(reload=ReloadOptions(enabled=False, run_tests=False))


CONFLICT_POLICY = """package keyless.egress

import rego.v1

by_host := {g.host: g.reason | some g in [{"host": "a", "reason": "one"}, {"host": "a", "reason": "two"}]}

default decision := {"allow": false, "reason": "no"}

decision := {"allow": true, "reason": by_host[input.request.host]} if input.request.host == "a"
"""

CONFLICT_TEST = """package keyless.p_test

import rego.v1

vary_samples := {"data.keyless.egress.decision": [{"source": {"address": "10.0.0.1", "port": 1},
	"identity": {"id": null, "attestations": []},
	"request": {"method": "GET", "scheme": "https", "host": "a", "port": 443, "path": "/", "query": {}, "headers": {}},
	"context": {"time": "2026-11-22T10:00:00Z", "mode": "regular"}}]}

test_nothing if true
"""


def test_policy_test_catches_where_the_rvm_and_the_interpreter_disagree(tmp_path: Path) -> None:
    """An object comprehension with a conflicting key is an error in OPA and on the interpreter;
    regorus 0.13.0's VM answers with one of the values. The samples catch it."""
    (tmp_path / "p.rego").write_text(CONFLICT_POLICY)
    (tmp_path / "p_test.rego").write_text(CONFLICT_TEST)
    out = keyless("policy", "test", str(tmp_path), "--engine", "regorus-rvm")
    assert out.returncode == 1
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("FAIL"))
    assert "regorus-rvm decides (True, {'allow': True, 'reason': 'two'}) but regorus decides ('error'" in line
    assert line.endswith("use policy.engine: regorus")
    assert keyless("policy", "test", str(tmp_path)).returncode == 0  # the default engine
