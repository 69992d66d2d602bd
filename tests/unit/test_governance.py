"""The governance modules' pure parts, with the real engine where one decides (no proxy)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.governance.auditlog import AuditLogError, Entry, read_entries
from proxy.governance.learn import learn
from proxy.governance.shadow import build_shadow
from proxy.governance.templates import Templater
from proxy.policy.embedded import PolicyLoadError
from proxy.policy.input import path_template
from proxy.policy.options import PolicyExtras

PATHS = [
    "/", "/v1/charges", "/v1/charges/123", "/v1/charges/00000000-0000-0000-0000-000000000007",
    "/v1/customers/cus_4f9a1b2c3d4e5f60/invoices", "/files/9f86d081884c7d659a2feaa0c55ad015",
    "/v1/abcdefghijklmnop", "/v1/abcdefghijklmnop1", "/v2/reports/2024/q3", "/a//b/", "/v1/charges/abc",
]


@pytest.mark.parametrize("path", PATHS)
def test_default_rules_are_request_path_template(path: str) -> None:
    assert Templater().template(path) == path_template(path)


def test_unrelated_routes_do_not_merge_and_patterns_are_configurable() -> None:
    t = Templater()
    assert t.template("/v1/charges/1") != t.template("/v1/customers/1")
    assert not t.matches("/v1/charges/{id}", "/v1/charges/1/refunds")
    assert not t.matches("/v1/charges/{id}", "/v1/charges/")
    assert not t.matches("/v1/charges/{id}", "/v1/charges/abc")
    custom = Templater.with_patterns(["cus_[a-z0-9]+"])
    assert custom.template("/v1/customers/cus_abc") == "/v1/customers/{id}"
    assert t.template("/v1/customers/cus_abc") == "/v1/customers/cus_abc"
    with pytest.raises(ValueError, match="look-around"):
        Templater.with_patterns(["(?=x)y"])
    with pytest.raises(ValueError, match=r"--id-pattern '\(': "):
        Templater.with_patterns(["("])


def record(i: int, ident: str | None, method: str, path: str, allow: bool = True) -> dict[str, object]:
    req = {"method": method, "scheme": "https", "host": "api.example", "port": 443, "path": path}
    return {"decision_id": f"d{i}", "time": f"2026-01-01T00:00:{i:02d}.000Z", "request": req,
            "input": {"identity": {"id": ident, "attestations": []}, "request": req},
            "result": {"allow": allow, "credential": "k"}}


def test_learn_counts_only_attested_allowed_decisions_and_the_last_new_tuple() -> None:
    entries = [Entry("a.log", i + 1, r) for i, r in enumerate([
        record(0, "w", "GET", "/v1/x/1"), record(1, "w", "GET", "/v1/x/2"), record(2, None, "GET", "/v1/x/3"),
        record(3, "w", "DELETE", "/v1/x/3", allow=False), record(4, "w", "POST", "/v1/x"),
        record(5, "w", "GET", "/v1/x/9"),
        {"decision_id": "d6", "time": "2026-01-01T00:00:06.000Z", "request": {}, "input": None, "result": None},
    ])]
    got = learn(entries)
    assert {(k.method, k.path): s.count for k, s in got.tuples.items()} == {("GET", "/v1/x/{id}"): 3,
                                                                          ("POST", "/v1/x"): 1}
    assert (got.anonymous, got.denied, got.undecided, got.decisions) == (1, 1, 1, 6)
    newest = got.last_new()
    assert newest is not None and newest[0].method == "POST" and newest[1].first == "2026-01-01T00:00:04.000Z"


def test_log_reader_skips_chain_records_and_names_bad_lines(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_text(json.dumps({"type": "start"}) + "\n" + json.dumps(record(0, "w", "GET", "/")) + "\n")
    assert [e.line for e in read_entries([log])] == [2]
    log.write_text(log.read_text() + "[1, 2]\n")
    with pytest.raises(AuditLogError, match=r"audit.log:3: not a Keyless audit record \(expected a JSON object\)"):
        read_entries([log])
    with pytest.raises(AuditLogError, match="cannot read"):
        read_entries([tmp_path / "missing.log"])


def test_a_shadow_that_errors_answers_and_one_that_fails_to_compile_is_a_config_problem(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text('package keyless.egress\n\nimport rego.v1\n\n'
                                     'decision := {"allow": "yes"} if input.request.path == "/x"\n')
    shadow = build_shadow(tmp_path, "embedded", "data.keyless.egress.decision", PolicyExtras())
    got = asyncio.run(shadow.decide({"request": {"path": "/x"}}))
    assert got.allow is False and got.error == "malformed_decision" and got.revision == shadow.revision
    assert shadow.errors == 1
    (tmp_path / "p.rego").write_text("package keyless.egress\n\ndecision := {\n")
    with pytest.raises(PolicyLoadError) as e:
        build_shadow(tmp_path, "embedded", "data.keyless.egress.decision", PolicyExtras())
    assert all(p.startswith("shadow: ") for p in e.value.problems) and "p.rego" in e.value.problems[0]
    with pytest.raises(PolicyLoadError, match="no policy directory or bundle file"):
        build_shadow(tmp_path / "nope", "embedded", "data.keyless.egress.decision", PolicyExtras())


def test_a_route_seen_with_two_credentials_is_flagged_and_its_tests_match_the_table(tmp_path: Path) -> None:
    from proxy.governance.learn import conflicts, emit, report
    from proxy.policy.testing import run_tests

    one, two = record(0, "w", "GET", "/v1/x/1"), record(1, "w", "GET", "/v1/x/2")
    two["result"] = {"allow": True, "credential": "other"}
    got = learn([Entry("a.log", 1, one), Entry("a.log", 2, two)])
    assert conflicts(got) == {"w GET api.example:443/v1/x/{id}": ["k", "other"]}
    assert "warning: w GET api.example:443/v1/x/{id} was called with 2 credentials (k, other)" in report(got)
    emit(got, tmp_path / "out")
    results = run_tests(tmp_path / "out")
    assert results and all(r.passed for r in results), [r for r in results if not r.passed]
