"""Deployment artifacts: Kubernetes manifests checked against the Kubernetes JSON schemas.

No cluster runs here, so this is kubeconform's check done with the schemas shipped by the
``kubernetes-validate`` package (strict: unknown fields are errors), plus the invariants the
manifests must keep with the code: the uid the iptables rules exempt is the uid Keyless runs
as, and the embedded keyless.yaml and policy are valid for this version of Keyless.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from proxy.config import parse_config
from proxy.envexpand import expand as expand_env
from proxy.policy.embedded import EmbeddedEngine
from tests.harness import REPO

K8S_VERSION = "1.31.0"  # native sidecars (initContainers[].restartPolicy) are GA from 1.29
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_kubernetes_schema(path: Path) -> None:
    for doc in docs(path):
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_schema_check_catches_mistakes() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "a", "imag": "b"}]}}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def _by_kind(kind: str, path: Path) -> list[dict[str, Any]]:
    return [d for d in docs(path) if d["kind"] == kind]


def test_sidecar_uid_matches_iptables_exclusion_and_dockerfile() -> None:
    path = REPO / "deploy" / "kubernetes" / "sidecar.yaml"
    pod = _by_kind("Deployment", path)[0]["spec"]["template"]["spec"]
    init = {c["name"]: c for c in pod["initContainers"]}
    rules, keyless = init["keyless-iptables"], init["keyless"]
    assert rules["command"][:3] == ["keyless", "iptables", "--apply"]
    assert "NET_ADMIN" in rules["securityContext"]["capabilities"]["add"]
    uid = keyless["securityContext"]["runAsUser"]
    assert f"--uid={uid}" in rules["command"]
    assert keyless["restartPolicy"] == "Always"  # a native sidecar
    assert re.search(rf"^USER {uid}$", (REPO / "Dockerfile").read_text(), re.M)
    app = pod["containers"][0]
    assert not any(e["name"].lower().endswith("_proxy") for e in app.get("env", []))
    assert pod["volumes"][[v["name"] for v in pod["volumes"]].index("keyless-token")]["projected"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_embedded_config_and_policy_are_valid(path: Path, tmp_path: Path) -> None:
    for cm in _by_kind("ConfigMap", path):
        # ${VAR:-default} as `keyless run` expands it (the injector's ConfigMap takes its ports so).
        problems: list[str] = []
        cfg = expand_env(yaml.safe_load(cm["data"]["keyless.yaml"]), {}, problems)
        assert problems == []
        config = parse_config(cfg, tmp_path / "keyless.yaml")
        (tmp_path / "policies").mkdir(exist_ok=True)
        (tmp_path / "policies" / "egress.rego").write_text(cm["data"]["egress.rego"])
        engine = EmbeddedEngine.from_dir(tmp_path / "policies", config.policy.decision)
        assert engine.revision


def test_compose_sidecar_shares_the_apps_network_namespace() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    rules = compose["sidecar-iptables"]
    owner = rules["network_mode"].removeprefix("service:")
    assert compose["sidecar-app"]["network_mode"] == f"service:{owner}"
    assert "NET_ADMIN" in rules["cap_add"]
    assert not any("proxy" in k.lower() for k in compose["sidecar-app"].get("environment", {}))


def test_gateway_replicas_share_the_redis_the_manifest_runs() -> None:
    path = REPO / "deploy" / "kubernetes" / "gateway.yaml"
    config = yaml.safe_load(_by_kind("ConfigMap", path)[0]["data"]["keyless.yaml"])
    redis = config["cache"]["redis"]
    service = next(s for s in _by_kind("Service", path) if s["metadata"]["name"] == "keyless-redis")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert redis["url"] == f"redis://{host}:{service['spec']['ports'][0]['port']}/0"
    [store] = _by_kind("StatefulSet", path)
    assert store["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    args = store["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"  # revocations survive a Redis restart
    # Every secret the cache config names comes from a Secret, never a literal.
    gateway = _by_kind("Deployment", path)[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in gateway["env"]}
    for name in (redis["password_env"], redis["encryption_key_env"], config["cache"]["revocation"]["admin_token_env"]):
        assert "secretKeyRef" in env[name]["valueFrom"]
    # Only the gateway reaches Redis.
    policy = next(p for p in _by_kind("NetworkPolicy", path) if p["metadata"]["name"] == "keyless-redis")
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": service["spec"]["selector"] | {
        "app.kubernetes.io/name": "keyless-gateway"}}}]
