"""engine: opa against the OPA stand-in (tests/opa_standin.py; no opa binary exists here)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.demo import free_port
from proxy.model import Decision
from proxy.policy import PolicyUnavailable
from proxy.policy.embedded import EmbeddedEngine
from proxy.policy.input import path_template
from proxy.policy.opa import OpaEngine
from proxy.policy.options import OpaOptions
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit
from tests.policy_helpers import OpaProcess, start_unready

QUERY = "data.keyless.egress.decision"
BILLING = "spiffe://demo.local/billing"


def doc(ident: str | None, method: str = "GET", host: str = "localhost", path: str = "/v1/invoices",
        posture: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    ctx: dict[str, Any] = {"time": "2026-11-22T10:00:00Z", "mode": "regular"}
    if posture is not None:
        ctx["posture"] = posture
    return {
        "source": {"address": "127.0.0.1", "port": 40000},
        "identity": {"id": ident, "attestations": [{"provider": "loopback", "type": "source_ip", "id": ident,
                                                     "facts": {"cidr": "127.0.0.0/8"}}] if ident else []},
        "request": {"method": method, "scheme": "https", "host": host, "port": 443, "path": path,
                    "path_template": path_template(path),
                    "query": {"page": ["2"]}, "headers": headers or {"user-agent": "curl/8"}},
        "context": ctx,
    }


TABLE = [
    doc(BILLING),
    doc(BILLING, "HEAD", "127.0.0.1", "/v1/x"),
    doc(BILLING, "POST", path="/v1/reports"),
    doc(BILLING, "POST", path="/v1/invoices"),
    doc(BILLING, "DELETE"),
    doc(BILLING, host="evil.example"),
    doc(BILLING, path="/admin"),
    doc("spiffe://demo.local/other"),
    doc(None),
    doc(BILLING, posture={"workload": {"status": "fail"}, "stale": False, "age_seconds": 1.0}),
    doc(BILLING, posture={"workload": {"status": "pass"}, "stale": False, "age_seconds": 1.0}),
    doc(BILLING, posture={"workload": None, "stale": True, "age_seconds": None}),
    doc(BILLING, path="/v1/invoices/8812"),
    doc(BILLING, "PUT", "s3.us-east-1.amazonaws.com", "/acme-invoices/2026/11.pdf"),
]


def sample_inputs(directory: Path) -> list[dict[str, Any]]:
    """The ``vary_samples`` inputs of a policy directory's tests (full inputs, as Keyless builds them)."""
    from proxy.policy.embedded import compile_modules, read_policy_dir

    source = read_policy_dir(directory, with_tests=True)
    found: list[dict[str, Any]] = []
    for name, text in source.modules:
        pkg = re.search(r"^package\s+([\w.]+)", text, re.MULTILINE)
        if name.endswith("_test.rego") and pkg and re.search(r"^vary_samples\b", text, re.MULTILINE):
            rule = f"data.{pkg.group(1)}.vary_samples"
            _, samples = compile_modules(source, [rule], "regorus").evaluate(rule, {})
            for docs in samples.values():
                for d in docs:
                    d["request"].setdefault("path_template", path_template(d["request"]["path"]))
                    found.append(d)
    assert found, f"no vary_samples in {directory}"
    return found


def docs_inputs() -> list[dict[str, Any]]:
    """Every input document shown in docs/policy.md (```json blocks with a "request" and an "identity")."""
    text = (REPO / "docs/policy.md").read_text()
    found = []
    for block in text.split("```json")[1:]:
        try:
            d = json.loads(block.split("```", 1)[0])
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and "request" in d and "identity" in d:
            found.append(d)
    assert found, "docs/policy.md shows no input document"
    return found


@pytest.fixture
def opa() -> Iterator[OpaProcess]:
    o = OpaProcess(REPO / "policies").start()
    yield o
    o.stop()


def _essence(d: Decision) -> tuple[Any, ...]:
    return (d.allow, d.reason, d.credential, dict(d.params), d.cache_ttl, d.vary)


def test_both_engines_give_identical_decisions(opa: OpaProcess) -> None:
    embedded = EmbeddedEngine.from_dir(REPO / "policies", QUERY)

    async def ask_opa(table: list[dict[str, Any]]) -> list[Decision]:
        engine = OpaEngine(OpaOptions(url=opa.url, timeout_ms=2000), QUERY)
        try:
            return [await engine.decide(d) for d in table]
        finally:
            await engine.aclose()

    table = TABLE + docs_inputs() + sample_inputs(REPO / "policies")
    remote = asyncio.run(ask_opa(table))
    local = [embedded.decide_sync(d) for d in table]
    assert [_essence(d) for d in remote] == [_essence(d) for d in local]
    assert {d.allow for d in local} == {True, False}
    # OPA's decision id and the bundle revision come back with every answer.
    assert all(d.engine_decision_id for d in remote)
    assert {d.revision for d in remote} == {embedded.revision}


