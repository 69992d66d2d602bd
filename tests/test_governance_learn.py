"""Learn, emit, shadow and replay end to end (issue 12, docs/learning.md).

A real Keyless with a permissive learning policy serves real clients (curl and requests) for two
source-address workloads (billing = 127.0.0.1, reports = 127.0.0.2) calling a real upstream
with varied identifiers in paths, several methods and two credentials. ``keyless learn`` turns
its audit log into a policy directory, which is then loaded unchanged into a fresh Keyless (every
recorded call allowed, unseen calls denied), run as ``policy.shadow`` beside the permissive
policy (no response changes; the records and the metric carry the candidate's decisions), and
used as the base of a deliberately narrower candidate for ``keyless policy replay``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.clients import Reply, curl, req
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit
from tests.policy_helpers import wait_until

BILLING = "spiffe://demo.local/billing"
REPORTS = "spiffe://demo.local/reports"
SOURCE = {BILLING: "127.0.0.1", REPORTS: "127.0.0.2"}

# Learning mode: every attested caller may call anything; the credential follows the API.
PERMISSIVE = """\
package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "caller has no attested workload identity"}

decision := {"allow": true, "reason": "learning: everything attested is allowed", "credential": credential} if {
	input.identity.id != null
}

credential := "payments-key" if startswith(input.request.path, "/v1/")

