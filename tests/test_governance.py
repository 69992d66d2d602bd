"""Discovery and the blast-radius report end to end (issue 13, docs/governance.md).

A real Keyless process with three source-address workloads (ci = 127.0.0.1, billing =
127.0.0.2, reports = 127.0.0.3), a real HTTPS upstream and curl as the client. ci and reports
send the same GitHub-style token in a header; billing sends an AWS-style access key in a query
parameter. The same traffic carries UUIDs, git SHAs, ordinary ids, a pagination cursor and a
JSON body, none of which may be reported. Then ``keyless discover``, ``keyless report`` (JSON,
Markdown, HTML), the admin listener's ``/report`` and ``/metrics``; the HTML page is rendered by
a real headless chromium and its figures read back from the DOM and compared with the JSON.
The canaries must appear in no output at all.

``KEYLESS_UPDATE_DOCS=1`` also writes the page's screenshot and the Markdown report to docs/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import string
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.clients import curl
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit

CI = "spiffe://e2e.test/ci"
BILLING = "spiffe://e2e.test/billing"
REPORTS = "spiffe://e2e.test/reports"
UNUSED = "billing may file reports with a minted JWT"


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


@dataclass
class Env:
    k: Keyless
    upstream: Upstream
    tmp: Path
    gh: str
    akia: str
    api_secret: str

    @property
    def canaries(self) -> tuple[str, ...]:
        return (self.gh, self.gh[4:], self.akia, self.akia[4:])

    def keyless(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=self.tmp)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("governance")
    upstream = Upstream(tmp / "upstream").start()
    api_secret = "canary-api-" + secrets.token_hex(8)
    (tmp / "api-key").write_text(api_secret + "\n")
    cfg = base_config(
        tmp, upstream,
        trust=[{"name": "loopback", "type": "source_ip", "workloads": [
            {"cidr": "127.0.0.1/32", "id": CI},
            {"cidr": "127.0.0.2/32", "id": BILLING},
            {"cidr": "127.0.0.3/32", "id": REPORTS},
        ]}],
        policy={"dir": str(REPO / "tests" / "policies" / "governance")},
        credentials={
            "api-key": {"type": "static", "from": "file", "file": str(tmp / "api-key")},
            "minted": {"type": "jwt", "ttl": 120},
        },
    )
    k = Keyless(tmp, cfg).start(log_level="debug")
    gh = "ghp_" + _random(string.ascii_letters + string.digits, 36)
    akia = "AKIA" + _random(string.ascii_uppercase + string.digits, 16)
    e = Env(k, upstream, tmp, gh, akia, api_secret)
    try:
        _traffic(e)
        yield e
    finally:
        k.stop()
        upstream.stop()


def _traffic(e: Env) -> None:
    sha = hashlib.sha1(secrets.token_bytes(8)).hexdigest()  # noqa: S324 - a git-style object id
    rid = str(uuid.uuid4())
    cursor = base64.urlsafe_b64encode(secrets.token_bytes(24)).decode()
    u = e.upstream.url
    noise = ["-H", f"X-Request-Id: {rid}", "-H", f"X-Commit: {sha}", "-H", f'If-None-Match: W/"{sha}"',
             "-H", "X-Tenant-Id: 4711"]
    ci = ["--interface", "127.0.0.1"]
    billing = ["--interface", "127.0.0.2"]
    reports = ["--interface", "127.0.0.3"]
    replies = [
        curl(e.k, u(f"/v1/repos/acme/app/commits/{sha}?sha={sha}&id=12345&request_id={rid}"), *ci, *noise,
             "-H", f"Authorization: token {e.gh}"),
        curl(e.k, u("/v1/repos/acme/app/pulls/42?user_id=987654321&page=2"), *ci, *noise,
             "-H", f"Authorization: token {e.gh}"),
        curl(e.k, u(f"/v1/objects/invoice-2026-11.pdf?AWSAccessKeyId={e.akia}&Expires=1767225600&commit={sha}"
                    f"&trace={rid}"), *billing, *noise),
        curl(e.k, u("/v1/orders"), *billing, *noise, "-H", "Content-Type: application/json", "--data",
             json.dumps({"order_id": "ord-123456", "customer": rid, "commit": sha, "secret_id": "ab12cd34",
                         "items": [{"sku": "A-1001", "qty": 2}], "note": "deliver after 5pm"})),
        curl(e.k, u(f"/feed/items?cursor={cursor}&since={rid}"), *reports, *noise,
             "-H", f"Authorization: Bearer {e.gh}"),
    ]
    assert [r.status for r in replies] == [200] * 5, [(r.status, r.body[:200]) for r in replies]
    wait_for_audit(e.k, 5)


def test_upstream_saw_what_the_found_fields_say(env: Env) -> None:
    got = env.upstream.received
    assert all(env.gh not in json.dumps(r.headers) for r in got), "the GitHub token is stripped everywhere"
    assert got[0].headers["authorization"] == f"Bearer {env.api_secret}"
    # Not in strip.query_params: discovery reports it as forwarded, and it was.
    assert got[2].query["AWSAccessKeyId"] == [env.akia]


def test_audit_records_carry_exactly_the_findings(env: Env) -> None:
    records = env.k.audit()
    found = {(r["identity"]["id"], r["request"]["path"]): r.get("found", []) for r in records}
    fps = {f["fingerprint"] for fs in found.values() for f in fs}
    assert len(fps) == 2
    shape = sorted((ident, f["location"], f["detector"], f["action"])
                   for (ident, _), fs in found.items() for f in fs)
    assert shape == [
        (BILLING, "query:AWSAccessKeyId", "AWSKeyDetector", "forwarded"),
        (CI, "header:authorization", "GitHubTokenDetector", "stripped"),
        (CI, "header:authorization", "GitHubTokenDetector", "stripped"),
        (REPORTS, "header:authorization", "GitHubTokenDetector", "stripped"),
    ]
    # The JSON body (UUID, SHA, ids) was buffered and inspected, and holds nothing.
    assert found[(BILLING, "/v1/orders")] == []
    assert all(f["fingerprint"].startswith("hmac-sha256:") for fs in found.values() for f in fs)


def test_discover_aggregates_reuse_per_fingerprint(env: Env) -> None:
    r = env.keyless("discover", str(env.k.audit_file), "--format", "json")
    assert r.returncode == 0, r.stderr
    secrets_ = json.loads(r.stdout)["secrets"]
    assert len(secrets_) == 2
    gh, akia = secrets_
    assert gh["detectors"] == ["GitHubTokenDetector"] and gh["reuse"] is True
    assert [i["id"] for i in gh["identities"]] == [CI, REPORTS] and gh["count"] == 3 and gh["stripped"] == 3
    assert gh["migration"]["credential"]["localhost"]["type"] == "github_app"
    assert akia["detectors"] == ["AWSKeyDetector"] and akia["reuse"] is False and akia["forwarded"] == 1
    assert akia["locations"] == [{"location": "query:AWSAccessKeyId", "count": 1}]
    assert akia["migration"]["credential"]["localhost"]["type"] == "aws_sigv4"
    assert akia["migration"]["grant"]["workload"] == BILLING
    text = env.keyless("discover", str(env.k.audit_file))
    assert "REUSED (NHI9)" in text.stdout
    _no_canary(env, r.stdout + text.stdout)


@pytest.fixture(scope="module")
def report(env: Env) -> dict[str, Any]:
    r = env.keyless("report", "-c", str(env.k.config_file), "--audit", str(env.k.audit_file),
                    "--unused-days", "30", "-o", str(env.tmp / "report.json"))
    assert r.returncode == 0, r.stderr
    for fmt in ("html", "md"):
        r = env.keyless("report", "-c", str(env.k.config_file), "--audit", str(env.k.audit_file),
                        "--format", fmt, "-o", str(env.tmp / f"report.{fmt}"))
        assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads((env.tmp / "report.json").read_text())
    return doc


def test_report_shows_reach_use_reuse_and_the_unused_grant(env: Env, report: dict[str, Any]) -> None:
    ids = {i["id"]: i for i in report["identities"]}
    assert sorted(ids) == [BILLING, CI, REPORTS]
    reach = {k: sorted(g["reason"] for g in v["reach"]) for k, v in ids.items()}
    assert reach == {CI: ["ci may read the API"],
                     BILLING: ["billing may file reports with a minted JWT", "billing may read and write the API"],
                     REPORTS: ["reports may read the open feed"]}
    assert [g["reason"] for g in ids[BILLING]["unused_grants"]] == [UNUSED]
    assert ids[CI]["unused_grants"] == [] and ids[REPORTS]["unused_grants"] == []
    assert {u["reason"]: u["count"] for u in ids[BILLING]["used"]} == {"billing may read and write the API": 2}
    assert ids[CI]["used"][0]["last_used"]
    assert ids[CI]["shared_credentials"] == [{"credential": "api-key", "with": [BILLING]}]
    assert [s["shared_with"] for s in ids[REPORTS]["secrets_sent"]] == [[CI]]
    static = next(c for c in ids[CI]["credentials"] if c["name"] == "api-key")
    assert static["long_lived"] is True and static["type"] == "static"
    assert any("minted" in line or "JWT" in line for line in ids[BILLING]["if_compromised"])
    assert report["matrix"]["cells"] == {CI: {"api-key": "used"}, BILLING: {"api-key": "used", "minted": "allowed"},
                                         REPORTS: {}}
    kinds = sorted((f["nhi"], f["kind"]) for f in report["findings"])
    assert ("NHI9", "secret_reuse") in kinds and ("NHI9", "shared_credential") in kinds
    assert ("NHI5", "unused_grant") in kinds and ("NHI7", "long_lived_credential") in kinds
    assert ("NHI2", "secret_forwarded") in kinds
    assert report["summary"]["reused_secrets"] == 1 and report["summary"]["unused_grants"] == 1


def test_report_exits_non_zero_over_the_threshold(env: Env, report: dict[str, Any]) -> None:
    n = report["summary"]["findings"]
    args = ["report", "-c", str(env.k.config_file), "--audit", str(env.k.audit_file), "-o", os.devnull]
    over = env.keyless(*args, "--fail-over", str(n - 1))
    assert over.returncode == 1 and f"{n} findings" in over.stderr
    assert env.keyless(*args, "--fail-over", str(n)).returncode == 0


def test_admin_serves_the_live_report_and_metrics(env: Env, report: dict[str, Any]) -> None:
    live = requests.get(env.k.admin_url + "/report?format=json", timeout=30)
    assert live.status_code == 200
    assert live.json()["summary"] == report["summary"]
    page = requests.get(env.k.admin_url + "/report", timeout=30)
    assert page.headers["content-type"].startswith("text/html") and "Identity blast radius" in page.text
    metrics = requests.get(env.k.admin_url + "/metrics", timeout=10).text
    assert ('keyless_secrets_found_total{action="stripped",detector="GitHubTokenDetector",location="header"} 3.0'
            in metrics)
    assert 'keyless_secrets_found_total{action="forwarded",detector="AWSKeyDetector",location="query"} 1.0' in metrics
    _no_canary(env, live.text + page.text + metrics)


def test_no_canary_in_any_output(env: Env, report: dict[str, Any]) -> None:
    outputs = [env.k.audit_file.read_text(), env.k.log_file.read_text()]
    outputs += [(env.tmp / f"report.{fmt}").read_text() for fmt in ("json", "html", "md")]
    _no_canary(env, "\n".join(outputs))


def _no_canary(env: Env, text: str) -> None:
    for c in env.canaries:
        assert c not in text


# --- the page in a real browser ------------------------------------------------------------------

class _Figures(HTMLParser):
    """The figures the page shows: top tiles, per identity card, matrix cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tiles: dict[str, int] = {}
        self.cards: dict[str, dict[str, int]] = {}
        self.cells: dict[str, dict[str, str]] = {}
        self._card: str | None = None
        self._open: tuple[str, str | None, str | None] | None = None
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and a.get("class") == "card":
            self._card = a.get("data-identity")
        if a.get("data-figure"):
            self._open = ("figure", a["data-figure"], None)
        elif tag == "td" and a.get("data-identity"):
            self._open = ("cell", a["data-identity"], a.get("data-credential"))

    def handle_data(self, data: str) -> None:
        self.text += data
        if self._open is None:
            return
        kind, x, y = self._open
        self._open = None
        if kind == "cell" and x and y:
            if data.strip() != "–":
                self.cells.setdefault(x, {})[y] = data.strip()
        elif x and self._card is not None and x in ("reach", "used", "unused", "sent"):
            self.cards.setdefault(self._card, {})[x] = int(data)
        elif x and x != "count":
            self.tiles[x] = int(data)


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    profile = tmp / f"chromium-{secrets.token_hex(4)}"
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90)


