"""``keyless injector``: a Kubernetes mutating admission webhook that adds the Keyless sidecar.

A pod annotated ``keyless.dev/inject: "true"`` gets what deploy/kubernetes/sidecar.yaml writes
by hand: the ``keyless-iptables`` init container (redirects outbound TCP to Keyless, exempts
Keyless's uid), Keyless as a native sidecar (an init container with ``restartPolicy: Always``,
so it starts before and outlives the app), the CA volumes, and the CA variables in every app
container. Per-pod overrides are annotations (``ANNOTATIONS``); docs/deployment.md has the table.

The patch is computed from what is missing, so injecting twice (a re-invocation, a pod
re-submitted) adds nothing. What cannot be injected safely is refused (the pod is not
created) rather than started without Keyless: a pod on the host network (the rules would
redirect the node's traffic), a container that already uses the proxy or admin port, a
container running as Keyless's uid (its traffic would be exempt from the redirect), names
Keyless needs that the pod already uses for something else, malformed annotations.

Everything here is plain functions over the pod as JSON; ``make_app`` is the aiohttp server.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

log = logging.getLogger("keyless.injector")

PREFIX = "keyless.dev/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
ANNOTATIONS = {
    "config-map": "ConfigMap with keyless.yaml and egress.rego (default: --config-map)",
    "image": "Keyless image for both containers (default: --image)",
    "proxy-port": "Keyless's transparent listener, the REDIRECT target (default 15001)",
    "admin-port": "Keyless's admin listener, probed by the kubelet (default 15021)",
    "ports": "outbound TCP ports to redirect, or 'all' (default 80,443)",
    "credentials-secret": "Secret mounted read-only in the keyless container only, at /var/run/secrets/keyless",
}
KEYLESS_UID = 10001  # the Dockerfile's USER, and what `keyless iptables --uid` exempts
CA_DIR = "/var/run/keyless-ca"
# The ConfigMap's tls.publish_bundle: system roots plus the Keyless CA, so hosts the rules do not
# redirect (other ports) still verify.
CA_FILE = f"{CA_DIR}/bundle.pem"
CA_ENV = ("SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE",
          "GIT_SSL_CAINFO")
VOLUMES = ("keyless-config", "keyless-ca-key", "keyless-ca-cert", "keyless-tmp", "keyless-xtables-run",
           "keyless-credentials")
INIT_NAMES = ("keyless-iptables", "keyless")
_IMAGE = re.compile(r"[a-z0-9][a-z0-9._/:@-]*", re.I)
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_PORTS = re.compile(r"all|[0-9]{1,5}(,[0-9]{1,5})*")


class Refused(Exception):
    """The pod asked for Keyless but cannot be injected safely: the reason, for the user."""


@dataclass(frozen=True, slots=True)
class Options:
    """The injector's defaults (``keyless injector`` flags), overridden per pod by annotation."""

    image: str = "keyless:0.1.0"
    config_map: str = "keyless"
    proxy_port: int = 15001
    admin_port: int = 15021
    ports: str = "80,443"
    credentials_secret: str | None = None


def wants_injection(pod: dict[str, Any]) -> bool:
    value = (pod.get("metadata", {}).get("annotations") or {}).get(INJECT, "")
    return str(value).lower() in ("true", "yes", "enabled")


