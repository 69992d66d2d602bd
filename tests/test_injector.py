"""``keyless injector``: real AdmissionReview v1 requests over HTTPS to the real webhook process;
the JSON patches it answers are applied (RFC 6902, the ``jsonpatch`` package) to real pod
specs, and the results are checked against the Kubernetes schemas, for idempotence and against
the invariants the hand-written sidecar manifest keeps."""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import requests
import yaml
from kubernetes_validate import utils as kv

from proxy.demo import free_port, make_tls_files
from proxy.envexpand import expand
from tests.harness import REPO
from tests.test_deploy import K8S_VERSION


class Injector:
    def __init__(self, tmp: Path) -> None:
        self.ca, cert, key = make_tls_files(tmp, ("localhost",))
        self.port = free_port()
        self.log = tmp / "injector.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "injector", "--tls-cert", str(cert), "--tls-key", str(key),
                 "--address", "127.0.0.1", "--port", str(self.port), "--image", "registry.example/keyless:0.1.0"],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if requests.get(self.url("/healthz"), verify=str(self.ca), timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("injector did not start")

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    def review(self, pod: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
        uid = str(uuid.uuid4())
        doc = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                           "resource": {"group": "", "version": "v1", "resource": "pods"},
                           "namespace": "default", "operation": operation, "object": pod,
                           "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"}}}
        r = requests.post(self.url("/mutate"), json=doc, verify=str(self.ca), timeout=10)
        assert r.status_code == 200
        out: dict[str, Any] = r.json()
        assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
        assert out["response"]["uid"] == uid
        return out["response"]

    def mutate(self, pod: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The pod as the API server would store it after the patch, and the patch."""
        resp = self.review(pod)
        assert resp["allowed"] is True, resp
        if "patch" not in resp:
            return pod, []
        assert resp["patchType"] == "JSONPatch"
        ops = yaml.safe_load(base64.b64decode(resp["patch"]))
        return jsonpatch.apply_patch(pod, ops), ops


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Injector]:
    inj = Injector(tmp_path_factory.mktemp("injector"))
    yield inj
    inj.proc.terminate()
    inj.proc.wait(10)


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "containers": [{"name": "app", "image": "curlimages/curl:8.11.1",
                        "command": ["sh", "-c", "curl -sS https://api.billing.example/v1/invoices; sleep 3600"]}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "billing", "namespace": "default", "labels": {"app": "billing"},
                         "annotations": {"keyless.dev/inject": "true", **(annotations or {})}},
            "spec": base}


def sidecar_manifest_pod() -> dict[str, Any]:
    """The app side of deploy/kubernetes/sidecar.yaml, with everything Keyless removed: the pod
    an operator would write if the injector did the rest."""
    deploy = next(d for d in yaml.safe_load_all((REPO / "deploy/kubernetes/sidecar.yaml").read_text())
                  if d and d["kind"] == "Deployment")
    spec = copy.deepcopy(deploy["spec"]["template"]["spec"])
    spec.pop("initContainers")
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] in ("billing-api-key", "tmp")]
    for c in spec["containers"]:
        c.pop("env")
        c.pop("volumeMounts")
    spec["containers"][0]["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "billing", "annotations": {"keyless.dev/inject": "true",
                                                            "keyless.dev/config-map": "billing-keyless"}},
            "spec": spec}


def valid(p: dict[str, Any]) -> None:
    try:
        kv.validate(p, K8S_VERSION, strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{e.message} at {list(e.path)}")


PODS = {
    "minimal": pod(),
    "with-init-volumes-env": pod(
        initContainers=[{"name": "migrate", "image": "migrate:1", "env": [{"name": "A", "value": "1"}]}],
        volumes=[{"name": "data", "emptyDir": {}}],
        containers=[{"name": "app", "image": "app:1", "env": [{"name": "SSL_CERT_FILE", "value": "/mine.pem"}],
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}], "ports": [{"containerPort": 8080}]},
                    {"name": "worker", "image": "worker:1"}]),
    "sidecar-manifest-app": sidecar_manifest_pod(),
}


@pytest.mark.parametrize("name", list(PODS))
def test_injection_is_valid_complete_and_idempotent(injector: Injector, name: str) -> None:
    original = PODS[name]
    valid(original)
    injected, ops = injector.mutate(copy.deepcopy(original))
    assert ops
    valid(injected)
    spec = injected["spec"]
    inits = [c["name"] for c in spec["initContainers"]]
    assert inits[:2] == ["keyless-iptables", "keyless"]
    assert inits[2:] == [c["name"] for c in original["spec"].get("initContainers", [])]
    rules, keyless = spec["initContainers"][0], spec["initContainers"][1]
    uid = keyless["securityContext"]["runAsUser"]
    assert rules["command"][:3] == ["keyless", "iptables", "--apply"] and f"--uid={uid}" in rules["command"]
    assert "NET_ADMIN" in rules["securityContext"]["capabilities"]["add"]
    assert keyless["restartPolicy"] == "Always" and keyless["image"] == "registry.example/keyless:0.1.0"
    # Every app container trusts the published CA; a variable the pod set itself is kept.
    for c in spec["containers"] + spec["initContainers"][2:]:
        env = {e["name"]: e["value"] for e in c["env"]}
        assert any(m["name"] == "keyless-ca-cert" and m["readOnly"] for m in c["volumeMounts"])
        assert not any(n.lower().endswith("_proxy") for n in env)
        mine = {e["name"]: e["value"] for e in next(
            (o for o in original["spec"]["containers"] + original["spec"].get("initContainers", [])
             if o["name"] == c["name"]), {}).get("env", [])}
        for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE"):
            assert env[var] == mine.get(var, "/var/run/keyless-ca/bundle.pem")
    assert injected["metadata"]["annotations"]["keyless.dev/status"] == "injected"
    # The original's own containers, volumes and mounts are all still there, unchanged.
    for v in original["spec"].get("volumes", []):
        assert v in spec["volumes"]
    # A second pass (re-invocation, re-submission) changes nothing.
    again, more = injector.mutate(copy.deepcopy(injected))
    assert more == [] and again == injected


def test_ports_in_the_configmap_match_the_probes_and_rules(injector: Injector) -> None:
    injected, _ = injector.mutate(pod({"keyless.dev/proxy-port": "15555", "keyless.dev/admin-port": "15556"}))
    keyless = injected["spec"]["initContainers"][1]
    env = {e["name"]: e["value"] for e in keyless["env"]}
    cm = next(d for d in yaml.safe_load_all((REPO / "deploy/kubernetes/injector.yaml").read_text())
              if d and d["kind"] == "ConfigMap")
    problems: list[str] = []
    cfg = expand(yaml.safe_load(cm["data"]["keyless.yaml"]), env, problems)
    assert problems == []
    assert cfg["listen"]["port"] == 15555 and cfg["admin"]["port"] == 15556
    # The bundle the app containers are pointed at is the one this Keyless publishes.
    from proxy.injector import CA_FILE

    assert cfg["tls"]["publish_bundle"] == CA_FILE
    assert "--proxy-port=15555" in injected["spec"]["initContainers"][0]["command"]
    assert keyless["startupProbe"]["httpGet"]["port"] == 15556


def test_annotations_override_the_defaults(injector: Injector) -> None:
    injected, _ = injector.mutate(pod({"keyless.dev/image": "mirror.example/keyless:0.2", "keyless.dev/ports": "all",
                                       "keyless.dev/config-map": "team-keyless",
                                       "keyless.dev/credentials-secret": "team-api-keys"}))
    valid(injected)
    spec = injected["spec"]
    assert {c["image"] for c in spec["initContainers"]} == {"mirror.example/keyless:0.2"}
    assert "--ports=all" in spec["initContainers"][0]["command"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["keyless-config"]["configMap"]["name"] == "team-keyless"
    assert vols["keyless-credentials"]["secret"]["secretName"] == "team-api-keys"
    # Only the keyless container mounts the credentials.
    assert [c["name"] for c in spec["initContainers"] + spec["containers"]
            if any(m["name"] == "keyless-credentials" for m in c.get("volumeMounts", []))] == ["keyless"]


def test_pod_without_the_annotation_is_untouched(injector: Injector) -> None:
    plain = pod()
    del plain["metadata"]["annotations"]["keyless.dev/inject"]
    resp = injector.review(copy.deepcopy(plain))
    assert resp["allowed"] is True and "patch" not in resp and "patchType" not in resp
    off = pod({"keyless.dev/inject": "false"})
    assert "patch" not in injector.review(off)
    # Not a CREATE, not a Pod: allowed, no patch.
    assert "patch" not in injector.review(pod(), operation="UPDATE")


@pytest.mark.parametrize("case,reason", [
    ("hostNetwork", "hostNetwork pods cannot be injected"),
    ("port", "already uses port 15001"),
    ("uid", "runs as uid 10001"),
    ("name", "already has a container named 'keyless'"),
    ("volume", "already has a volume named 'keyless-config'"),
    ("annotation", "keyless.dev/proxy-port: must be a port number"),
    ("unknown", "unknown annotation keyless.dev/imgae"),
])
def test_refuses_what_it_cannot_inject_safely(injector: Injector, case: str, reason: str) -> None:
    p = pod()
    spec = p["spec"]
    if case == "hostNetwork":
        spec["hostNetwork"] = True
    elif case == "port":
        spec["containers"][0]["ports"] = [{"containerPort": 15001}]
    elif case == "uid":
        spec["securityContext"] = {"runAsUser": 10001}
    elif case == "name":
        spec["initContainers"] = [{"name": "keyless", "image": "someone-elses:1"}]
    elif case == "volume":
        spec["volumes"] = [{"name": "keyless-config", "emptyDir": {}}]
    elif case == "annotation":
        p["metadata"]["annotations"]["keyless.dev/proxy-port"] = "http"
    else:
        p["metadata"]["annotations"]["keyless.dev/imgae"] = "typo:1"
    resp = injector.review(p)
    assert resp["allowed"] is False and "patch" not in resp
    assert reason in resp["status"]["message"], resp["status"]
    assert resp["status"]["code"] == 403


def test_malformed_reviews_are_refused_not_crashed(injector: Injector) -> None:
    for body in (b"not json", b"[]", b'{"kind": "AdmissionReview", "request": {"uid": "x", "kind": {"kind": "Pod"},'
                                          b' "object": {"metadata": {"annotations": {"keyless.dev/inject": "true"}},'
                                          b' "spec": {"containers": "nope"}}}}'):
        r = requests.post(injector.url("/mutate"), data=body, verify=str(injector.ca), timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["response"]["allowed"] is False
    assert injector.proc.poll() is None
    assert "Traceback" not in injector.log.read_text()
