"""The decision cache's key, derived from the input's one field declaration, and ``cache.vary``."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from proxy.agents.mcp import McpMessage
from proxy.config import load_config
from proxy.errors import KeylessError
from proxy.model import Attestation, Identity, Source
from proxy.pipeline import Exchange, Pipeline
from proxy.policy.cache import CachingEngine, cache_key, vary_key
from proxy.policy.embedded import EmbeddedEngine
from proxy.policy.input import INPUT_FIELDS, path_template
from proxy.policy.result import parse_decision
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit

QUERY = "data.keyless.egress.decision"
BILLING = "spiffe://demo.local/billing"


def _leaves(doc: Any, prefix: str = "") -> list[str]:
    if isinstance(doc, dict) and doc:
        return [leaf for k, v in doc.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def full_input(tmp_path: Path) -> dict[str, Any]:
    """An input as the broker builds it with every optional part present."""
    cfg = base_config(tmp_path, listen={"address": "127.0.0.1", "port": 18080, "mode": "regular"})
    (tmp_path / "keyless.yaml").write_text(yaml.safe_dump(cfg))
    broker = Pipeline(load_config(tmp_path / "keyless.yaml"), None, None, None, [], {})  # type: ignore[arg-type]
    broker.posture = lambda _id: {"workload": {"status": "pass", "critical_vulns": 0}, "stale": False,
                                  "age_seconds": 1.5}
    ex = Exchange(Source("10.0.3.7", 50312))
    ex.identity = Identity(BILLING, (Attestation("office", "source_ip", BILLING, {"cidr": "10.0.3.0/24"}),))
    doc = broker.policy_input(ex, method="GET", scheme="https", host="api.example", port=443,
                              path="/v1/invoices/42?page=2", query=[("page", "2")],
                              headers=[("User-Agent", "curl/8"), ("Authorization", "Bearer x")],
                              destination={"address": "203.0.113.7", "port": 443})
    # proxy.agents: a tools/call as listed (every field any MCP message adds) and its user.
    call = McpMessage("request", "tools/call", 7, {"name": "create_issue", "arguments": {"repo": "acme/app"}},
                      "2025-11-25", "sess-1").as_input("github", tool_changed=False)
    doc["mcp"] = {**call, "name": "create_issue", "http_method": "POST", "listing": True}
    doc["user"] = Attestation("mcp.user_token", "jwt", "https://idp#alice", {"subject": "alice"}).as_input()
    return doc


def test_every_input_field_is_in_the_key_or_declared_uncacheable(tmp_path: Path) -> None:
    doc = full_input(tmp_path)
    declared = {f.path: f for f in INPUT_FIELDS}
    subtrees = [f.path + "." for f in INPUT_FIELDS if f.subtree]
    undeclared = [leaf for leaf in _leaves(doc) if leaf not in declared and not leaf.startswith(tuple(subtrees))]
    assert undeclared == [], f"input fields neither in the cache key nor declared uncacheable: {undeclared}"
    # And no declaration is stale: each names a field the full input has.
    missing = [p for p in declared if not any(leaf == p or leaf.startswith(p + ".") for leaf in _leaves(doc))]
    assert missing == []
    assert all(f.why for f in INPUT_FIELDS if not f.cacheable)
    # The strict key holds every cacheable field and none of the others.
    changed = json.loads(json.dumps(doc))
    for f in INPUT_FIELDS:
        probe = json.loads(json.dumps(doc))
        node = probe
        *parents, last = f.path.split(".")
        for p in parents:
            node = node[p]
        node[last] = "changed"
        assert (cache_key(probe, "r") != cache_key(changed, "r")) == f.cacheable, f.path


def test_path_template_rule() -> None:
    cases = {
        "/v1/invoices/123": "/v1/invoices/{id}",
        "/v1/invoices/123/lines/7": "/v1/invoices/{id}/lines/{id}",
        "/v2/users/3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b": "/v2/users/{id}",
        "/v1/customers/cus_NffrFeUfNV2Hib9": "/v1/customers/{id}",
        "/repos/acme/app/commits/9fceb02d0ae598e95dc970b74767f19372d61af8": "/repos/acme/app/commits/{id}",
        # Kept: versions, names, short mixed tokens, letters-only long words, encodings.
        "/v1/repos/acme-widgets-for-everyone/x": "/v1/repos/acme-widgets-for-everyone/x",
        "/api/v2/a1b2": "/api/v2/a1b2",
        "/files/report%201.pdf": "/files/report%201.pdf",
        "/": "/",
        "": "",
        "/a//b/": "/a//b/",
    }
    assert {p: path_template(p) for p in cases} == cases


def _decision(**cache: Any) -> Any:
    return parse_decision({"allow": True, **cache}, "test")


def test_cache_and_vary_are_parsed_strictly() -> None:
    d = _decision(cache={"ttl": 60, "vary": ["request.path_template", "identity.id", "identity.id"]})
    assert d.cache_ttl == 60 and d.vary == ("identity.id", "request.path_template")
    assert _decision(cache_ttl=5).vary is None and _decision(cache_ttl=5).cache_ttl == 5
    assert _decision(cache={"ttl": 5, "vary": ["request.headers.x-tenant", "identity", "context.posture"]}).vary
    for bad in ({"cache": {"ttl": 5, "vary": ["request.nothing"]}}, {"cache": {"ttl": 5, "vary": "identity.id"}},
                {"cache": {"vary": ["identity.id"]}}, {"cache": {"ttl": 5, "extra": 1}},
                {"cache": {"ttl": -1}}, {"cache": {"ttl": 5}, "cache_ttl": 5}, {"cache": 60}):
        with pytest.raises(KeylessError):
            _decision(**bad)


def _doc(path: str, ident: str = BILLING, method: str = "GET") -> dict[str, Any]:
    return {"source": {"address": "127.0.0.1", "port": 1},
            "identity": {"id": ident, "attestations": []},
            "request": {"method": method, "scheme": "https", "host": "localhost", "port": 443, "path": path,
                        "path_template": path_template(path), "query": {}, "headers": {}},
            "context": {"time": "2026-11-22T10:00:00Z", "mode": "regular"}}


def test_vary_serves_one_decision_for_every_identifier_and_keeps_identities_apart() -> None:
    engine = EmbeddedEngine.from_dir(REPO / "policies", QUERY)
    cache = CachingEngine(engine)

    async def run() -> list[Any]:
        out = [await cache.decide(_doc(f"/v1/invoices/{n}")) for n in range(50)]
        out.append(await cache.decide(_doc("/v1/invoices/7", ident="spiffe://demo.local/other")))
        out.append(await cache.decide(_doc("/v1/invoices/7", method="DELETE")))
        out.append(await cache.decide(_doc("/v1/invoices/7", method="DELETE")))
        return out

    out = asyncio.run(run())
    assert all(d.allow for d in out[:50]) and out[1].cached and not out[0].cached
    assert not out[50].allow and not out[50].cached  # another identity: its own evaluation
    assert not out[51].allow and out[52].cached  # a refusal uses the strict key (its reason names the path)
    assert cache.misses == 3 and cache.hits == 50
    # The vary key holds only what the list names; the strict key holds the path.
    a, b = _doc("/v1/invoices/1"), _doc("/v1/invoices/2")
    assert vary_key(a, "r", ("request.path_template",)) == vary_key(b, "r", ("request.path_template",))
    assert cache_key(a, "r") != cache_key(b, "r")


VARY_POLICY = """package keyless.vary