credential := "files-key" if not startswith(input.request.path, "/v1/")
"""


@dataclass(frozen=True)
class Call:
    identity: str
    client: str  # curl | requests
    method: str
    path: str
    host: str = "localhost"


HEX = "9f86d081884c7d659a2feaa0c55ad015"
CALLS = [
    Call(BILLING, "curl", "GET", "/v1/charges/123"),
    Call(BILLING, "requests", "GET", "/v1/charges/456"),
    Call(BILLING, "curl", "GET", f"/v1/charges/{uuid.UUID(int=7)}"),
    Call(BILLING, "requests", "POST", "/v1/charges"),
    Call(BILLING, "curl", "POST", "/v1/charges"),
    Call(BILLING, "requests", "GET", "/v1/customers/cus_4f9a1b2c3d4e5f60"),
    Call(BILLING, "curl", "GET", "/v1/customers/cus_0a1b2c3d4e5f6a7b/invoices"),
    Call(BILLING, "requests", "PUT", f"/files/{HEX}"),
    Call(REPORTS, "curl", "GET", "/reports/2024/summary"),
    Call(REPORTS, "requests", "GET", "/reports/2025/summary"),
    Call(REPORTS, "requests", "PATCH", "/reports/2025"),
    Call(REPORTS, "curl", "GET", "/v1/charges/99/refunds"),
]
# Calls no record shows: what the learned policy must deny (and the permissive one allows).
UNSEEN = [
    Call(BILLING, "curl", "DELETE", "/v1/charges/123"),
    Call(BILLING, "requests", "GET", "/v1/charges/123", host="127.0.0.1"),
    Call(REPORTS, "curl", "GET", "/v1/charges/5"),  # billing's route, reports' identity
    Call(BILLING, "requests", "GET", "/v1/charges/abc"),  # "abc" is no identifier: not {id}
    Call(REPORTS, "requests", "GET", "/reports/2024/summary/extra"),
]


def call(k: Keyless, upstream: Upstream, c: Call) -> Reply:
    url = upstream.url(c.path, host=c.host)
    body = {"data": b"{}"} if c.method in ("POST", "PUT", "PATCH") else {}
    if c.client == "curl":
        args = ["--interface", SOURCE[c.identity]] if c.identity == REPORTS else []
        if body:
            args += ["--data-binary", "{}"]
        return curl(k, url, *args, method=c.method)
    return req(k, c.method, url, source=SOURCE[c.identity], **body)


def keyless(cli: list[str], *, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "proxy.cli", *cli], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode in ok, (out.returncode, out.stdout, out.stderr)
    return out


@dataclass
class World:
    tmp: Path
    upstream: Upstream
    secrets: dict[str, str]
    log: Path
    learned: Path
    learn_output: str
    replies: list[tuple[int, dict[str, Any]]]  # what the clients saw in learning mode
    records: list[dict[str, Any]]

    def config(self, name: str, policy: dict[str, Any]) -> Keyless:
        tmp = self.tmp / name
        tmp.mkdir()
        cfg = base_config(
            tmp, self.upstream,
            trust=[{"name": "loopback", "type": "source_ip", "workloads": [
                {"cidr": "127.0.0.1/32", "id": BILLING}, {"cidr": "127.0.0.2/32", "id": REPORTS}]}],
            policy=policy,
            credentials={
                "payments-key": {"type": "static", "from": "file", "file": str(self.tmp / "payments-key")},
                "files-key": {"type": "static", "from": "file", "file": str(self.tmp / "files-key"),
                              "header": "X-Api-Key", "template": "{secret}"},
            },
        )
        return Keyless(tmp, cfg)


def seen(reply: Reply) -> tuple[int, dict[str, Any]]:
    """What a client saw, minus the per-request decision id."""
    return reply.status, reply.json()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("learn")
    upstream = Upstream(tmp / "upstream").start()
    secrets = {"payments-key": "pay-" + uuid.uuid4().hex, "files-key": "files-" + uuid.uuid4().hex}
    for name, value in secrets.items():
        (tmp / name).write_text(value + "\n")
    permissive = tmp / "permissive"
    permissive.mkdir()
    (permissive / "egress.rego").write_text(PERMISSIVE)
    w = World(tmp, upstream, secrets, Path(), tmp / "learned", "", [], [])
    k = w.config("learning", {"dir": str(permissive)}).start()
    try:
        w.replies = [seen(call(k, upstream, c)) for c in CALLS]
        w.records = wait_for_audit(k, len(CALLS))
    finally:
        k.stop()
    w.log = k.audit_file
    assert all(status == 200 for status, _ in w.replies), w.replies
    out = keyless(["learn", str(w.log), "--emit", str(w.learned)])
    w.learn_output = out.stdout
    print(out.stdout)
    try:
        yield w
    finally:
        upstream.stop()


def grants(w: World) -> dict[str, list[dict[str, Any]]]:
    data: dict[str, Any] = json.loads((w.learned / "data.json").read_text())
    found: dict[str, list[dict[str, Any]]] = data["keyless"]["learned"]["grants"]
    return found


def test_learn_aggregates_per_identity_with_templates_and_credentials(world: World) -> None:
    port = world.upstream.https_port
    table = {ident: sorted((g["method"], g["host"], g["port"], g["path"], g["credential"], g["seen"]["count"])
                           for g in rows) for ident, rows in grants(world).items()}
    assert table == {
        BILLING: sorted([
            ("GET", "localhost", port, "/v1/charges/{id}", "payments-key", 3),
            ("POST", "localhost", port, "/v1/charges", "payments-key", 2),
            ("GET", "localhost", port, "/v1/customers/{id}", "payments-key", 1),
            ("GET", "localhost", port, "/v1/customers/{id}/invoices", "payments-key", 1),
            ("PUT", "localhost", port, "/files/{id}", "files-key", 1),
        ]),
        REPORTS: sorted([
            ("GET", "localhost", port, "/reports/{id}/summary", "files-key", 2),
            ("PATCH", "localhost", port, "/reports/{id}", "files-key", 1),
            ("GET", "localhost", port, "/v1/charges/{id}/refunds", "payments-key", 1),
        ]),
    }
    out = world.learn_output
    assert "learned 8 grant(s) for 2 identities from 12 decision(s) in 1 log(s)" in out
    # The last new tuple is the last call's: learning had not converged when the log ended.
    last = world.records[-1]["time"]
    assert re.search(rf"last new grant first seen {re.escape(last)} \(record 12 of 12", out), out
    # The template is Keyless's own request.path_template for every default-rule path.
    for r in world.records:
        assert r["input"]["request"]["path_template"] in {g["path"] for rows in grants(world).values() for g in rows}


def test_emitted_policy_passes_policy_test_and_check(world: World) -> None:
    out = keyless(["policy", "test", str(world.learned)])
    assert re.search(r"^(\d+) passed, 0 failed$", out.stdout, re.MULTILINE), out.stdout
    passed = int(re.search(r"^(\d+) passed", out.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
    # One allow test per distinct recorded path (11) and the unseen-call denials.
    assert out.stdout.count("PASS data.keyless.learned_test.test_recorded_") == 11
    assert out.stdout.count("PASS data.keyless.learned_test.test_unseen_") >= 8
    assert passed > 19


def test_emitted_policy_enforces_exactly_what_was_seen(world: World) -> None:
    k = world.config("enforcing", {"dir": str(world.learned)}).start()
    try:
        for c, (status, body) in zip(CALLS, world.replies, strict=True):
            world.upstream.received.clear()
            r = call(k, world.upstream, c)
            assert seen(r) == (status, body), (c, r.status, r.body)
            got = world.upstream.received[-1]
            if c.path.startswith("/v1/"):
                assert got.headers["authorization"] == f"Bearer {world.secrets['payments-key']}"
            else:
                assert got.headers["x-api-key"] == world.secrets["files-key"]
        for c in UNSEEN:
            world.upstream.received.clear()
            r = call(k, world.upstream, c)
            assert r.status == 403 and r.json()["error"] == "forbidden", (c, r.status, r.body)
            assert world.upstream.received == []
        records = wait_for_audit(k, len(CALLS) + len(UNSEEN))
    finally:
        k.stop()
    denied = [r for r in records if r["outcome"]["error"] == "forbidden"]
    assert len(denied) == len(UNSEEN)
    assert {r["decision"]["reason"] for r in denied} >= {
        f"no learned grant allows {BILLING} to DELETE localhost:{world.upstream.https_port}/v1/charges/123"}


def test_shadow_records_the_candidate_without_changing_a_response(world: World) -> None:
    k = world.config("shadow", {"dir": str(world.tmp / "permissive"), "shadow": str(world.learned)}).start()
    try:
        replies = [seen(call(k, world.upstream, c)) for c in CALLS]
        unseen = [call(k, world.upstream, c) for c in UNSEEN]
        records = wait_for_audit(k, len(CALLS) + len(UNSEEN))
        metrics = requests.get(k.admin_url + "/metrics", timeout=5).text
    finally:
        k.stop()
    # Not a single response changed: the same statuses and bodies as without the shadow, and
    # the calls the candidate would deny were answered by the permissive policy.
    assert replies == world.replies
    assert [r.status for r in unseen] == [200] * len(UNSEEN)
    shadows = [r["shadow"] for r in records]
    revisions = {s["revision"] for s in shadows}
    assert len(revisions) == 1 and revisions != {records[0]["policy_revision"]}
    assert [s["allow"] for s in shadows] == [True] * len(CALLS) + [False] * len(UNSEEN)
    assert all(r["decision"]["allow"] for r in records)
    assert shadows[0]["reason"].startswith("learned grant GET localhost:")
    assert shadows[-1]["reason"].startswith(f"no learned grant allows {REPORTS} to GET")
    (rev,) = revisions
    assert f'keyless_shadow_decisions_total{{result="would_allow",revision="{rev}"}} {float(len(CALLS))}' in metrics
    assert f'keyless_shadow_decisions_total{{result="would_deny",revision="{rev}"}} {float(len(UNSEEN))}' in metrics


def narrower(world: World) -> Path:
    """The learned policy without billing's POST and reports' PATCH grants."""
    d = world.tmp / "narrower"
    if not d.exists():
        shutil.copytree(world.learned, d)
        data = json.loads((d / "data.json").read_text())
        g = data["keyless"]["learned"]["grants"]
        g[BILLING] = [x for x in g[BILLING] if x["method"] != "POST"]
        g[REPORTS] = [x for x in g[REPORTS] if x["method"] != "PATCH"]
        (d / "data.json").write_text(json.dumps(data, indent=2))
        (d / "learned_test.rego").unlink()  # its tests assert the grants just removed
    return d


def test_replay_reports_exactly_the_calls_a_narrower_candidate_denies(world: World) -> None:
    same = keyless(["policy", "replay", "--audit", str(world.log), "--policy", str(world.learned)])
    assert "unchanged          12" in same.stdout and "newly denied        0" in same.stdout, same.stdout
    out = keyless(["policy", "replay", "--audit", str(world.log), "--policy", str(narrower(world)),
                   "--format", "json"], ok=(1,))
    doc = json.loads(out.stdout)
    expected = {r["decision_id"] for r in world.records if r["request"]["method"] in ("POST", "PATCH")}
    assert len(expected) == 3
    assert {c["decision_id"] for c in doc["newly_denied_calls"]} == expected
    assert (doc["replayed"], doc["unchanged"], doc["newly_denied"], doc["newly_allowed"]) == (12, 9, 3, 0)
    ex = doc["examples"]["newly_denied"]
    assert ex["old"] == {"allow": True, "reason": "learning: everything attested is allowed",
                         "credential": "payments-key"}
    assert ex["new"]["allow"] is False and ex["new"]["reason"].startswith(f"no learned grant allows {BILLING} to POST")
    text = keyless(["policy", "replay", "--audit", str(world.log), "--policy", str(narrower(world))], ok=(1,))
    print(text.stdout)
    assert "newly denied        3" in text.stdout
    assert f"newly denied, e.g. {BILLING} POST localhost:" in text.stdout


def test_bad_input_gets_one_clear_line(world: World) -> None:
    good = world.log.read_text()
    torn = world.tmp / "torn.log"
    torn.write_text(good + good.splitlines()[3][:40])
    foreign = world.tmp / "foreign.log"
    foreign.write_text(good.splitlines()[0] + "\n" + '{"level": "info", "msg": "hello"}\n' + good)
    empty = world.tmp / "empty.log"
    empty.write_text("")
    lines = len(good.splitlines())
    for log, message in ((torn, f"{torn}:{lines + 1}: not JSON (a torn write, or not an audit log?)"),
                         (foreign, f"{foreign}:2: not a Keyless audit record (no decision_id and request)"),
                         (empty, f"{empty}: no request records (is audit.path the right file?)")):
        for cli in (["learn", str(log)], ["policy", "replay", "--audit", str(log), "--policy", str(world.learned)]):
            out = keyless(cli, ok=(2,))
            assert out.stderr == message + "\n" and out.stdout == "", (cli, out.stderr)
    broken = world.tmp / "broken"
    shutil.copytree(world.learned, broken)
    (broken / "learned.rego").write_text((broken / "learned.rego").read_text().replace("count(want)", "count(want"))
    out = keyless(["policy", "replay", "--audit", str(world.log), "--policy", str(broken)], ok=(2,))
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"candidate {broken}: ") and "learned.rego:" in out.stderr, out.stderr


SHADOW_ERRORS = """\
package keyless.egress

