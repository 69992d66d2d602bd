"""Authoring tools (policy test / eval / explain) and the policy section of the config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.harness import REPO, base_config
from tests.policy_helpers import copy_policies, make_bundle
from tests.test_policy_opa import BILLING, doc


def keyless(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_policy_test_reports_each_test_and_fails_on_failure(tmp_path: Path) -> None:
    ok = keyless("policy", "test", "policies")
    assert ok.returncode == 0 and "PASS data.keyless.egress_test.test_anonymous_denied" in ok.stdout
    assert ok.stdout.strip().endswith("0 failed")
    policies = copy_policies(tmp_path / "p")
    rego = policies / "egress.rego"
    rego.write_text(rego.read_text().replace('"methods": {"GET", "HEAD"}', '"methods": {"HEAD"}'))
    bad = keyless("policy", "test", str(policies))
    assert bad.returncode == 1
    assert "FAIL data.keyless.egress_test.test_billing_reads_with_api_key" in bad.stdout


def test_the_guide_examples_pass_their_tests() -> None:
    out = keyless("policy", "test", "docs/policy-examples")
    assert out.returncode == 0 and out.stdout.strip().endswith("0 failed"), out.stdout


def test_explain_names_the_definition_that_decided(tmp_path: Path) -> None:
    (tmp_path / "allow.json").write_text(json.dumps(doc(BILLING)))
    (tmp_path / "anon.json").write_text(json.dumps(doc(None)))
    out = keyless("policy", "explain", "-i", str(tmp_path / "allow.json"))
    assert out.returncode == 0, out.stderr
    chosen = [line for line in out.stdout.splitlines() if "<- chosen" in line]
    assert len(chosen) == 1 and "body true" in chosen[0] and "granted[0].reason" in chosen[0]
    assert "produced by policies/egress.rego:" in out.stdout and "granted = [" in out.stdout
    anon = keyless("policy", "explain", "-i", str(tmp_path / "anon.json"))
    assert "caller has no attested" in [ln for ln in anon.stdout.splitlines() if "chosen" in ln][0]

    # Incremental definitions and a default, in a bundle archive.
    pol = tmp_path / "inc"
    pol.mkdir()
    (pol / "p.rego").write_text(
        "package keyless.egress\n\nimport rego.v1\n\n"
        'default decision := {"allow": false, "reason": "default"}\n\n'
        'decision := {"allow": true, "reason": "get"} if input.request.method == "GET"\n\n'
        'decision := {"allow": true, "reason": "post"} if {\n\tinput.request.method == "POST"\n}\n')
    (tmp_path / "b.tar.gz").write_bytes(make_bundle(pol, "inc-1"))
    (tmp_path / "post.json").write_text(json.dumps(doc(BILLING, "POST")))
    (tmp_path / "put.json").write_text(json.dumps(doc(BILLING, "PUT")))
    post = keyless("policy", "explain", "-i", str(tmp_path / "post.json"), "-d", str(tmp_path / "b.tar.gz"))
    assert "(revision inc-1)" in post.stdout
    assert "p.rego:9" in [ln for ln in post.stdout.splitlines() if "chosen" in ln][0]
    put = keyless("policy", "explain", "-i", str(tmp_path / "put.json"), "-d", str(pol))
    assert "p.rego:5" in [ln for ln in put.stdout.splitlines() if "chosen" in ln][0]


def test_eval_prints_the_decision(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text(json.dumps(doc(BILLING, "POST", path="/v1/reports")))
    out = keyless("policy", "eval", "-i", str(tmp_path / "in.json"))
    assert json.loads(out.stdout)["credential"] == "workload-jwt"


def test_policy_config_mistakes_each_name_their_key(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, policy={
        "engine": "opa", "opa": {"url": "ftp://x", "timeout_ms": 0, "typo": 1},
        "bundle": {"path": "a.tar.gz", "url": "http://b/x"},
        "cache": {"max_entries": -1}, "reload": {"interval": "soon"}, "posture": {}})
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(cfg))
    out = keyless("check", "-c", str(tmp_path / "k.yaml"))
    assert out.returncode == 2
    for key in ("policy.opa.url", "policy.opa.timeout_ms", "policy.opa.typo", "policy.bundle:",
                "policy.cache.max_entries", "policy.reload.interval", "policy.posture:"):
        assert key in out.stderr, key


def test_check_with_opa_needs_no_local_policy(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, policy={"engine": "opa", "opa": {"url": "http://127.0.0.1:1"}})
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(cfg))
    out = keyless("check", "-c", str(tmp_path / "k.yaml"))
    assert out.returncode == 0, out.stderr