import rego.v1

default decision := {"allow": false, "reason": "no"}

decision := {"allow": true, "reason": "invoices", "credential": "demo-api",
	"cache": {"ttl": 60, "vary": ["identity.id", "request.method", "request.host", "request.path_template"]}} if {
	input.identity.id == "spiffe://demo.local/billing"
	input.request.method == "GET"
	glob.match("/v1/invoices/*", ["/"], %s)
}
"""

VARY_TEST = """package keyless.vary_test

import rego.v1

import data.keyless.vary

test_reads if {
	vary.decision.allow with input.identity as {"id": "spiffe://demo.local/billing", "attestations": []}
		with input.request as {"method": "GET", "host": "localhost", "path": "/v1/invoices/1",
			"path_template": "/v1/invoices/{id}"}
}

vary_samples := {"data.keyless.vary.decision": [{
	"source": {"address": "127.0.0.1", "port": 1},
	"identity": {"id": "spiffe://demo.local/billing", "attestations": []},
	"request": {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/invoices/1",
		"query": {}, "headers": {}},
	"context": {"time": "2026-11-22T10:00:00Z", "mode": "regular"},
}]}
"""


def _policy_test(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "policy", "test", str(directory)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_policy_test_catches_a_vary_that_omits_a_field_the_decision_reads(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    for d, reads in ((good, "input.request.path_template"), (bad, "input.request.path")):
        d.mkdir()
        (d / "vary.rego").write_text(VARY_POLICY % reads)
        (d / "vary_test.rego").write_text(VARY_TEST)
    ok = _policy_test(good)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS data.keyless.vary_test.vary_samples" in ok.stdout
    caught = _policy_test(bad)
    assert caught.returncode == 1
    assert ("FAIL data.keyless.vary_test.vary_samples['data.keyless.vary.decision'][0]: the decision sets "
            "cache.vary ['identity.id', 'request.host', 'request.method', 'request.path_template'] but changes "
            "when request.path changes") in caught.stdout
    # The strict key has its promise too: a cache_ttl decision must not read headers.
    (bad / "vary.rego").write_text(VARY_POLICY.replace(
        '"cache": {"ttl": 60, "vary": ["identity.id", "request.method", "request.host", "request.path_template"]}',
        '"cache_ttl": 60') % 'input.request.headers["x-path"]')
    (bad / "vary_test.rego").write_text(VARY_TEST.replace(
        '"query": {}, "headers": {}},\n\t"context"',
        '"query": {}, "headers": {"x-path": "/v1/invoices/1"}},\n\t"context"').replace(
        'test_reads if {', 'test_reads if {\n\ttrue\n}\n\nunused if {'))
    caught = _policy_test(bad)
    assert caught.returncode == 1 and "sets cache_ttl (the strict key) but changes when request.headers.x-path" \
        in caught.stdout, caught.stdout


def test_distinct_paths_are_decided_once_end_to_end(tmp_path: Path, upstream: Upstream) -> None:
    """A real proxy, real curl: 30 requests to 30 invoice ids cost one evaluation."""
    (tmp_path / "key").write_text("canary-vary-key-1\n")
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    cfg = base_config(tmp_path, upstream, policy={"dir": str(policies)},
                      credentials={"demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")},
                                   "workload-jwt": {"type": "jwt"}})
    k = Keyless(tmp_path, cfg).start()
    try:
        codes = [subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                 upstream.url(f"/v1/invoices/{n}")], env=k.client_env(), capture_output=True,
                                text=True, timeout=30).stdout for n in range(30)]
        status = requests.get(k.admin_url + "/readyz", timeout=5).json()["policy"]
    finally:
        k.stop()
    assert codes == ["200"] * 30
    assert status["engine"] == "regorus"
    assert status["cache"]["misses"] == 1 and status["cache"]["hits"] == 29 and status["cache"]["vary_lists"] == 1
    records = wait_for_audit(k, 30)
    assert [r["decision"]["cached"] for r in records] == [False] + [True] * 29
    assert {r["request"]["path"] for r in records} == {f"/v1/invoices/{n}" for n in range(30)}
