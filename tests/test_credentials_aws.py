"""aws_sigv4 and static-from-Secrets-Manager end to end against moto in server mode.

moto runs as a subprocess over HTTPS (a test CA) with request authentication enforced, so an
unsigned or badly signed request is refused. The real AWS CLI (``--no-sign-request``) and boto3
(``UNSIGNED``) hold no AWS credentials at all; their calls succeed only because Keyless got STS
credentials for the caller's identity and signed them with botocore.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore import UNSIGNED
from botocore.config import Config

from proxy.demo import free_port, make_tls_files
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit
from tests.peers import keyless_signing_key, write_policy

ROLE = "arn:aws:iam::123456789012:role/keyless-app"
BUCKET = "aws-s3"           # the test policy picks the credential named like the first path segment
SECRET_V1 = "canary-sm-secret-v1-7d6c5b4a"
SECRET_V2 = "canary-sm-secret-v2-3e2f1a0b"
RUNTIME_KEY = "AKIAKEYLESSRUNTIME01"


@dataclass
class Moto:
    url: str
    port: int
    ca: Path
    jwks: Path
    key_file: Path
    runtime_creds: dict[str, str]
    log: Path


def _admin(url: str, ca: Path, service: str, **extra: Any) -> Any:
    """A boto3 client for test setup only, before authentication is switched on."""
    return boto3.client(service, endpoint_url=url, region_name="us-east-1", verify=str(ca),
                        aws_access_key_id="AKIASETUP00000000000", aws_secret_access_key="setup", **extra)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    tmp = tmp_path_factory.mktemp("moto")
    ca, cert, key = make_tls_files(tmp)
    key_file, jwks = keyless_signing_key(tmp)
    (tmp / "jwks.json").write_text(json.dumps(jwks))
    port = free_port()
    log = tmp / "moto.log"
    env = {**os.environ, "KEYLESS_TEST_JWKS": str(tmp / "jwks.json")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "aws" / "moto_keyless.py"), "-H", "127.0.0.1",
                                 "-p", str(port), "-c", str(cert), "-k", str(key)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"https://localhost:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(url + "/moto-api/", verify=str(ca), timeout=1)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto did not start: " + log.read_text()[-2000:]) from None
            time.sleep(0.1)
    iam = _admin(url, ca, "iam")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
                                                     "Principal": {"Federated": "keyless"}}]}
    iam.create_role(RoleName="keyless-app", AssumeRolePolicyDocument=json.dumps(trust))
    iam.put_role_policy(RoleName="keyless-app", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    # Keyless's own identity, for reading residual secrets from Secrets Manager.
    iam.create_user(UserName="keyless-runtime")
    iam.put_user_policy(UserName="keyless-runtime", PolicyName="sm", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue",
                                                                          "secretsmanager:PutSecretValue"],
                                                 "Resource": "*"}]}))
    ak = iam.create_access_key(UserName="keyless-runtime")["AccessKey"]
    _admin(url, ca, "s3", config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=BUCKET)
    _admin(url, ca, "secretsmanager").create_secret(Name="billing/api-key",
                                                    SecretString=json.dumps({"key": SECRET_V1}))
    # From here on every request must be signed by a known identity that IAM allows.
    requests.post(url + "/moto-api/reset-auth", data=b"0", verify=str(ca), timeout=5).raise_for_status()
    yield Moto(url, port, ca, tmp / "jwks.json", key_file,
               {"AWS_ACCESS_KEY_ID": ak["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": ak["SecretAccessKey"]}, log)
    proc.terminate()
    proc.wait(10)


def aws_env(k: Keyless, tmp: Path) -> dict[str, str]:
    """The AWS CLI's environment: no credentials at all, Keyless as proxy, path-style S3."""
    cfg = tmp / "aws-config"
    cfg.write_text("[default]\nregion = us-east-1\ns3 =\n    addressing_style = path\n")
    env = {k2: v for k2, v in k.client_env().items() if not k2.startswith("AWS_")}
    env.update({"AWS_CONFIG_FILE": str(cfg), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none"),
                "AWS_CA_BUNDLE": str(k.ca_cert), "AWS_EC2_METADATA_DISABLED": "true",
                # Plain bodies; aws-chunked uploads are covered by unsigned_payload (see the docs).
                "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"})
    return env


