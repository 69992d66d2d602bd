"""Credential config: every mistake reported at once with its key path; no secret in repr()."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.credentials import CREDENTIALS, Runtime
from proxy.errors import ConfigError
from proxy.signing import Signer
from tests.harness import REPO


def problems(credentials: dict[str, object]) -> list[str]:
    raw = {"policy": {"dir": str(REPO / "policies")}, "credentials": credentials}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, REPO / "keyless.yaml")
    return e.value.problems


def test_each_mistake_is_one_line_naming_the_key() -> None:
    found = problems({
        "a": {"type": "oauth2", "token_url": "http://issuer.example/token", "client_id": "c",
              "client_secret_env": "X"},
        "b": {"type": "oauth2", "client_id": "c", "client_auth": "private_key_jwt", "client_secret_env": "X"},
        "c": {"type": "aws_sigv4", "role_arn": "not-an-arn"},
        "d": {"type": "github_app", "private_key_file": "app.pem", "permissions": {"contents": "everything"}},
        "e": {"type": "token_exchange", "issuer": "https://issuer.example", "client_id": "c",
              "client_secret_env": "X", "refresh_at": 1.5},
        "f": {"type": "static", "from": "aws_secrets_manager", "refresh_interval": 0},
    })
    expected = [
        "credentials.a.token_url: must be an https:// URL",
        "credentials.b.token_url: is required",
        "credentials.b.client_secret_env: not used with client_auth: private_key_jwt",
        "credentials.c.role_arn: must be an IAM role ARN",
        "credentials.c.endpoints: is required",
        "credentials.d.permissions: must map permission names",
        "credentials.d.app_id: is required",
        "credentials.e.refresh_at: must be below 1",
        "credentials.f.secret_id: is required",
        "credentials.f.refresh_interval: must be a number >= 1",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in found), (line, found)


def test_repr_never_shows_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KL_CANARY", "canary-client-secret-42")
    raw = {"policy": {"dir": str(REPO / "policies")}, "credentials": {
        "o": {"type": "oauth2", "token_url": "https://issuer.example/token", "client_id": "c",
              "client_secret_env": "KL_CANARY"},
        "t": {"type": "token_exchange", "token_url": "https://issuer.example/token", "client_id": "c",
              "client_secret_env": "KL_CANARY"},
    }}
    config = parse_config(raw, tmp_path / "keyless.yaml")
    runtime = Runtime(Signer.create("ES256", None, "keyless"))
    for name, p in config.credentials.items():
        provider = CREDENTIALS[p.type].create(name, p.options, runtime)
        assert "canary" not in repr(provider) and "canary" not in repr(p.options)
        assert "canary" not in repr(vars(provider) if hasattr(provider, "__dict__") else provider)


def test_missing_client_secret_is_a_config_error(tmp_path: Path) -> None:
    raw = {"policy": {"dir": str(REPO / "policies")}, "credentials": {
        "o": {"type": "oauth2", "token_url": "https://issuer.example/token", "client_id": "c",
              "client_secret_env": "KL_UNSET_VARIABLE"}}}
    config = parse_config(raw, tmp_path / "keyless.yaml")
    p = config.credentials["o"]
    with pytest.raises(ConfigError) as e:
        CREDENTIALS[p.type].create("o", p.options, Runtime(Signer.create("ES256", None, "keyless")))
    assert e.value.problems == ["credentials.o: client secret: environment variable KL_UNSET_VARIABLE is not set"]