def test_page_renders_in_chromium_with_the_json_figures(env: Env, report: dict[str, Any]) -> None:
    page = env.tmp / "report.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html.replace("https://localhost", ""), "no external asset"
    dom = _chromium(env.tmp, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    f = _Figures()
    f.feed(dom.stdout)
    s = report["summary"]
    assert f.tiles == {k: s[k] for k in ("identities", "credentials", "secrets", "reused_secrets", "unused_grants",
                                         "findings")}
    assert f.cells == {k: v for k, v in report["matrix"]["cells"].items() if v}
    assert f.cards == {i["id"]: {"reach": len(i["reach"]), "used": len(i["used"]),
                                 "unused": len(i["unused_grants"]), "sent": len(i["secrets_sent"])}
                       for i in report["identities"]}
    assert "If compromised, the attacker gets" in f.text
    shot = env.tmp / "report.png"
    r = _chromium(env.tmp, f"--screenshot={shot}", "--window-size=1100,1250", page.as_uri())
    assert r.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr[-2000:]
    if os.environ.get("KEYLESS_UPDATE_DOCS") == "1":
        shutil.copy(shot, REPO / "docs" / "governance-report.png")
        (REPO / "docs" / "governance-report.md").write_text(
            (env.tmp / "report.md").read_text().replace(str(env.upstream.https_port), "PORT")
            .replace(str(env.tmp) + "/", ""))


def test_small_json_body_is_buffered_and_inspected_a_chunked_one_is_not(tmp_path: Path, upstream: Upstream) -> None:
    password = "canary-pw-" + secrets.token_hex(8)
    (tmp_path / "api-key").write_text("k\n")
    cfg = base_config(
        tmp_path, upstream,
        trust=[{"name": "loopback", "type": "source_ip", "workloads": [{"cidr": "127.0.0.2/32", "id": BILLING}]}],
        policy={"dir": str(REPO / "tests" / "policies" / "governance")},
        credentials={"api-key": {"type": "static", "from": "file", "file": str(tmp_path / "api-key")},
                     "minted": {"type": "jwt"}},
        discovery={"max_body": "1k"})
    k = Keyless(tmp_path, cfg).start(log_level="debug")
    try:
        body = json.dumps({"user": "svc-billing", "password": password})
        big = json.dumps({"password": password, "pad": "x" * 2000})
        args = ["--interface", "127.0.0.2", "-H", "Content-Type: application/json"]
        replies = [curl(k, upstream.url("/v1/login"), *args, "--data", body),
                   curl(k, upstream.url("/v1/login"), *args, "-H", "Transfer-Encoding: chunked", "--data", body),
                   curl(k, upstream.url("/v1/login"), *args, "--data", big)]
        assert [r.status for r in replies] == [200, 200, 200]
        assert [json.loads(r.body)["password"] for r in upstream.received] == [password] * 3
        records = wait_for_audit(k, 3)
        assert [r.get("found", []) for r in records][1:] == [[], []]  # chunked; over discovery.max_body
        assert [(f["location"], f["detector"], f["action"]) for f in records[0]["found"]] == [
            ("body:$.password", "KeywordDetector", "forwarded")]
        text = k.audit_file.read_text() + k.stop()
        assert password not in text
    finally:
        k.stop()
