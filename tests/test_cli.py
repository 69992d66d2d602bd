"""The commands people type: ``keyless demo``, ``policy test``, ``env`` and ``ca``."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import requests

from tests.harness import REPO, Keyless, base_config
from tests.test_check import good_config, keyless


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "secret").write_text("canary-cli-secret\n")
    (tmp_path / "keyless.yaml").write_text(good_config())
    return tmp_path


def test_demo_exits_zero(tmp_path: Path) -> None:
    out = keyless("demo", cwd=tmp_path, timeout=90)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stdout.rstrip().endswith("demo passed")
    assert out.stdout.count("[ok]") >= 4


def test_policy_test_passes_on_the_shipped_policies(tmp_path: Path) -> None:
    out = keyless("policy", "test", str(REPO / "policies"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout and " 0 failed" in out.stdout


def test_policy_test_fails_on_a_failing_test(tmp_path: Path) -> None:
    pol = tmp_path / "policies"
    shutil.copytree(REPO / "policies", pol)
    (pol / "extra_test.rego").write_text(
        "package keyless.extra_test\n\nimport rego.v1\n\nimport data.keyless.egress\n\n"
        "test_everyone_is_allowed if {\n"
        '\td := egress.decision with input.identity as {"id": null, "attestations": []}\n'
        '\t\twith input.request as {"method": "GET", "scheme": "https", "host": "localhost", "port": 443,'
        ' "path": "/v1/x", "query": {}, "headers": {}}\n'
        "\td.allow == true\n}\n")
    out = keyless("policy", "test", str(pol), cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL data.keyless.extra_test.test_everyone_is_allowed" in out.stdout
    assert "1 failed" in out.stdout


def test_env_prints_every_variable(workdir: Path) -> None:
    # NO_PROXY is exported only to keep the user's entries (tests/test_clients.py): never blanked.
    out = keyless("env", "-c", "keyless.yaml", cwd=workdir, env={"NO_PROXY": "corp.example"})
    assert out.returncode == 0, out.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines()
                   if line.startswith("export "))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
                 "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE", "GIT_SSL_CAINFO", "npm_config_cafile",
                 "NODE_USE_ENV_PROXY"):
        assert name in exports, name
    assert exports["HTTP_PROXY"].startswith("http://127.0.0.1:")
    assert Path(exports["SSL_CERT_FILE"]).is_file()


def test_ca_prints_an_existing_certificate_with_a_private_key(workdir: Path) -> None:
    out = keyless("ca", "-c", "keyless.yaml", cwd=workdir)
    assert out.returncode == 0, out.stderr
    cert = Path(out.stdout.strip())
    assert cert.is_file() and cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    ca_dir = cert.parent
    assert ca_dir == workdir / "ca"
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    key = ca_dir / "mitmproxy-ca.pem"
    assert "PRIVATE KEY" in key.read_text()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # A second call reuses the same CA rather than minting a new one.
    first = cert.read_text()
    again = keyless("ca", "-c", "keyless.yaml", cwd=workdir)
    assert again.stdout == out.stdout and cert.read_text() == first


def test_ca_tightens_loose_permissions_of_an_existing_ca(workdir: Path) -> None:
    cert = Path(keyless("ca", "-c", "keyless.yaml", cwd=workdir).stdout.strip())
    key = cert.parent / "mitmproxy-ca.pem"
    cert.parent.chmod(0o755)
    key.chmod(0o644)
    assert keyless("ca", "-c", "keyless.yaml", cwd=workdir).returncode == 0
    assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_run_serves_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    k = Keyless(tmp_path, base_config(tmp_path)).start(log_level="info")
    try:
        assert requests.get(k.admin_url + "/healthz", timeout=5).json() == {"status": "ok"}
        assert k.ca_cert.is_file()
    finally:
        log = k.stop()
    assert k.proc is not None and k.proc.returncode == 0, log
    assert "Traceback" not in log