def pod_options(pod: dict[str, Any], defaults: Options) -> Options:
    """``defaults`` with the pod's ``keyless.dev/*`` annotations applied; Refused on a bad one."""
    ann = pod.get("metadata", {}).get("annotations") or {}
    unknown = sorted(k for k in ann if k.startswith(PREFIX) and k[len(PREFIX):] not in (*ANNOTATIONS, "inject",
                                                                                          "status"))
    if unknown:
        raise Refused(f"unknown annotation {unknown[0]} (known: {', '.join(PREFIX + a for a in ANNOTATIONS)})")
    opts = defaults
    if (v := ann.get(PREFIX + "image")) is not None:
        if not _IMAGE.fullmatch(v):
            raise Refused(f"{PREFIX}image: not an image reference: {v!r}")
        opts = replace(opts, image=v)
    for key, field in (("config-map", "config_map"), ("credentials-secret", "credentials_secret")):
        if (v := ann.get(PREFIX + key)) is not None:
            if not (_NAME.fullmatch(v) and len(v) <= 253):
                raise Refused(f"{PREFIX}{key}: not a valid object name: {v!r}")
            opts = replace(opts, **{field: v})
    opts = replace(opts, proxy_port=_port(ann, "proxy-port", opts.proxy_port),
                   admin_port=_port(ann, "admin-port", opts.admin_port))
    if (v := ann.get(PREFIX + "ports")) is not None:
        if not _PORTS.fullmatch(v) or (v != "all" and not all(1 <= int(p) <= 65535 for p in v.split(","))):
            raise Refused(f"{PREFIX}ports: must be 'all' or a comma-separated list of ports, got {v!r}")
        opts = replace(opts, ports=v)
    if opts.proxy_port == opts.admin_port:
        raise Refused("proxy-port and admin-port must differ")
    return opts


def _port(ann: dict[str, str], key: str, default: int) -> int:
    v = ann.get(PREFIX + key)
    if v is None:
        return default
    if not (str(v).isdigit() and 1 <= int(v) <= 65535):
        raise Refused(f"{PREFIX}{key}: must be a port number from 1 to 65535, got {v!r}")
    return int(v)


def _pointer(*parts: str | int) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _refuse_unsafe(spec: dict[str, Any], annotated_as_injected: bool, opts: Options) -> None:
    if spec.get("hostNetwork"):
        raise Refused("hostNetwork pods cannot be injected: the iptables rules would redirect the node's traffic")
    if (spec.get("os") or {}).get("name") == "windows":
        raise Refused("Windows pods cannot be injected: the redirect is Linux iptables")
    pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if c.get("name") in INIT_NAMES:
            if annotated_as_injected:
                continue
            raise Refused(f"the pod already has a container named {c['name']!r}: Keyless needs that name")
        uid = (c.get("securityContext") or {}).get("runAsUser", pod_uid)
        if uid == KEYLESS_UID:
            raise Refused(f"container {c.get('name')!r} runs as uid {KEYLESS_UID}, the uid the redirect exempts: "
                          "its traffic would bypass Keyless")
        for p in c.get("ports", []):
            for port in (p.get("containerPort"), p.get("hostPort")):
                if port in (opts.proxy_port, opts.admin_port):
                    raise Refused(f"container {c.get('name')!r} already uses port {port}, which Keyless needs "
                                  f"(set {PREFIX}proxy-port or {PREFIX}admin-port)")
    if not annotated_as_injected:
        taken = sorted({v.get("name") for v in spec.get("volumes", [])} & set(VOLUMES))
        if taken:
            raise Refused(f"the pod already has a volume named {taken[0]!r}: Keyless needs that name")


def _iptables(opts: Options) -> dict[str, Any]:
    return {
        "name": "keyless-iptables", "image": opts.image, "imagePullPolicy": "IfNotPresent",
        "command": ["keyless", "iptables", "--apply", f"--uid={KEYLESS_UID}", f"--proxy-port={opts.proxy_port}",
                    f"--ports={opts.ports}"],
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}},
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": [{"name": "keyless-xtables-run", "mountPath": "/run"}],
    }


