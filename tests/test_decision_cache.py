"""The embedded engine's decision cache: keyed on what the policy reads, off when that is unknown."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import KeylessError
from proxy.policy.cache import input_paths
from proxy.policy.embedded import EmbeddedEngine, PolicySource, read_policy_dir

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def mod(body: str) -> list[tuple[str, str]]:
    return [("p.rego", "package keyless.egress\nimport rego.v1\n" + body)]


@pytest.mark.parametrize(("body", "expected"), [
    ('decision := {"allow": input.request.host == "a"}', (("request", "host"),)),
    ('decision := {"allow": input.request.headers["x-y"] == "1"}', (("request", "headers"),)),
    ('decision := {"allow": input . request . method == "GET"}', (("request", "method"),)),
    ('decision := {"allow": count(input.request) > 0 and input.request.host == "a"}', (("request",),)),
    ('# input alone in a comment\ndecision := {"allow": true, "reason": "input"}', ()),
    ('decision := {"allow": true, "reason": `raw input`}', ()),
    ('decision := {"allow": object.get(input, "x", false)}', None),
    ('decision := {"allow": input["request"].host == "a"}', None),
    ('import input.request as r\ndecision := {"allow": r.host == "a"}', (("request",),)),
    ('import input\ndecision := {"allow": true}', None),
    ('decision := {"allow": x} if { x := f with input as {"a": 1} }\nf := true', None),
    ('decision := {"allow": time.now_ns() > 0}', None),
    ('decision := {"allow": rand.intn("k", 10) > 3}', None),
    ('decision := {"allow": count(uuid.rfc4122("k")) > 0}', None),
    ('decision := {"allow": true, "reason": http.send({"url": "x", "method": "get"}).body}', None),
    ('decision := {"allow": count(crypto.x509.parse_and_verify_certificates(input.c)) > 0}', None),
    ('decision := {"allow": true, "reason": $"for {input.identity.id}"}', None),
])
def test_input_paths(body: str, expected: tuple[tuple[str, ...], ...] | None) -> None:
    assert input_paths(mod(body)) == expected


def test_default_policy_reads_four_paths() -> None:
    assert input_paths(read_policy_dir(POLICIES).modules) == (
        ("identity", "id"), ("request", "host"), ("request", "method"), ("request", "path"))


def doc(**request: Any) -> dict[str, Any]:
    req = {"method": "GET", "scheme": "https", "host": "localhost", "port": 443, "path": "/v1/x",
           "query": {}, "headers": {}}
    ident = request.pop("identity", "spiffe://demo.local/billing")
    req.update(request)
    return {"source": {"address": "127.0.0.1", "port": random.randint(1024, 65535)},
            "identity": {"id": ident, "attestations": []}, "request": req,
            "context": {"time": f"2026-01-01T00:00:{random.randint(0, 59):02d}Z", "mode": "regular"}}


def test_hits_when_only_unread_fields_change_and_matches_uncached() -> None:
    engine = EmbeddedEngine.from_dir(POLICIES, "data.keyless.egress.decision")
    uncached = EmbeddedEngine.from_dir(POLICIES, "data.keyless.egress.decision")
    uncached.cache = None
    first = engine.decide_sync(doc())
    again = engine.decide_sync(doc(headers={"user-agent": "other"}, port=8443, query={"a": ["1"]}))
    assert again is first and first.allow and first.credential == "demo-api"
    rng = random.Random(7)
    for _ in range(300):
        d = doc(method=rng.choice(["GET", "POST", "HEAD", "DELETE"]),
                host=rng.choice(["localhost", "127.0.0.1", "evil.example"]),
                path=rng.choice(["/v1/x", "/v1/reports", "/v1/reports/9", "/v2/x", "/"]),
                identity=rng.choice(["spiffe://demo.local/billing", "spiffe://demo.local/other", None]))
        assert engine.decide_sync(d) == uncached.decide_sync(d)
    with pytest.raises(TypeError):
        first.params["injected"] = "x"  # type: ignore[index]


def test_policy_reading_the_port_keys_on_it_and_errors_are_not_cached() -> None:
    body = ('decision := {"allow": input.source.port > 2000, "reason": sprintf("%d", [input.source.port])}'
            ' if input.request.path != "/bad"\n'
            'decision := "not an object" if input.request.path == "/bad"')
    engine = EmbeddedEngine(PolicySource(tuple(mod(body)), {}, "t"), "data.keyless.egress.decision")
    assert engine.cache is not None and engine.cache.paths == (("request", "path"), ("source", "port"))
    low, high = doc(), doc()
    low["source"]["port"], high["source"]["port"] = 1500, 3000
    assert not engine.decide_sync(low).allow and engine.decide_sync(high).allow
    assert engine.decide_sync(low).reason == "1500"
    bad = doc(path="/bad")
    for _ in range(2):
        with pytest.raises(KeylessError):
            engine.decide_sync(bad)
    assert len(engine.cache._entries) == 2


def test_startup_line_says_what_the_cache_keys_on() -> None:
    from proxy.policy.cache import describe

    engine = EmbeddedEngine.from_dir(POLICIES, "data.keyless.egress.decision")
    assert describe(engine.cache) == ("decision cache on, keyed on input.identity.id, input.request.host, "
                                      "input.request.method, input.request.path")
    assert describe(None).startswith("decision cache off")
