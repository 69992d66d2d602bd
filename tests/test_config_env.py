"""``${VAR}`` and ``${VAR:-default}`` in keyless.yaml: expanded from the environment, typed when a
value is one reference, and an unset variable reported by ``keyless check`` with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config import load_config
from proxy.envexpand import expand
from tests.harness import REPO
from tests.test_check import keyless


def test_expansion_rules() -> None:
    env = {"PORT": "9090", "HOST": "0.0.0.0", "EMPTY": "", "FLAG": "true", "NAME": "a: {b: c}"}
    problems: list[str] = []
    raw = {"listen": {"port": "${PORT}", "address": "${HOST}"},
           "a": ["x-${HOST}-y", "${MISSING:-fallback}", "${EMPTY:-used-when-empty}", "$${HOST}", "${FLAG}"],
           "b": "${NAME}", "c": 5, "${PORT}": "keys are not expanded"}
    out = expand(raw, env, problems)
    assert problems == []
    assert out["listen"] == {"port": 9090, "address": "0.0.0.0"}
    assert out["a"] == ["x-0.0.0.0-y", "fallback", "used-when-empty", "${HOST}", True]
    # A value that looks like YAML structure stays a string: expansion never adds keys.
    assert out["b"] == "a: {b: c}" and out["c"] == 5 and out["${PORT}"] == "keys are not expanded"


def test_unset_and_malformed_references_name_their_key_path() -> None:
    problems: list[str] = []
    expand({"trust": [{"workloads": [{"id": "${WORKLOAD_ID}"}]}], "audit": {"path": "${oops"}}, {}, problems)
    assert problems[0].startswith("trust[0].workloads[0].id: environment variable WORKLOAD_ID is not set")
    assert problems[1].startswith("audit.path: malformed variable reference")


def _config(tmp_path: Path, **listen: object) -> Path:
    cfg = {"listen": {"address": "127.0.0.1", **listen}, "admin": {"enabled": False},
           "tls": {"ca_dir": "${CA_DIR:-ca}"}, "policy": {"dir": str(REPO / "policies")},
           "audit": {"path": "${AUDIT_PATH}"}}
    path = tmp_path / "keyless.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_load_config_expands_and_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KL_PORT", "18123")
    monkeypatch.setenv("AUDIT_PATH", str(tmp_path / "audit.log"))
    config = load_config(_config(tmp_path, port="${KL_PORT}"))
    assert config.listen.port == 18123
    assert config.tls.ca_dir == tmp_path / "ca"
    assert config.audit.path == str(tmp_path / "audit.log")


def test_check_reports_an_unset_variable_with_its_key_path(tmp_path: Path) -> None:
    path = _config(tmp_path, port="${KL_UNSET_PORT_FOR_TEST}")
    out = keyless("check", "-c", str(path), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "listen.port: environment variable KL_UNSET_PORT_FOR_TEST is not set" in out.stderr
    assert "audit.path: environment variable AUDIT_PATH is not set" in out.stderr
    good = keyless("check", "-c", str(path), cwd=tmp_path,
                   env={"KL_UNSET_PORT_FOR_TEST": "0", "AUDIT_PATH": "-"})
    assert good.returncode == 0, good.stderr
