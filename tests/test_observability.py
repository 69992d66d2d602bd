"""What operators see, end to end, on one real Keyless process:

- a decision-log service (a real aiohttp receiver on loopback, OPA's ``/logs`` API) that checks
  every field of every gzip'd batch, refuses the first upload, and still gets every event;
- ``/metrics`` scraped and parsed with prometheus_client's own text parser;
- ``--log-format json`` with one debug line per request, and no secret in any line;
- SIGHUP: the policy is reloaded, a changed listen port is reported as needing a restart, and
  the process lives on.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo import free_port
from tests.harness import Keyless, Upstream, base_config, wait_for_audit
from tests.test_audit_faults import POLICY, SECRET, get

ID = "spiffe://demo.local/billing"
EVENT_KEYS = {"labels", "decision_id", "path", "input", "result", "bundles", "timestamp", "requested_by",
              "metrics", "keyless", "masked", "erased"}


@dataclass
class Receiver:
    """An OPA-compatible decision-log service: validates each batch, stores the events."""

    port: int = field(default_factory=free_port)
    events: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    posts: int = 0
    fail_first: bool = True

    def start(self) -> Receiver:
        ready = threading.Event()

        async def logs(request: web.Request) -> web.Response:
            self.posts += 1
            if self.fail_first and self.posts == 1:
                return web.Response(status=503)
            try:
                assert request.headers["Content-Encoding"] == "gzip"
                assert request.headers["Content-Type"] == "application/json"
                batch = json.loads(gzip.decompress(await request.read()))
                assert isinstance(batch, list) and batch
                for event in batch:
                    check_event(event)
            except (AssertionError, KeyError, ValueError) as e:
                self.problems.append(repr(e))
                return web.Response(status=400)
            self.events.extend(batch)
            return web.Response(status=204)

        def run() -> None:
            loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/logs", logs)
            # auto_decompress off: the test sees the bytes Keyless sent (they must be gzip).
            runner = web.AppRunner(app, access_log=None, auto_decompress=False)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert ready.wait(10)
        return self


def check_event(e: dict[str, Any]) -> None:
    assert set(e) <= EVENT_KEYS and EVENT_KEYS - {"erased"} <= set(e), set(e) ^ EVENT_KEYS
    assert e["labels"]["team"] == "payments" and e["labels"]["version"] and e["labels"]["id"]
    assert len(e["decision_id"]) == 32 and e["path"] == "keyless/egress/decision"
    assert e["timestamp"].endswith("Z") and e["requested_by"].startswith("127.0.0.1:")
    inp = e["input"]
    assert inp["identity"]["id"] == ID and inp["request"]["method"] == "GET"
    assert inp["request"]["headers"] and set(inp["request"]["headers"].values()) == {"[masked]"}
    assert "query" not in inp["request"] and e["erased"] == ["/input/request/query"]
    assert e["masked"] == ["/input/request/headers"]
    assert isinstance(e["result"]["allow"], bool)
    assert list(e["bundles"]) == ["keyless"] and e["bundles"]["keyless"]["revision"]
    assert e["metrics"]["timer_keyless_request_ns"] > 0
    assert e["keyless"]["outcome"]["status"] in (200, 403)
    assert SECRET not in json.dumps(e)


@dataclass
class Env:
    k: Keyless
    upstream: Upstream
    receiver: Receiver
    policy: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("observe")
    upstream = Upstream(tmp / "up").start()
    receiver = Receiver().start()
    (tmp / "policy").mkdir()
    policy = tmp / "policy" / "egress.rego"
    policy.write_text(POLICY)
    (tmp / "key").write_text(SECRET + "\n")
    cfg = base_config(tmp, upstream, policy={"dir": str(tmp / "policy")},
                      credentials={"key": {"type": "static", "from": "file", "file": str(tmp / "key")}},
                      audit={"path": str(tmp / "audit.log"), "labels": {"team": "payments"},
                             "sinks": [{"type": "decision_log", "url": f"http://127.0.0.1:{receiver.port}",
                                        "min_delay_seconds": 0.2, "max_delay_seconds": 0.4}]})
    k = Keyless(tmp, cfg).start("debug", "--log-format", "json")
    yield Env(k, upstream, receiver, policy)
    k.stop()
    upstream.stop()


def test_decision_log_batches_reach_the_service(env: Env) -> None:
    ids = []
    for path in ("/cred/a?token=x&page=2", "/plain/b", "/nope"):
        r = get(env.k, env.upstream.url(path, tls=False))
        assert r.status_code == (403 if path == "/nope" else 200)
        ids.append(r.headers["Keyless-Decision-Id"])
    deadline = time.monotonic() + 10
    while not set(ids) <= {e["decision_id"] for e in env.receiver.events} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not env.receiver.problems, env.receiver.problems
    got = {e["decision_id"]: e for e in env.receiver.events}
    assert set(ids) <= set(got), "the refused first upload was not retried"
    assert env.receiver.posts >= 2
    assert got[ids[0]]["result"] == {"allow": True, "reason": "credentialed", "credential": "key"}
    assert got[ids[0]]["keyless"]["credential"]["name"] == "key"
    assert got[ids[2]]["result"]["allow"] is False
    # The file trail has the same fields for a replay.
    records = {r["decision_id"]: r for r in wait_for_audit(env.k, 3) if "decision_id" in r}
    assert records[ids[0]]["input"] == got[ids[0]]["input"] and records[ids[0]]["labels"]["team"] == "payments"


def test_metrics_scrape_parses(env: Env) -> None:
    assert get(env.k, env.upstream.url("/cred/m", tls=False)).status_code == 200
    r = requests.get(env.k.admin_url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("keyless_requests", "keyless_decisions", "keyless_decision_duration_seconds",
                 "keyless_credential_duration_seconds", "keyless_credential_fetches", "keyless_policy_reloads",
                 "keyless_policy_reload_failures", "keyless_audit_records", "keyless_audit_write_failures",
                 "keyless_audit_records_dropped", "keyless_audit_up", "keyless_connections_open"):
        assert name in families, name

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("keyless_requests", "keyless_requests_total", outcome="forwarded", code="") >= 1
    assert value("keyless_decisions", "keyless_decisions_total", result="allow", cached="false") >= 1
    assert value("keyless_decision_duration_seconds", "keyless_decision_duration_seconds_count") >= 1
    assert value("keyless_credential_duration_seconds", "keyless_credential_duration_seconds_count",
                 credential="key") >= 1
    assert value("keyless_audit_records", "keyless_audit_records_total") >= 1
    assert value("keyless_audit_up", "keyless_audit_up") == 1
    # Bounded labels: no host, path or identity anywhere.
    for f in families.values():
        for s in f.samples:
            for v in s.labels.values():
                assert "localhost" not in v and "/" not in v and "spiffe" not in v, (s.name, s.labels)


def test_json_logs_one_line_per_request(env: Env) -> None:
    r = get(env.k, env.upstream.url("/cred/logged", tls=False))
    did = r.headers["Keyless-Decision-Id"]
    deadline = time.monotonic() + 5
    line: dict[str, Any] | None = None
    while line is None and time.monotonic() < deadline:
        for raw in env.k.log_file.read_text().splitlines():
            entry = json.loads(raw)  # every line is JSON
            if entry.get("decision_id") == did:
                line = entry
        time.sleep(0.1)
    assert line is not None
    assert line["level"] == "debug" and line["identity"] == ID and line["host"] == "localhost"
    assert line["outcome"] == "forwarded" and line["status"] == 200 and line["latency_ms"] > 0
    assert SECRET not in env.k.log_file.read_text()


def test_sighup_reloads_policy_and_names_restart_keys(env: Env) -> None:
    k = env.k
    assert k.proc is not None
    assert get(k, env.upstream.url("/plain/x", tls=False)).status_code == 200
    env.policy.write_text(POLICY.replace('startswith(input.request.path, "/plain")', "false"))
    k.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "SIGHUP: policy reloaded" not in k.log_file.read_text():
        assert time.monotonic() < deadline, k.log_file.read_text()[-2000:]
        time.sleep(0.1)
    assert get(k, env.upstream.url("/plain/x", tls=False)).status_code == 403
    changed = dict(k.config, listen={**k.config["listen"], "port": free_port()})
    k.config_file.write_text(yaml.safe_dump(changed))
    try:
        k.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "need a restart" not in k.log_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "changes in listen need a restart" in k.log_file.read_text()
        assert k.proc.poll() is None
        assert get(k, env.upstream.url("/cred/still", tls=False)).status_code == 200
    finally:
        k.config_file.write_text(yaml.safe_dump(k.config))
