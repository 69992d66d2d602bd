"""The client table of docs/clients.md, row by row: real clients, configured only by what
``keyless env`` prints (plus what the table says a client needs on top), through a real Keyless
to a real upstream.

A call went through Keyless when the upstream received the credential Keyless injects (the
clients hold none); a client that bypasses Keyless reaches the plain-HTTP upstream without it.
Rows whose runtime is missing here are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.harness import REPO, Keyless, Received, Upstream, base_config
from tests.test_check import keyless

SECRET = "client-table-secret-0f3c"
NODE_PEERS = REPO / "tests" / "node-clients"
POLICY = """package keyless.egress

import rego.v1

default decision := {"allow": false, "reason": "not a client-table call"}

decision := {"allow": true, "reason": "client table", "credential": "api"} if {
\tstartswith(input.request.path, "/clients/")
}
"""


@dataclass
class Setup:
    keyless: Keyless
    upstream: Upstream
    env: dict[str, str]  # the test environment plus exactly what `keyless env` exported
    tmp: Path

    def received(self, name: str) -> list[Received]:
        return [r for r in self.upstream.received
                if r.path == f"/clients/{name}" or r.path.startswith(f"/clients/{name}/")]

    def through_keyless(self, name: str) -> bool:
        got = self.received(name)
        assert got, f"{name}: the upstream received nothing"
        return all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in got)


def exports(output: str) -> dict[str, str]:
    import shlex

    pairs = {}
    for line in output.splitlines():
        if line.startswith("export "):
            name, value = line.removeprefix("export ").split("=", 1)
            pairs[name] = shlex.split(value)[0] if value else ""
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("clients")
    upstream = Upstream(tmp / "upstream").start()
    (tmp / "policies").mkdir()
    (tmp / "policies" / "egress.rego").write_text(POLICY)
    (tmp / "api-key").write_text(SECRET + "\n")
    cfg = base_config(tmp, upstream, policy={"dir": str(tmp / "policies")},
                      credentials={"api": {"type": "static", "from": "file", "file": str(tmp / "api-key"),
                                           "header": "Authorization", "template": "Bearer {secret}"}})
    k = Keyless(tmp, cfg).start(log_level="info")
    # The clients' environment: this one minus any proxy or CA settings the host has, plus
    # exactly what `keyless env` prints.
    scrub = {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
             "all_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
             "AWS_CA_BUNDLE", "GIT_SSL_CAINFO", "SSL_CERT_DIR"}
    base = {n: v for n, v in os.environ.items() if n not in scrub and not n.startswith("npm_config_")}
    # A host NO_PROXY (say, localhost) would send these loopback calls direct: the table is
    # about the clients, so this environment has none (keeping one is tested separately).
    out = keyless("env", "-c", str(k.config_file), cwd=tmp, env={"NO_PROXY": "", "no_proxy": ""})
    assert out.returncode == 0, out.stderr
    env = {**base, **exports(out.stdout), "NO_PROXY": "", "no_proxy": "", "HOME": str(tmp),
           "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        yield Setup(k, upstream, env, tmp)
    finally:
        log = k.stop()
        upstream.stop()
        assert SECRET not in log


def run(s: Setup, *cmd: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), env=env or s.env, cwd=s.tmp, capture_output=True, text=True, timeout=timeout)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed here")
    return path


def node_major() -> int:
    need("node")
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.strip().lstrip("v").split(".")[0])


def node_honours_env_proxy() -> bool:
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = (int(x) for x in out.strip().lstrip("v").split(".")[:2])
    return (major == 22 and minor >= 21) or (major == 24 and minor >= 5) or major >= 25


# --- rows: the command line tools ------------------------------------------------------------

def test_curl(setup: Setup) -> None:
    need("curl")
    out = run(setup, "curl", "-sS", "--fail", setup.upstream.url("/clients/curl"))
    assert out.returncode == 0, out.stderr
    assert setup.through_keyless("curl")


def test_wget_needs_ca_certificate(setup: Setup) -> None:
    need("wget")
    url = setup.upstream.url("/clients/wget")
    # GnuTLS wget ignores SSL_CERT_FILE: without --ca-certificate it refuses Keyless's certificate
    # (it fails closed, it does not bypass).
    plain = run(setup, "wget", "-q", "-O", "-", "--tries=1", url)
    assert plain.returncode != 0 and not setup.received("wget")
    good = run(setup, "wget", "-q", "-O", "-", "--tries=1", f"--ca-certificate={setup.env['SSL_CERT_FILE']}", url)
    assert good.returncode == 0, good.stderr
    assert setup.through_keyless("wget")


def test_git(setup: Setup) -> None:
    need("git")
    # The upstream is not a git server: what matters is that git's request arrived via Keyless.
    run(setup, "git", "ls-remote", setup.upstream.url("/clients/git/repo.git"))
    assert setup.through_keyless("git")


def test_aws_cli(setup: Setup) -> None:
    aws = Path(sys.executable).parent / "aws"
    if not aws.exists():
        pytest.skip("the AWS CLI (awscli, a dev dependency) is not installed in this venv")
    run(setup, str(aws), "s3api", "list-buckets", "--endpoint-url", setup.upstream.url("/clients/aws-cli"),
        "--cli-read-timeout", "10", "--cli-connect-timeout", "10")
    assert setup.through_keyless("aws-cli")


# --- rows: Python ----------------------------------------------------------------------------

PY = {
    "requests": "import requests, sys; requests.get(sys.argv[1], timeout=20).raise_for_status()",
    "httpx": "import httpx, sys; httpx.get(sys.argv[1], timeout=20).raise_for_status()",
    "urllib": "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=20).read()",
    "aiohttp": ("import aiohttp, asyncio, sys\n"
                "async def main():\n"
                "    async with aiohttp.ClientSession(trust_env=True) as s, s.get(sys.argv[1]) as r:\n"
                "        r.raise_for_status()\n"
                "asyncio.run(main())"),
    "boto3": ("import boto3, sys, botocore.exceptions\n"
              "c = boto3.client('s3', endpoint_url=sys.argv[1])\n"
              "try:\n    c.list_buckets()\nexcept botocore.exceptions.ClientError:\n    pass\n"),
}


def test_aiohttp_without_trust_env_goes_direct(setup: Setup) -> None:
    # aiohttp's default is trust_env=False: the proxy variables are ignored (a bypass).
    code = ("import aiohttp, asyncio, sys\n"
            "async def main():\n"
            "    async with aiohttp.ClientSession() as s, s.get(sys.argv[1]) as r:\n"
            "        r.raise_for_status()\n"
            "asyncio.run(main())")
    out = run(setup, sys.executable, "-c", code, setup.upstream.url("/clients/aiohttp-default", tls=False))
    assert out.returncode == 0, out.stderr[-2000:]
    assert not setup.through_keyless("aiohttp-default")


@pytest.mark.parametrize("name", list(PY))
def test_python(setup: Setup, name: str) -> None:
    if name == "httpx":
        pytest.importorskip("httpx", reason="httpx is not installed in this venv")
    out = run(setup, sys.executable, "-c", PY[name], setup.upstream.url(f"/clients/{name}"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert setup.through_keyless(name)


# --- rows: Node ------------------------------------------------------------------------------

_FAIL = "e => { console.error(e); process.exit(1) }"
NODE_BUILTIN = {
    "node-fetch": "fetch(process.argv[1]).then(r => r.text()).then(() => process.exit(0), " + _FAIL + ")",
    "node-http": ("require(process.argv[1].startsWith('https') ? 'https' : 'http').get(process.argv[1], r => "
                  "{ r.resume(); r.on('end', () => process.exit(0)) }).on('error', " + _FAIL + ")"),
}


@pytest.mark.parametrize("name", list(NODE_BUILTIN))
def test_node_builtin_clients(setup: Setup, name: str) -> None:
    node_major()
    # Plain HTTP, so a direct call is visible: it reaches the upstream with no credential.
    url = setup.upstream.url(f"/clients/{name}", tls=False)
    out = run(setup, "node", "-e", NODE_BUILTIN[name], url)
    assert out.returncode == 0, out.stderr[-2000:]
    if node_honours_env_proxy():
        assert setup.through_keyless(name)  # NODE_USE_ENV_PROXY=1, exported by keyless env
    else:
        # Node < 22.21 / < 24.5 ignores HTTP(S)_PROXY and NODE_USE_ENV_PROXY: a bypass, documented.
        assert not setup.through_keyless(name)


def _node_peers() -> None:
    need("node")
    if not (NODE_PEERS / "node_modules" / "undici").is_dir():
        pytest.skip("tests/node-clients/node_modules is missing: run `npm ci --prefix tests/node-clients` "
                    "(make test does)")


NODE_PACKAGES = {
    "undici": ("const { EnvHttpProxyAgent, setGlobalDispatcher } = require('undici');"
               "setGlobalDispatcher(new EnvHttpProxyAgent());"
               "fetch(process.argv[1]).then(r => r.text()).then(() => process.exit(0),"
               " e => { console.error(e); process.exit(1) })"),
    "axios": ("require('axios').get(process.argv[1]).then(() => process.exit(0),"
              " e => { console.error(e.message); process.exit(1) })"),
}


@pytest.mark.parametrize("name", list(NODE_PACKAGES))
def test_node_packages(setup: Setup, name: str) -> None:
    _node_peers()
    env = {**setup.env, "NODE_PATH": str(NODE_PEERS / "node_modules")}
    out = run(setup, "node", "-e", NODE_PACKAGES[name], setup.upstream.url(f"/clients/{name}"), env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert setup.through_keyless(name)


def test_npm_with_a_cafile_in_npmrc(setup: Setup) -> None:
    """The UNABLE_TO_VERIFY_LEAF_SIGNATURE failure: an npmrc ``cafile`` (common in images and
    corporate setups) becomes Node's whole CA list, so NODE_EXTRA_CA_CERTS alone cannot add
    Keyless's CA; ``keyless env`` exports npm_config_cafile with the combined bundle."""
    need("npm")
    npmrc = setup.tmp / "npmrc"
    (setup.tmp / "npmrc-global").write_text("")
    npmrc.write_text(f"cafile={os.environ.get('SSL_CERT_FILE') or '/etc/ssl/certs/ca-certificates.crt'}\n")
    cmd = ["npm", "view", "left-pad", "--registry", setup.upstream.url("/clients/npm/"), "--fetch-retries=0",
           "--fetch-timeout=15000", "--userconfig", str(npmrc), "--globalconfig", str(setup.tmp / "npmrc-global")]
    before = {**setup.env, "NODE_EXTRA_CA_CERTS": str(setup.keyless.ca_cert)}
    before.pop("npm_config_cafile")
    old = run(setup, *cmd, env=before, timeout=90)
    assert "UNABLE_TO_VERIFY_LEAF_SIGNATURE" in old.stdout + old.stderr, old.stderr[-2000:]
    run(setup, *cmd, timeout=90)  # the upstream's reply is not npm metadata; the request is what counts
    assert setup.through_keyless("npm")


