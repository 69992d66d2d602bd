"""Hot reload and bundles: swap atomically under load, reject broken versions, poll with ETag."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import requests

from proxy.policy.options import BundleOptions, PolicyExtras, ReloadOptions
from proxy.policy.runtime import build_policy
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit
from tests.policy_helpers import BundleServer, copy_policies, make_bundle, readyz, wait_until, write_atomically
from tests.test_policy_opa import TABLE

QUERY = "data.keyless.egress.decision"
OLD_REASON = "billing may read the demo API with its API key"


def _credentials(tmp: Path) -> dict[str, object]:
    (tmp / "key").write_text("canary-reload-key-7\n")
    return {"demo-api": {"type": "static", "from": "file", "file": str(tmp / "key")},
            "workload-jwt": {"type": "jwt"}}


def test_reload_under_load_drops_nothing_and_rejects_broken_versions(tmp_path: Path, upstream: Upstream) -> None:
    policies = copy_policies(tmp_path / "policies")
    write_atomically(policies / ".manifest", json.dumps({"revision": "v1"}))
    cfg = base_config(tmp_path, upstream, credentials=_credentials(tmp_path),
                      policy={"dir": str(policies), "reload": {"interval": 0.1}})
    k = Keyless(tmp_path, cfg).start()
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with requests.Session() as s:
            s.proxies = {"https": k.proxy_url}
            s.verify = str(k.ca_cert)
            s.trust_env = False  # NO_PROXY in the environment must not bypass Keyless
            while not stop.is_set():
                try:
                    statuses.append(s.get(upstream.url("/v1/invoices"), timeout=10).status_code)
                except requests.RequestException:
                    statuses.append(-1)

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    rego = policies / "egress.rego"
    original = rego.read_text()
    try:
        for w in workers:
            w.start()
        wait_until(lambda: len(statuses) > 20, what="traffic")
        assert readyz(k)["policy"]["revision"] == "v1"

        # 1. A good edit with a new revision is swapped in while requests flow.
        write_atomically(rego, original.replace(OLD_REASON, "billing reads the demo API (v2)"))
        write_atomically(policies / ".manifest", json.dumps({"revision": "v2"}))
        wait_until(lambda: readyz(k)["policy"]["revision"] == "v2", what="revision v2")
        seen = len(statuses)
        wait_until(lambda: len(statuses) > seen + 20, what="traffic on v2")

        # 2. A syntax error is rejected; v2 stays in force; the failure is counted and exported.
        write_atomically(rego, original.replace("package keyless.egress", "package keyless.egress\n\nbroken := {"))
        write_atomically(policies / ".manifest", json.dumps({"revision": "v3-broken"}))
        wait_until(lambda: readyz(k)["policy"]["reload_failures"] >= 1, what="rejected syntax error")
        status = readyz(k)["policy"]
        assert status["revision"] == "v2" and "egress.rego" in status["last_reload_error"]

        # 3. A version that compiles but fails its own tests is rejected too.
        write_atomically(rego, original.replace('"credential": "demo-api"', '"credential": "someone-else"'))
        write_atomically(policies / ".manifest", json.dumps({"revision": "v4-untested"}))
        wait_until(lambda: readyz(k)["policy"]["reload_failures"] >= 2, what="rejected failing tests")
        status = readyz(k)["policy"]
        assert status["revision"] == "v2" and "test_billing_reads_with_api_key" in status["last_reload_error"]
        seen = len(statuses)
        wait_until(lambda: len(statuses) > seen + 20, what="traffic after rejections")
    finally:
        stop.set()
        for w in workers:
            w.join(15)
        log = k.stop()
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests, statuses {set(statuses)}"
    records = wait_for_audit(k, len(statuses))
    assert len(records) == len(statuses)
    revisions = {r["policy_revision"] for r in records}
    assert revisions == {"v1", "v2"}
    for r in records:
        expected = OLD_REASON if r["decision"]["revision"] == "v1" else "billing reads the demo API (v2)"
        assert r["decision"]["reason"] == expected
    assert "policy reload rejected, revision v2 stays in force" in log
    assert "canary-reload-key" not in log


def test_bundle_from_a_bundle_server_polled_with_etag(tmp_path: Path, upstream: Upstream) -> None:
    policies = copy_policies(tmp_path / "policies")
    server = BundleServer()
    server.publish(make_bundle(policies, "b1"))
    cfg = base_config(tmp_path, upstream, credentials=_credentials(tmp_path),
                      policy={"bundle": {"url": server.url, "poll_interval": 0.1}})
    k = Keyless(tmp_path, cfg).start()
    try:
        assert readyz(k)["policy"]["revision"] == "b1"
        wait_until(lambda: server.not_modified >= 3, what="conditional polls")
        before = server.full
        proxies = {"https": k.proxy_url}
        assert requests.get(upstream.url("/v1/invoices"), proxies=proxies, verify=str(k.ca_cert),
                            timeout=10).status_code == 200

        rego = policies / "egress.rego"
        rego.write_text(rego.read_text().replace(OLD_REASON, "from bundle b2"))
        server.publish(make_bundle(policies, "b2"))
        wait_until(lambda: readyz(k)["policy"]["revision"] == "b2", what="bundle b2")
        assert server.full == before + 1  # fetched once, then 304s again
        r = requests.get(upstream.url("/v1/invoices"), proxies=proxies, verify=str(k.ca_cert), timeout=10)
        assert r.status_code == 200

        server.publish(b"this is not a gzip archive")
        wait_until(lambda: readyz(k)["policy"]["reload_failures"] == 1, what="rejected bundle")
        assert readyz(k)["policy"]["revision"] == "b2"
    finally:
        k.stop()
    records = wait_for_audit(k, 2)
    assert [(r["policy_revision"], r["decision"]["reason"]) for r in records] == [
        ("b1", OLD_REASON), ("b2", "from bundle b2")]


def test_bundle_archive_from_a_path_with_nested_data(tmp_path: Path) -> None:
    src = copy_policies(tmp_path / "src")
    (src / "egress.rego").write_text((src / "egress.rego").read_text().replace(
        '"reason": "billing may read the demo API with its API key"',
        '"reason": data.acme.texts.read'))
    (src / "acme" / "texts").mkdir(parents=True)
    (src / "acme" / "texts" / "data.json").write_text(json.dumps({"read": "reason from nested data.json"}))
    bundle = tmp_path / "bundle.tar.gz"
    bundle.write_bytes(make_bundle(src, "2026.11.25-1"))
    extras = PolicyExtras(bundle=BundleOptions(path=bundle), reload=ReloadOptions(enabled=False))
    runtime = build_policy("embedded", REPO / "policies", QUERY, extras)
    assert runtime.engine.revision == "2026.11.25-1"
    d = asyncio.run(runtime.engine.decide(TABLE[0]))
    assert d.allow and d.reason == "reason from nested data.json"


CRASHING_TEST = """package keyless.crash_test