def aws_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "aws"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def aws_keyless(tmp: Path, moto: Moto, **extra_creds: Any) -> Keyless:
    cfg = base_config(tmp, policy={"dir": str(write_policy(tmp))}, signing={"key_file": str(moto.key_file)},
                      credentials={
                          "aws-s3": {"type": "aws_sigv4", "role_arn": ROLE, "region": "us-east-1",
                                     "sts_endpoint": moto.url + "/", "ca_file": str(moto.ca),
                                     "endpoints": [{"host": "localhost", "port": moto.port, "service": "s3"}]},
                          **extra_creds})
    cfg["tls"]["upstream_ca"] = str(moto.ca)
    return Keyless(tmp, cfg, env=moto.runtime_creds)


def test_unsigned_requests_are_refused_by_moto(tmp_path: Path, moto: Moto) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_CA_BUNDLE": str(moto.ca), "AWS_DEFAULT_REGION": "us-east-1"})
    out = aws_cli(env, "--no-sign-request", "--endpoint-url", moto.url, "s3api", "list-objects-v2",
                  "--bucket", BUCKET)
    assert out.returncode != 0, "moto accepted an unsigned request: auth is not enforced"


def test_aws_cli_and_boto3_without_credentials_succeed_through_keyless(tmp_path: Path, moto: Moto) -> None:
    k = aws_keyless(tmp_path, moto).start()
    env = aws_env(k, tmp_path)
    body = tmp_path / "report.txt"
    body.write_text("quarterly numbers\n")
    try:
        put = aws_cli(env, "--no-sign-request", "--endpoint-url", moto.url, "s3api", "put-object",
                      "--bucket", BUCKET, "--key", "reports/q3.txt", "--body", str(body))
        listed = aws_cli(env, "--no-sign-request", "--endpoint-url", moto.url, "s3", "ls", f"s3://{BUCKET}/reports/")
        copied = aws_cli(env, "--no-sign-request", "--endpoint-url", moto.url, "s3", "cp",
                         f"s3://{BUCKET}/reports/q3.txt", str(tmp_path / "back.txt"))
        s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", verify=str(k.ca_cert),
                          config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"},
                                        proxies={"https": k.proxy_url}))
        # boto3 uploads as aws-chunked with a checksum trailer by default; Keyless de-chunks and signs.
        s3.put_object(Bucket=BUCKET, Key="reports/q4.txt", Body=b"more numbers")
        got = s3.get_object(Bucket=BUCKET, Key="reports/q4.txt")["Body"].read()
        forged = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
             "Authorization: AWS4-HMAC-SHA256 Credential=AKIAFORGED/20260101/us-east-1/s3/aws4_request, "
             "SignedHeaders=host, Signature=00", "-H", "X-Amz-Security-Token: forged",
             f"{moto.url}/{BUCKET}/reports/q3.txt?X-Amz-Signature=forged&X-Amz-Credential=forged"],
            env=k.client_env(), capture_output=True, text=True, timeout=60)
    finally:
        log = k.stop()
    assert put.returncode == 0, put.stderr
    assert "q3.txt" in listed.stdout, listed.stderr
    assert copied.returncode == 0 and (tmp_path / "back.txt").read_text() == "quarterly numbers\n", copied.stderr
    assert got == b"more numbers"
    assert forged.stdout == "200", "Keyless should replace the app's forged signature with its own"
    records = wait_for_audit(k, 6)
    assert all(r["credential"]["type"] == "aws_sigv4" for r in records)
    assert all(r["outcome"]["status"] == 200 for r in records)
    assert "web identity accepted for sub=spiffe://demo.local/billing" in moto.log.read_text()
    # One STS exchange for the identity and role; every request after that was signed from cache.
    assert moto.log.read_text().count("web identity accepted") == 1
    audit = k.audit_file.read_text()
    # Nothing that would let a reader of the DEBUG log or the audit act as the workload.
    assert "SecretAccessKey" not in log and "x-amz-security-token" not in log.lower()
    assert "Signature=" not in log + audit
    for r in records:
        assert r["credential"]["fingerprint"].startswith("hmac-sha256:")
    assert moto.runtime_creds["AWS_SECRET_ACCESS_KEY"] not in log + audit