import rego.v1

# A candidate that fails on /v1/charges/abc (a malformed decision) and denies everything else.
decision := {"allow": "yes"} if {
	input.request.path == "/v1/charges/abc"
} else := {"allow": false, "reason": "REVISION"}
"""


def test_shadow_errors_and_reloads_never_change_a_response(world: World) -> None:
    cand = world.tmp / "erring"
    cand.mkdir()
    (cand / "egress.rego").write_text(SHADOW_ERRORS.replace("REVISION", "one"))
    k = world.config("shadow-errors", {"dir": str(world.tmp / "permissive"), "shadow": str(cand),
                                        "reload": {"interval": 0.1}}).start()
    try:
        first = [call(k, world.upstream, c) for c in (CALLS[0], UNSEEN[3])]
        (cand / "egress.rego").write_text(SHADOW_ERRORS.replace("REVISION", "two"))
        wait_until(lambda: "reloaded" in k.log_file.read_text(), 10, "the shadow policy to reload")
        second = call(k, world.upstream, CALLS[0])
        records = wait_for_audit(k, 3)
    finally:
        k.stop()
    assert [r.status for r in (*first, second)] == [200, 200, 200]
    one, err, two = (r["shadow"] for r in records)
    assert (one["allow"], one["reason"]) == (False, "one")
    assert err["allow"] is False and err["error"] == "malformed_decision" and "'allow' must be" in err["reason"]
    assert (two["allow"], two["reason"]) == (False, "two") and two["revision"] != one["revision"]
    assert all(r["decision"]["allow"] and r["outcome"]["error"] is None for r in records)


def test_check_reports_a_missing_or_broken_shadow(world: World) -> None:
    missing = world.config("check-missing", {"dir": str(world.learned), "shadow": str(world.tmp / "nope")})
    out = keyless(["check", "-c", str(missing.config_file)], ok=(2,))
    assert f"policy.shadow: no policy directory or bundle file at {world.tmp / 'nope'}" in out.stderr, out.stderr
    broken = world.tmp / "broken-shadow"
    broken.mkdir()
    (broken / "egress.rego").write_text("package keyless.egress\n\ndecision := {\n")
    k = world.config("check-broken", {"dir": str(world.learned), "shadow": str(broken)})
    out = keyless(["check", "-c", str(k.config_file)], ok=(2,))
    assert "policy: shadow: " in out.stderr and "egress.rego" in out.stderr, out.stderr