import rego.v1

# regorus 0.13.0 panics (a Rust panic, PyO3's PanicException) on strings.count with an empty needle.
test_engine_panics if {
	strings.count(input.request.path, "") == 0 with input.request.path as "/v1/x"
}
"""


def test_a_test_that_panics_the_engine_rejects_the_version_not_the_proxy(tmp_path: Path, upstream: Upstream) -> None:
    policies = copy_policies(tmp_path / "policies")
    cfg = base_config(tmp_path, upstream, credentials=_credentials(tmp_path),
                      policy={"dir": str(policies), "reload": {"interval": 0.1}})
    k = Keyless(tmp_path, cfg).start()
    proxies = {"https": k.proxy_url}
    try:
        revision = readyz(k)["policy"]["revision"]
        write_atomically(policies / "crash_test.rego", CRASHING_TEST)
        wait_until(lambda: readyz(k)["policy"]["reload_failures"] == 1, what="rejected panicking tests")
        status = readyz(k)["policy"]
        assert status["revision"] == revision
        assert "test failed: data.keyless.crash_test.test_engine_panics: error:" in status["last_reload_error"]
        r = requests.get(upstream.url("/v1/invoices"), proxies=proxies, verify=str(k.ca_cert), timeout=10)
        assert r.status_code == 200
    finally:
        k.stop()
    # At start (and in `keyless check`), the same version is refused with one clear line.
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "-c", str(k.config_file)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "policy: test failed: data.keyless.crash_test.test_engine_panics" in out.stderr


def test_hostile_bundles_are_rejected(tmp_path: Path) -> None:
    import io
    import tarfile

    import pytest

    from proxy.policy.bundle import MAX_BUNDLE_BYTES, read_bundle_archive
    from proxy.policy.embedded import PolicyLoadError

    def archive(name: str, data: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    with pytest.raises(PolicyLoadError, match="escapes the bundle root"):
        read_bundle_archive(archive("../evil.rego", b"package x"), "b.tar.gz")
    bomb = archive("data.json", b" " * (MAX_BUNDLE_BYTES + 1))
    assert len(bomb) < 200_000  # small on the wire
    with pytest.raises(PolicyLoadError, match="unpacks to more than"):
        read_bundle_archive(bomb, "b.tar.gz")
    with pytest.raises(PolicyLoadError, match="not a gzipped tar bundle"):
        read_bundle_archive(b"plain text", "b.tar.gz")