def test_undefined_path_is_a_deny_with_opa_semantics(opa: OpaProcess) -> None:
    # OPA answers 200 with no "result" for an undefined document: a deny, never an error or allow.
    raw = requests.post(opa.url + "/v1/data/keyless/nothing/here", json={"input": TABLE[0]}, timeout=5)
    assert raw.status_code == 200 and "result" not in raw.json() and raw.json()["decision_id"]

    async def ask() -> Decision:
        engine = OpaEngine(OpaOptions(url=opa.url, path="keyless/nothing/here"), QUERY)
        try:
            return await engine.decide(TABLE[0])
        finally:
            await engine.aclose()

    d = asyncio.run(ask())
    assert d.allow is False and d.reason == "policy decision is undefined" and d.engine_decision_id


@pytest.mark.parametrize(("fault", "reason"), [
    ("slow", "opa_timeout"), ("500", "opa_http_error"), ("not-json", "opa_malformed_response"),
    ("malformed", "malformed_decision"), ("down", "opa_unreachable"),
])
def test_faults_refuse_within_the_timeout(opa: OpaProcess, fault: str, reason: str) -> None:
    url = f"http://127.0.0.1:{free_port()}" if fault == "down" else opa.url

    async def ask() -> tuple[PolicyUnavailable, float]:
        engine = OpaEngine(OpaOptions(url=url, timeout_ms=200), QUERY)
        try:
            started = time.perf_counter()
            with pytest.raises(PolicyUnavailable) as err:
                await engine.decide(doc(BILLING, headers={"x-standin-fault": fault}))
            return err.value, time.perf_counter() - started
        finally:
            await engine.aclose()

    error, elapsed = asyncio.run(ask())
    assert error.code == "policy_unavailable" and error.reason == reason
    assert elapsed < 1.0  # the 200 ms deadline plus scheduling on a loaded machine; "slow" answers after 2 s


def _curl(k: Keyless, url: str, *headers: str) -> tuple[int, dict[str, Any] | None, float]:
    args = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}"]
    for h in headers:
        args += ["-H", h]
    started = time.perf_counter()
    out = subprocess.run([*args, url], env=k.client_env(), capture_output=True, text=True, timeout=30)
    elapsed = time.perf_counter() - started
    body, _, code = out.stdout.rpartition("\n")
    try:
        parsed = json.loads(body) if body else None
    except json.JSONDecodeError:
        parsed = None
    return int(code or 0), parsed, elapsed


def test_keyless_with_opa_end_to_end(tmp_path: Path, upstream: Upstream, opa: OpaProcess) -> None:
    (tmp_path / "key").write_text("canary-opa-key-42\n")
    cfg = base_config(tmp_path, upstream,
                      policy={"engine": "opa", "opa": {"url": opa.url, "timeout_ms": 800}},
                      credentials={"demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")},
                                   "workload-jwt": {"type": "jwt"}})
    k = Keyless(tmp_path, cfg).start()
    try:
        # The default policy caches its allows by path template (cache.vary): every request here
        # names its own template ("r7" is no identifier) so that each one is really decided by
        # (the stand-in for) OPA.
        paths = iter(range(100))

        def fresh() -> str:
            return upstream.url(f"/v1/r{next(paths)}")

        # A slow OPA answer for one request is refused within the timeout while others proceed.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            slow = pool.submit(_curl, k, fresh(), "X-Standin-Fault: slow", "X-Standin-Delay: 6")
            fast = [pool.submit(_curl, k, fresh()) for _ in range(12)]
            fast_results = [f.result() for f in fast]
            slow_status, slow_body, slow_elapsed = slow.result()
        assert [r[0] for r in fast_results] == [200] * 12
        assert slow_status == 503 and slow_body is not None and slow_body["error"] == "policy_unavailable"
        assert slow_elapsed < 4  # refused at the 0.8 s deadline, long before OPA's 6 s answer
        # The app's own credentials are stripped before the input is built: OPA never sees them.
        assert _curl(k, fresh(), "Authorization: Bearer canary-app-secret-1", "X-Api-Key: canary-app-secret-2",
                     "Cookie: s=canary-app-secret-3")[0] == 200
        assert _curl(k, fresh(), "X-Standin-Fault: 500")[0] == 503
        assert _curl(k, fresh(), "X-Standin-Fault: malformed")[0] == 503
        assert _curl(k, fresh(), "X-Standin-Fault: not-json")[0] == 503
        status, body, _ = _curl(k, fresh(), "X-Standin-Fault: undefined")
        assert status == 403 and body is not None and body["error"] == "forbidden"
        ready = requests.get(k.admin_url + "/readyz", timeout=5).json()
    finally:
        log = k.stop()
    records = wait_for_audit(k, 18)
    assert len(records) == 18
    allowed = [r for r in records if r["outcome"]["status"] == 200]
    assert len(allowed) == 13
    revision = records[0]["policy_revision"]
    assert revision.startswith("sha256:") and ready["policy"]["revision"] == revision
    for r in allowed:
        assert r["decision"]["engine_decision_id"] and r["decision"]["revision"] == revision
    failed = [r for r in records if r["outcome"]["error"] == "policy_unavailable"]
    assert all(r["decision"] is None and r["policy_revision"] == revision for r in failed)
    assert [r["outcome"]["engine_decision_id"] is not None for r in failed].count(True) == 1  # malformed
    reasons = sorted(r["outcome"]["reason"] for r in failed)
    assert reasons == ["malformed_decision", "opa_http_error", "opa_malformed_response", "opa_timeout"]
    undefined = [r for r in records if r["outcome"]["error"] == "forbidden"]
    assert undefined[0]["decision"]["engine_decision_id"]
    # One pooled keep-alive connection pool, not a connection per decision.
    stats = opa.stats()
    assert stats["connections"] <= 8
    assert len(stats["bodies"]) >= 18 and "canary-app-secret" not in json.dumps(stats["bodies"])
    assert "canary-app-secret" not in log and "canary-app-secret" not in k.audit_file.read_text()
    assert "canary-opa-key" not in log and "canary-opa-key" not in k.audit_file.read_text()