def _sidecar(opts: Options) -> dict[str, Any]:
    mounts = [
        {"name": "keyless-config", "mountPath": "/etc/keyless/keyless.yaml", "subPath": "keyless.yaml",
         "readOnly": True},
        {"name": "keyless-config", "mountPath": "/etc/keyless/policies/egress.rego", "subPath": "egress.rego",
         "readOnly": True},
        {"name": "keyless-ca-key", "mountPath": "/var/lib/keyless"},
        {"name": "keyless-ca-cert", "mountPath": CA_DIR},
        {"name": "keyless-tmp", "mountPath": "/tmp"},  # noqa: S108 - the container's own emptyDir
    ]
    if opts.credentials_secret:
        mounts.append({"name": "keyless-credentials", "mountPath": "/var/run/secrets/keyless", "readOnly": True})
    probe = {"httpGet": {"path": "/readyz", "port": opts.admin_port}}
    return {
        "name": "keyless", "image": opts.image, "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",  # native sidecar: starts before the app, stops after it
        "args": ["run", "-c", "/etc/keyless/keyless.yaml"],
        # The ConfigMap's keyless.yaml reads these (`port: ${KEYLESS_PROXY_PORT:-15001}`), so the
        # ports the injector probes and redirects to are the ones Keyless listens on.
        "env": [{"name": "KEYLESS_PROXY_PORT", "value": str(opts.proxy_port)},
                {"name": "KEYLESS_ADMIN_PORT", "value": str(opts.admin_port)}],
        "ports": [{"name": "keyless-admin", "containerPort": opts.admin_port}],
        "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 30},
        "readinessProbe": {**probe, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": opts.admin_port}, "periodSeconds": 10},
        "securityContext": {"runAsUser": KEYLESS_UID, "runAsGroup": KEYLESS_UID, "runAsNonRoot": True,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": mounts,
    }


def _volumes(opts: Options) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [
        {"name": "keyless-config", "configMap": {"name": opts.config_map}},
        {"name": "keyless-ca-key", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "keyless-ca-cert", "emptyDir": {"sizeLimit": "1Mi"}},
        {"name": "keyless-tmp", "emptyDir": {"sizeLimit": "16Mi"}},
        {"name": "keyless-xtables-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    if opts.credentials_secret:
        # 0444 without a pod-level fsGroup: only the keyless container mounts it.
        vols.append({"name": "keyless-credentials", "secret": {"secretName": opts.credentials_secret,
                                                               "defaultMode": 0o444}})
    return vols


def patch_for(pod: dict[str, Any], defaults: Options) -> list[dict[str, Any]]:
    """The RFC 6902 patch that injects Keyless into ``pod``: empty for a pod not annotated for it
    or already complete; Refused when it cannot be done safely."""
    if not wants_injection(pod):
        return []
    opts = pod_options(pod, defaults)
    spec = pod.get("spec") or {}
    annotations = pod.get("metadata", {}).get("annotations") or {}
    injected = annotations.get(STATUS) == "injected"
    _refuse_unsafe(spec, injected, opts)
    ops: list[dict[str, Any]] = []

    inits = spec.get("initContainers") or []
    have = {c.get("name") for c in inits}
    # First the rules, then Keyless, then the pod's own init containers (their traffic is redirected).
    new_inits = [c for c in (_iptables(opts), _sidecar(opts)) if c["name"] not in have]
    if "initContainers" not in spec:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": new_inits})
    else:
        for i, c in enumerate(new_inits):
            ops.append({"op": "add", "path": _pointer("spec", "initContainers", i), "value": c})

    vols = spec.get("volumes")
    missing = [v for v in _volumes(opts) if v["name"] not in {x.get("name") for x in vols or []}]
    if vols is None:
        ops.append({"op": "add", "path": "/spec/volumes", "value": missing})
    else:
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in missing]

    # Every app container (and the pod's own init containers) trusts the CA Keyless publishes.
    for kind in ("initContainers", "containers"):
        offset = len(new_inits) if kind == "initContainers" and "initContainers" in spec else 0
        for i, c in enumerate(spec.get(kind) or []):
            if c.get("name") in INIT_NAMES:
                continue
            ops += _container_ops(kind, i + offset, c)

    if not injected:
        ops.append({"op": "add", "path": _pointer("metadata", "annotations", STATUS), "value": "injected"})
    return ops


def _container_ops(kind: str, index: int, c: dict[str, Any]) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    env_names = {e.get("name") for e in c.get("env") or []}
    # A variable the pod sets itself is left alone: its author chose that bundle.
    env = [{"name": n, "value": CA_FILE} for n in CA_ENV if n not in env_names]
    if env:
        if "env" not in c:
            ops.append({"op": "add", "path": _pointer("spec", kind, index, "env"), "value": env})
        else:
            ops += [{"op": "add", "path": _pointer("spec", kind, index, "env", "-"), "value": e} for e in env]
    mounts = c.get("volumeMounts")
    if not any(m.get("name") == "keyless-ca-cert" for m in mounts or []):
        if any(m.get("mountPath") == CA_DIR for m in mounts or []):
            raise Refused(f"container {c.get('name')!r} already mounts something at {CA_DIR}")
        mount = {"name": "keyless-ca-cert", "mountPath": CA_DIR, "readOnly": True}
        if mounts is None:
            ops.append({"op": "add", "path": _pointer("spec", kind, index, "volumeMounts"), "value": [mount]})
        else:
            ops.append({"op": "add", "path": _pointer("spec", kind, index, "volumeMounts", "-"), "value": mount})
    return ops


def review(request_doc: Any, defaults: Options) -> dict[str, Any]:
    """An AdmissionReview v1 request -> its response document. Never raises for bad input."""
    uid = ""
    try:
        if not isinstance(request_doc, dict) or request_doc.get("kind") != "AdmissionReview":
            raise Refused("not an AdmissionReview")
        req = request_doc.get("request") or {}
        uid = str(req.get("uid", ""))
        kind = (req.get("kind") or {}).get("kind")
        pod = req.get("object")
        if kind != "Pod" or not isinstance(pod, dict) or req.get("operation", "CREATE") != "CREATE":
            response: dict[str, Any] = {"uid": uid, "allowed": True}
        else:
            ops = patch_for(pod, defaults)
            response = {"uid": uid, "allowed": True}
            if ops:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
            name = pod.get("metadata", {}).get("name") or pod.get("metadata", {}).get("generateName", "?")
            if ops:
                log.info("injected keyless into pod %s/%s (%d operations)", req.get("namespace"), name, len(ops))
    except Refused as e:
        response = {"uid": uid, "allowed": False,
                    "status": {"code": 403, "reason": "Forbidden", "message": f"keyless injector: {e}"}}
    except (AttributeError, TypeError, ValueError, KeyError) as e:
        # Malformed input: refuse (the API server then applies the webhook's failurePolicy).
        response = {"uid": uid, "allowed": False,
                    "status": {"code": 400,
                               "message": f"keyless injector: malformed AdmissionReview ({type(e).__name__})"}}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


MAX_BODY = 4 * 1024 * 1024  # the API server's request limit is 3 MiB


def make_app(defaults: Options) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        try:
            doc = json.loads(await request.read())
        except ValueError:
            doc = None
        return web.json_response(review(doc, defaults))

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(defaults: Options, cert: str, key: str, address: str, port: int) -> None:
    """HTTPS until cancelled; the certificate is re-read when its file changes (cert-manager
    renews it in place), so a renewal needs no restart."""
    import asyncio
    import os
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(make_app(defaults), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port, ssl_context=ctx).start()
    log.info("keyless injector listening on https://%s:%d/mutate (image %s, config map %s)", address, port,
             defaults.image, defaults.config_map)
    seen = os.stat(cert).st_mtime_ns
    try:
        while True:
            await asyncio.sleep(30)
            try:
                now = os.stat(cert).st_mtime_ns
                if now != seen:
                    ctx.load_cert_chain(cert, key)  # new handshakes use the renewed certificate
                    seen = now
                    log.info("keyless injector: reloaded %s", cert)
            except (OSError, ssl.SSLError) as e:
                log.error("keyless injector: cannot reload the certificate: %s", type(e).__name__)
    finally:
        await runner.cleanup()