# --- rows: Java --------------------------------------------------------------------------------

JAVA = """import java.net.URI; import java.net.http.*;
public class Get { public static void main(String[] a) throws Exception {
  HttpResponse<String> r = HttpClient.newHttpClient().send(HttpRequest.newBuilder(URI.create(a[0])).build(),
      HttpResponse.BodyHandlers.ofString());
  System.exit(r.statusCode() == 200 ? 0 : 1); } }
"""


def test_java_httpclient(setup: Setup) -> None:
    need("java")
    keytool = need("keytool")
    src = setup.tmp / "Get.java"
    src.write_text(JAVA)
    store = setup.tmp / "keyless-truststore.p12"
    if not store.exists():
        made = run(setup, keytool, "-importcert", "-noprompt", "-alias", "keyless", "-file",
                   str(setup.keyless.ca_cert), "-keystore", str(store), "-storetype", "PKCS12",
                   "-storepass", "changeit")
        assert made.returncode == 0, made.stderr
    port = setup.keyless.config["listen"]["port"]
    # Java reads no proxy variable: with none of these properties it goes direct.
    direct = run(setup, "java", str(src), setup.upstream.url("/clients/java-direct", tls=False), timeout=120)
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert not setup.through_keyless("java-direct")
    # java.net.useSystemProxies does not read HTTP(S)_PROXY on Linux either.
    system = run(setup, "java", "-Djava.net.useSystemProxies=true", str(src),
                 setup.upstream.url("/clients/java-system", tls=False), timeout=120)
    assert system.returncode == 0, system.stderr[-2000:]
    assert not setup.through_keyless("java-system")
    props = ["-Dhttps.proxyHost=127.0.0.1", f"-Dhttps.proxyPort={port}", "-Dhttp.proxyHost=127.0.0.1",
             f"-Dhttp.proxyPort={port}", "-Dhttp.nonProxyHosts=", f"-Djavax.net.ssl.trustStore={store}",
             "-Djavax.net.ssl.trustStorePassword=changeit"]
    out = run(setup, "java", *props, str(src), setup.upstream.url("/clients/java"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert setup.through_keyless("java"), (setup.received("java"), setup.keyless.audit()[-1])


# --- keyless env itself --------------------------------------------------------------------------

def test_env_bundle_holds_system_roots_and_keyless_ca(setup: Setup) -> None:
    bundle = Path(setup.env["SSL_CERT_FILE"]).read_text()
    assert setup.keyless.ca_cert.read_text().strip() in bundle
    assert bundle.count("BEGIN CERTIFICATE") > 10  # the system's roots too: NO_PROXY hosts still verify
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE",
                 "GIT_SSL_CAINFO", "npm_config_cafile"):
        assert setup.env[name] == setup.env["SSL_CERT_FILE"], name
    assert setup.env["NODE_USE_ENV_PROXY"] == "1"
    assert "NO_PROXY" not in exports(keyless("env", "-c", str(setup.keyless.config_file), cwd=setup.tmp,
                                             env={"NO_PROXY": "", "no_proxy": ""}).stdout)


def test_env_keeps_and_extends_no_proxy(setup: Setup) -> None:
    out = keyless("env", "-c", str(setup.keyless.config_file), "--no-proxy", "internal.example", cwd=setup.tmp,
                  env={"NO_PROXY": "corp.example,.svc", "no_proxy": ".svc,10.0.0.0/8"})
    got = exports(out.stdout)
    assert got["NO_PROXY"] == got["no_proxy"] == "corp.example,.svc,10.0.0.0/8,internal.example"


def test_env_shells_and_unset(setup: Setup) -> None:
    cfg = str(setup.keyless.config_file)
    fish = keyless("env", "-c", cfg, "--shell", "fish", cwd=setup.tmp).stdout
    assert f"set -gx HTTPS_PROXY '{setup.keyless.proxy_url}';" in fish
    ps = keyless("env", "-c", cfg, "--shell", "powershell", cwd=setup.tmp).stdout
    assert f"$Env:HTTPS_PROXY = '{setup.keyless.proxy_url}'" in ps
    sh = keyless("env", "-c", cfg, cwd=setup.tmp).stdout
    # The sh form really works in a shell, and --unset undoes it (NO_PROXY, the user's, stays).
    script = (f'{sh}\neval "$({sys.executable} -m proxy.cli env --unset)"\n'
              'echo "[$HTTPS_PROXY][$SSL_CERT_FILE][$NO_PROXY]"')
    after = subprocess.run(["sh", "-c", script], capture_output=True, text=True, cwd=setup.tmp,
                           env={"PATH": os.environ["PATH"], "NO_PROXY": "mine.example",
                                "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))})
    assert after.stdout.strip() == "[][][mine.example]", after.stderr


def test_env_check_proves_the_call_went_through_keyless(setup: Setup) -> None:
    before = len(setup.keyless.audit())
    out = keyless("env", "--check", cwd=setup.tmp, env=setup.env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok: ") == 2 and "CA trusted" in out.stdout
    # Answered by Keyless itself (no upstream saw it) and audited.
    assert not [r for r in setup.upstream.received if "keyless.check" in r.host]
    from tests.harness import wait_for_audit

    records = wait_for_audit(setup.keyless, before + 2)[before:]
    assert [r["request"]["host"] for r in records] == ["keyless.check", "keyless.check"]
    assert all(r["request"].get("self_check") and r["outcome"]["status"] == 200 for r in records)


@pytest.mark.parametrize("broken", ["no proxy", "bypass", "wrong CA", "proxy down"])
def test_env_check_fails_loudly(setup: Setup, broken: str) -> None:
    env = dict(setup.env)
    if broken == "no proxy":
        for n in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(n)
    elif broken == "bypass":
        env["NO_PROXY"] = env["no_proxy"] = "*"
    elif broken == "wrong CA":
        env["SSL_CERT_FILE"] = str(setup.upstream.ca_file)
    else:
        from proxy.demo import free_port

        env["HTTP_PROXY"] = env["HTTPS_PROXY"] = f"http://127.0.0.1:{free_port()}"
    out = keyless("env", "--check", cwd=setup.tmp, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED" in out.stderr


def test_env_reports_the_bound_port_of_port_zero(tmp_path: Path) -> None:
    cfg = base_config(tmp_path)
    cfg["listen"]["port"] = 0
    cfg["tls"]["publish_bundle"] = str(tmp_path / "shared" / "bundle.pem")
    k = Keyless(tmp_path, cfg)
    missing = keyless("env", "-c", str(k.config_file), cwd=tmp_path)
    assert missing.returncode == 2 and "listen.port is 0" in missing.stderr
    k.start(log_level="info")
    try:
        got = exports(keyless("env", "-c", str(k.config_file), cwd=tmp_path).stdout)
        port = int(got["HTTPS_PROXY"].rsplit(":", 1)[1])
        assert port != 0
        log = k.log_file.read_text()
        assert f"keyless listening on 127.0.0.1:{port}" in log
        env = {**os.environ, **got}
        assert keyless("env", "--check", cwd=tmp_path, env=env).returncode == 0
        # tls.publish_bundle: what keyless env writes, published at start for a sidecar's app.
        published = (tmp_path / "shared" / "bundle.pem").read_text()
        assert k.ca_cert.read_text().strip() in published and published.count("BEGIN CERTIFICATE") > 10
    finally:
        k.stop()
    assert not (tmp_path / "ca" / "listen.json").exists()


def test_proxy_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import socket

    cfg = base_config(tmp_path)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", cfg["listen"]["port"]))
        s.listen()
        path = tmp_path / "keyless.yaml"
        path.write_text(yaml.safe_dump(cfg))
        check = keyless("check", "-c", str(path), cwd=tmp_path)
        assert check.returncode == 2
        port = cfg["listen"]["port"]
        assert f"listen.port: cannot listen on 127.0.0.1:{port} (Address already in use)" in check.stderr
        run_ = keyless("run", "-c", str(path), cwd=tmp_path, timeout=60)
    assert run_.returncode == 2, run_.stderr
    lines = [line for line in run_.stderr.splitlines() if line.strip()]
    assert lines[0].endswith(f"listen.port: cannot listen on 127.0.0.1:{cfg['listen']['port']} (Address already in "
                             "use) (is Keyless already running?)"), lines
    assert "listening" not in run_.stderr and "--mode" not in run_.stderr and "Traceback" not in run_.stderr
    assert json.dumps(lines)  # exactly the problem line and the count
    assert len(lines) == 2 and lines[1] == "1 problem found"