def test_not_ready_until_opa_has_answered(tmp_path: Path) -> None:
    port = free_port()
    cfg = base_config(tmp_path, policy={"engine": "opa", "opa": {"url": f"http://127.0.0.1:{port}",
                                                                 "ready_interval": 0.1}})
    k = Keyless(tmp_path, cfg)
    start_unready(k)
    opa = OpaProcess(REPO / "policies", port)
    try:
        time.sleep(0.5)
        r = requests.get(k.admin_url + "/readyz", timeout=5)
        assert r.status_code == 503 and r.json()["policy"]["answered"] is False
        opa.start()
        deadline = time.monotonic() + 10
        while requests.get(k.admin_url + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.1)
        # OPA going away later: refused at once, never forwarded.
        opa.stop()
        status, body, elapsed = _curl(k, "http://localhost:9/v1/invoices")
        assert status == 503 and body is not None and body["error"] == "policy_unavailable" and elapsed < 2
    finally:
        k.stop()
        opa.stop()
    assert k.audit()[-1]["outcome"]["reason"] == "opa_unreachable"


GUIDE_EXAMPLES = ("allowlist", "scoping", "timewindow", "posture", "scopes", "dryrun")


def test_engines_agree_on_the_guide_examples() -> None:
    examples = REPO / "docs/policy-examples"
    ci, payroll = "spiffe://example.org/ns/ci/sa/builder", "spiffe://example.org/ns/payroll/sa/batch"
    inputs = []
    for ident in (ci, payroll, None):
        for method, host, path in (("GET", "api.github.com", "/repos/acme/app/pulls"),
                                   ("POST", "api.github.com", "/repos/acme/app/statuses/abc"),
                                   ("PUT", "api.github.com", "/repos/acme/app/contents/x"),
                                   ("POST", "api.bank.example", "/transfers"),
                                   ("GET", "raw.githubusercontent.com", "/a"),
                                   ("GET", "billing.internal.example", "/v1")):
            for time_ns, posture in ((1795512600000000000, {"workload": {"status": "pass"}, "stale": False}),
                                     (1795343400000000000, {"workload": {"status": "fail", "critical_vulns": 1},
                                                            "stale": False})):
                d = doc(ident, method, host, path, posture=posture)
                d["context"]["time_ns"] = time_ns
                inputs.append(d)
    inputs += docs_inputs() + sample_inputs(examples) + sample_inputs(REPO / "policies")
    opa = OpaProcess(examples).start()

    async def compare() -> int:
        compared = 0
        for name in GUIDE_EXAMPLES:
            query = f"data.keyless.examples.{name}.decision"
            local = EmbeddedEngine.from_dir(examples, query)
            remote = OpaEngine(OpaOptions(url=opa.url, timeout_ms=2000), query)
            try:
                for d in inputs:
                    assert _essence(await remote.decide(d)) == _essence(local.decide_sync(d)), (name, d)
                    compared += 1
            finally:
                await remote.aclose()
        return compared

    try:
        assert asyncio.run(compare()) == len(GUIDE_EXAMPLES) * len(inputs)
    finally:
        opa.stop()


def test_time_zone_builtins_do_not_crash_the_proxy(tmp_path: Path) -> None:
    """Time-zone built-ins in the real proxy (which imports aiohttp and every other extension):
    rego-cpp, the engine before regorus, corrupted its heap on them when loaded after aiohttp."""
    payroll = "spiffe://example.org/ns/payroll/sa/batch"
    cfg = base_config(tmp_path, policy={"dir": str(REPO / "docs/policy-examples"),
                                        "decision": "data.keyless.examples.timewindow.decision"},
                      trust=[{"name": "loopback", "type": "source_ip",
                              "workloads": [{"cidr": "127.0.0.0/8", "id": payroll}]}],
                      credentials={"bank-api": {"type": "jwt"}})
    k = Keyless(tmp_path, cfg).start()
    try:
        for _ in range(3):
            status, _, _ = _curl(k, "http://api.bank.example:9/transfers")
            assert status in (403, 502, 503)
        assert k.proc is not None and k.proc.poll() is None
    finally:
        k.stop()
    records = wait_for_audit(k, 3)
    assert len(records) == 3
    assert all(r["decision"]["reason"] in ("payroll inside its window",
                                           "payroll may call the bank on weekdays 08:00-19:00 Paris time")
               for r in records)
