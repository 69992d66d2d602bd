"""Contract tests run over every entry of every plug-in registry.

Each registry entry must have a sample below (a new type without one fails here), and every
entry must keep the same promises: its config is validated with key paths (an unknown key is
reported, not ignored), it builds from a valid config, its ``repr`` shows no secret, and it
names itself with the name and type it was configured with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import parse_config
from proxy.credentials import CREDENTIALS, Runtime
from proxy.errors import ConfigError
from proxy.plugins import PluginSpec
from proxy.signing import Signer
from proxy.trust import TRUST_PROVIDERS
from tests.harness import REPO

CANARY = "canary-contract-secret-5f2e"


def credential_samples(tmp: Path) -> dict[str, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp / "app.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return {
        "static": {"from": "env", "env": "KL_CONTRACT_CANARY"},
        "jwt": {"ttl": 60},
        "oauth2": {"token_url": "https://issuer.example/token", "client_id": "c",
                   "client_secret_env": "KL_CONTRACT_CANARY"},
        "token_exchange": {"token_url": "https://issuer.example/token", "client_id": "c",
                           "client_secret_env": "KL_CONTRACT_CANARY"},
        "aws_sigv4": {"endpoints": [{"host": "s3.example", "service": "s3"}]},
        "github_app": {"app_id": 1, "private_key_file": str(pem)},
        "on_behalf_of": {"token_url": "https://issuer.example/token", "client_id": "c",
                         "client_secret_env": "KL_CONTRACT_CANARY"},
    }


def trust_samples(tmp: Path) -> dict[str, dict[str, Any]]:
    from tests.spiffe_ca import SpiffeCA

    bundle = SpiffeCA.create("test").bundle(tmp)
    return {
        "source_ip": {"workloads": [{"cidr": "127.0.0.0/8", "id": "spiffe://test/app"}]},
        "jwt": {"issuers": [{"issuer": "https://issuer.example", "audiences": ["keyless"],
                         "jwks_url": "https://issuer.example/jwks"}]},
        "mtls": {"bundles": [{"trust_domain": "test", "file": str(bundle)}]},
        "process": {"workloads": [{"uid": 0, "id": "spiffe://test/root"}]},
    }


def base(tmp: Path, **sections: Any) -> dict[str, Any]:
    return {"policy": {"dir": str(REPO / "policies")}, "tls": {"ca_dir": str(tmp / "ca")}, **sections}


def test_every_registry_uses_the_one_spec_shape() -> None:
    for registry in (CREDENTIALS, TRUST_PROVIDERS):
        assert all(isinstance(spec, PluginSpec) for spec in registry.values())
    # Only a credential that signs the body makes Keyless buffer it.
    assert {n for n, s in CREDENTIALS.items() if s.requires_request_body} == {"aws_sigv4"}


@pytest.mark.parametrize("kind", sorted(CREDENTIALS))
def test_credential_contract(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KL_CONTRACT_CANARY", CANARY)
    samples = credential_samples(tmp_path)
    assert kind in samples, f"credential type {kind!r} has no contract sample"
    sample = {"type": kind, **samples[kind]}
    config = parse_config(base(tmp_path, credentials={"c1": sample}), tmp_path / "keyless.yaml")
    spec = CREDENTIALS[kind]
    provider = spec.create("c1", config.credentials["c1"].options, Runtime(Signer.create("ES256", None, "keyless")))
    assert (provider.name, provider.type) == ("c1", kind)
    assert CANARY not in repr(provider) and CANARY not in repr(config.credentials["c1"].options)
    with pytest.raises(ConfigError) as e:
        parse_config(base(tmp_path, credentials={"c1": {**sample, "surprise": 1}}), tmp_path / "keyless.yaml")
    assert any(p.startswith("credentials.c1.surprise") for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("kind", sorted(TRUST_PROVIDERS))
def test_trust_provider_contract(kind: str, tmp_path: Path) -> None:
    samples = trust_samples(tmp_path)
    assert kind in samples, f"trust provider type {kind!r} has no contract sample"
    sample = {"name": "t1", "type": kind, **samples[kind]}
    config = parse_config(base(tmp_path, trust=[sample]), tmp_path / "keyless.yaml")
    provider = TRUST_PROVIDERS[kind].create("t1", config.trust[0].options)
    assert (provider.name, provider.type) == ("t1", kind)
    with pytest.raises(ConfigError) as e:
        parse_config(base(tmp_path, trust=[{**sample, "surprise": 1}]), tmp_path / "keyless.yaml")
    assert any(p.startswith("trust[0].surprise") for p in e.value.problems), e.value.problems