def test_signs_only_configured_endpoints_over_tls(tmp_path: Path, moto: Moto, upstream: Upstream) -> None:
    k = aws_keyless(tmp_path, moto, **{"aws-plain": {
        "type": "aws_sigv4", "role_arn": ROLE, "sts_endpoint": moto.url + "/", "ca_file": str(moto.ca),
        "endpoints": [{"host": "localhost", "port": upstream.http_port, "service": "s3"}]}, "aws-nosts": {
        "type": "aws_sigv4", "role_arn": ROLE, "sts_endpoint": f"https://localhost:{free_port()}/",
        "timeout": 1, "retries": 1, "endpoints": [{"host": "localhost", "port": upstream.https_port, "service": "s3"}]},
    })
    k.config["tls"]["upstream_ca"] = str(upstream.ca_file)
    k.config_file.write_text(json.dumps(k.config))
    k.start()
    try:
        # A host that is not a configured AWS endpoint: no signature, no STS call.
        other = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", upstream.url("/aws-s3/x")],
                               env=k.client_env(), capture_output=True, text=True, timeout=60)
        # A configured endpoint reached over plain HTTP: refused, TLS is required.
        plain = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", upstream.url("/aws-plain/x", tls=False)],
                               env=k.client_env(), capture_output=True, text=True, timeout=60)
        # STS unreachable: no credentials, so no request.
        nosts = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", upstream.url("/aws-nosts/x")],
                               env=k.client_env(), capture_output=True, text=True, timeout=60)
    finally:
        k.stop()
    assert other.stdout.endswith("503") and "not an AWS endpoint this credential signs for" in other.stdout
    assert plain.stdout.endswith("503") and "only over verified TLS" in plain.stdout
    assert nosts.stdout.endswith("503") and "STS: cannot connect" in nosts.stdout, nosts.stdout
    assert upstream.received == []


def test_static_secret_from_secrets_manager_with_refresh(tmp_path: Path, moto: Moto, upstream: Upstream) -> None:
    upstream_ca = upstream.ca_file
    k = aws_keyless(tmp_path, moto, **{"billing": {
        "type": "static", "from": "aws_secrets_manager", "secret_id": "billing/api-key", "json_key": "key",
        "endpoint_url": moto.url, "ca_file": str(moto.ca), "refresh_interval": 1, "template": "Token {secret}"}})
    k.config["tls"]["upstream_ca"] = str(upstream_ca)
    k.config_file.write_text(json.dumps(k.config))
    k.start()
    try:
        first = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", upstream.url("/billing/a")],
                               env=k.client_env(), capture_output=True, text=True, timeout=60)
        sm = boto3.client("secretsmanager", endpoint_url=moto.url, region_name="us-east-1", verify=str(moto.ca),
                          aws_access_key_id=moto.runtime_creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=moto.runtime_creds["AWS_SECRET_ACCESS_KEY"])
        # Rotation, as the secret's owner would do it (this test identity may also write).
        sm.put_secret_value(SecretId="billing/api-key", SecretString=json.dumps({"key": SECRET_V2}))
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            subprocess.run(["curl", "-sS", "-o", "/dev/null", upstream.url("/billing/b")], env=k.client_env(),
                           capture_output=True, timeout=60)
            seen.append(upstream.received[-1].headers["authorization"])
            if seen[-1] == f"Token {SECRET_V2}":
                break
            time.sleep(0.3)
    finally:
        log = k.stop()
    assert first.stdout == "200"
    assert upstream.received[0].headers["authorization"] == f"Token {SECRET_V1}"
    assert seen[-1] == f"Token {SECRET_V2}", "the rotated secret was not picked up"
    audit = k.audit_file.read_text()
    for canary in (SECRET_V1, SECRET_V2):
        assert canary not in log and canary not in audit
