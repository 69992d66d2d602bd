"""The whole request path end to end: a real Keyless process, a real aiohttp upstream over HTTP
and HTTPS, and real clients (curl, requests, aiohttp) that take the proxy from the environment.

One Keyless process serves the whole module (starting it is the slow part); it runs the policy
in tests/policies/e2e, two source-address workloads (billing = 127.0.0.1, reports = 127.0.0.2,
127.0.0.3 matches nothing) and canary secrets that must never appear anywhere but upstream.
Every assertion about forwarding is made on what the upstream actually received.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import requests

from proxy.demo import free_port
from tests.clients import Reply, aio, curl, proxy_environ, req
from tests.harness import REPO, Keyless, Upstream, base_config, wait_for_audit

BILLING = "spiffe://demo.local/billing"
REPORTS = "spiffe://demo.local/reports"
ENV_VAR = "KEYLESS_TEST_ENV_SECRET"
APP_SECRET = "app-own-secret-must-not-leave"


@dataclass
class Env:
    k: Keyless
    upstream: Upstream
    file_secret: str
    env_secret: str
    doomed_secret: str
    doomed_file: Path
    rotating_file: Path

    def canaries(self) -> list[str]:
        return [self.file_secret, self.env_secret, self.doomed_secret]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("e2e-core")
    upstream = Upstream(tmp / "upstream").start()
    file_secret = "canary-file-" + secrets.token_hex(8)
    env_secret = "canary-env-" + secrets.token_hex(8)
    doomed_secret = "canary-doomed-" + secrets.token_hex(8)
    (tmp / "file-key").write_text(file_secret + "\n")
    doomed = tmp / "doomed-key"
    doomed.write_text(doomed_secret + "\n")
    (tmp / "rotating-key").write_text("rotation-one\n")
    cfg = base_config(
        tmp, upstream,
        trust=[{"name": "loopback", "type": "source_ip", "workloads": [
            {"cidr": "127.0.0.1/32", "id": BILLING},
            {"cidr": "127.0.0.2/32", "id": REPORTS},
        ]}],
        policy={"dir": str(REPO / "tests" / "policies" / "e2e")},
        credentials={
            "file-key": {"type": "static", "from": "file", "file": str(tmp / "file-key")},
            "env-key": {"type": "static", "from": "env", "env": ENV_VAR, "header": "X-Api-Key",
                        "template": "{secret}"},
            "doomed-key": {"type": "static", "from": "file", "file": str(doomed)},
            "rotating-key": {"type": "static", "from": "file", "file": str(tmp / "rotating-key"),
                             "header": "X-Rotating", "template": "Key {secret}"},
            "minted": {"type": "jwt", "ttl": 120},
        },
    )
    k = Keyless(tmp, cfg, env={ENV_VAR: env_secret}).start(log_level="debug")
    try:
        yield Env(k, upstream, file_secret, env_secret, doomed_secret, doomed, tmp / "rotating-key")
    finally:
        k.stop()
        upstream.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(env: Env) -> None:
    env.upstream.received.clear()


def record(k: Keyless, decision_id: str | None, timeout: float = 5.0) -> dict[str, Any]:
    """The audit record with this decision id (waits for it to be written)."""
    assert decision_id, "response carries no Keyless-Decision-Id"
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in k.audit() if r["decision_id"] == decision_id]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1, f"{len(found)} audit records for {decision_id}"
    return found[0]


def assert_refused(reply: Reply, status: int, code: str, env: Env) -> dict[str, Any]:
    """A JSON refusal with the stable code, its decision id in header, body and audit; and
    nothing at all reached the upstream."""
    assert reply.status == status, reply.body
    body = reply.json()
    assert set(body) == {"error", "message", "decision_id"}
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert reply.decision_id == body["decision_id"]
    rec = record(env.k, reply.decision_id)
    assert rec["outcome"]["error"] == code
    assert rec["outcome"]["status"] == status
    assert env.upstream.received == []
    return rec


def only_received(env: Env) -> Any:
    assert len(env.upstream.received) == 1, env.upstream.received
    return env.upstream.received[0]


def verify_jwt(env: Env, token: str, audience: str) -> dict[str, Any]:
    """Verify a token the way a receiving API would: Keyless's JWKS from the admin listener."""
    jwks = requests.get(env.k.admin_url + "/jwks.json", timeout=5).json()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    keys = {key["kid"]: key for key in jwks["keys"]}
    assert header["kid"] in keys
    key = jwt.PyJWK.from_dict(keys[header["kid"]])
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["ES256"], audience=audience, issuer="keyless",
                                        options={"require": ["exp", "iat", "jti", "sub", "iss", "aud"]})
    assert 0 < claims["exp"] - claims["iat"] <= 120
    assert abs(claims["iat"] - time.time()) < 60
    return claims


# --- injection -------------------------------------------------------------------------------


def test_curl_https_file_secret_injected_and_app_credentials_stripped(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/v1/invoices?page=2&api_key=" + APP_SECRET),
             "-H", f"Authorization: Bearer {APP_SECRET}", "-H", f"X-Api-Key: {APP_SECRET}",
             "-H", f"Cookie: session={APP_SECRET}")
    assert r.status == 200, r.body
    got = only_received(env)
    assert got.scheme == "https" and got.path == "/v1/invoices"
    assert got.headers["authorization"] == f"Bearer {env.file_secret}"
    assert "x-api-key" not in got.headers and "cookie" not in got.headers
    assert got.query == {"page": ["2"]}
    assert APP_SECRET not in repr(got)
    rec = record(env.k, r.decision_id)
    assert rec["credential"]["name"] == "file-key" and rec["credential"]["type"] == "static"
    assert set(rec["stripped"]) == {"authorization", "x-api-key", "cookie", "?api_key"}


def test_query_keys_are_stripped_whatever_their_case(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/v1/invoices?API_KEY=" + APP_SECRET + "&Access_Token=" + APP_SECRET + "&page=3"))
    assert r.status == 200, r.body
    got = only_received(env)
    assert got.query == {"page": ["3"]}
    assert set(record(env.k, r.decision_id)["stripped"]) >= {"?API_KEY", "?Access_Token"}


def test_curl_plain_http_strips_proxy_authorization(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/v1/plain", tls=False), "--proxy-user", f"app:{APP_SECRET}",
             "-H", f"Authorization: Basic {APP_SECRET}")
    assert r.status == 200, r.body
    got = only_received(env)
    assert got.scheme == "http"
    assert "proxy-authorization" not in got.headers
    assert got.headers["authorization"] == f"Bearer {env.file_secret}"
    assert APP_SECRET not in repr(got)


def test_requests_env_secret_into_x_api_key_with_bare_template(env: Env) -> None:
    r = req(env.k, "GET", env.upstream.url("/env/things"), headers={"X-Api-Key": APP_SECRET})
    assert r.status == 200, r.body
    got = only_received(env)
    assert got.headers["x-api-key"] == env.env_secret
    assert "authorization" not in got.headers


def test_aiohttp_plain_http_and_https(env: Env) -> None:
    for tls in (False, True):
        env.upstream.received.clear()
        r = aio(env.k, "GET", env.upstream.url("/v1/aio", tls=tls), headers={"Authorization": APP_SECRET})
        assert r.status == 200, r.body
        got = only_received(env)
        assert got.scheme == ("https" if tls else "http")
        assert got.headers["authorization"] == f"Bearer {env.file_secret}"


def test_allow_without_credential_forwards_nothing_injected(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/open/x"), "-H", f"Authorization: Bearer {APP_SECRET}")
    assert r.status == 200
    assert "authorization" not in only_received(env).headers
    assert record(env.k, r.decision_id)["credential"] is None


@pytest.mark.parametrize("tls", [True, False])
def test_minted_jwt_is_valid_for_the_destination_origin(env: Env, tls: bool) -> None:
    url = env.upstream.url("/jwt/reports", tls=tls)
    r = req(env.k, "POST", url, json={"n": 1}, headers={"Authorization": f"Bearer {APP_SECRET}"})
    assert r.status == 200, r.body
    got = only_received(env)
    assert got.body == b'{"n": 1}'
    scheme, _, token = got.headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    origin = f"https://localhost:{env.upstream.https_port}" if tls else f"http://localhost:{env.upstream.http_port}"
    claims = verify_jwt(env, token, origin)
    assert claims["sub"] == BILLING
    rec = record(env.k, r.decision_id)
    assert rec["credential"]["type"] == "jwt" and rec["credential"]["expires_at"] == claims["exp"]
    assert token not in env.k.audit_file.read_text()


def test_minted_jwt_audience_from_decision_params(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/aud/x", tls=False))
    assert r.status == 200, r.body
    token = only_received(env).headers["authorization"].removeprefix("Bearer ")
    claims = verify_jwt(env, token, "https://billing.example")
    assert claims["sub"] == BILLING
    # The same token must not verify for another audience.
    with pytest.raises(jwt.InvalidAudienceError):
        verify_jwt(env, token, f"http://localhost:{env.upstream.http_port}")


def test_minted_jwt_sub_is_the_second_workload(env: Env) -> None:
    r = req(env.k, "GET", env.upstream.url("/reports/q3"), source="127.0.0.2")
    assert r.status == 200, r.body
    token = only_received(env).headers["authorization"].removeprefix("Bearer ")
    assert verify_jwt(env, token, f"https://localhost:{env.upstream.https_port}")["sub"] == REPORTS
    assert record(env.k, r.decision_id)["identity"]["id"] == REPORTS


def test_tampered_jwt_fails_verification(env: Env) -> None:
    """The verification in these tests can fail: a flipped signature byte is rejected."""
    r = curl(env.k, env.upstream.url("/jwt/x"))
    token = only_received(env).headers["authorization"].removeprefix("Bearer ")
    head, payload, sig = token.split(".")
    bad = f"{head}.{payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    assert r.status == 200
    with pytest.raises(jwt.InvalidSignatureError):
        verify_jwt(env, bad, f"https://localhost:{env.upstream.https_port}")


# --- policy: identity, method, host, path ----------------------------------------------------


def test_identity_decides_same_request(env: Env) -> None:
    url = env.upstream.url("/v1/invoices")
    allowed = curl(env.k, url, "--interface", "127.0.0.1")
    assert allowed.status == 200
    assert record(env.k, allowed.decision_id)["identity"]["id"] == BILLING
    env.upstream.received.clear()
    denied = curl(env.k, url, "--interface", "127.0.0.2")
    rec = assert_refused(denied, 403, "forbidden", env)
    assert rec["identity"]["id"] == REPORTS and rec["source"]["address"] == "127.0.0.2"
    assert REPORTS in denied.json()["message"]


def test_identity_with_requests_source_address(env: Env) -> None:
    denied = req(env.k, "GET", env.upstream.url("/v1/x"), source="127.0.0.2")
    assert_refused(denied, 403, "forbidden", env)
    allowed = req(env.k, "GET", env.upstream.url("/v1/x"), source="127.0.0.1")
    assert allowed.status == 200 and len(env.upstream.received) == 1


def test_unmatched_caller_has_null_identity_and_is_refused(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/v1/x"), "--interface", "127.0.0.3")
    rec = assert_refused(r, 403, "forbidden", env)
    assert rec["identity"] == {"id": None, "attestations": [], "revoked": False}
    assert rec["source"]["address"] == "127.0.0.3"
    assert "no attested workload identity" in r.json()["message"]


@pytest.mark.parametrize(("method", "host", "path"), [
    ("DELETE", "localhost", "/v1/invoices"),   # method
    ("GET", "127.0.0.1", "/v1/invoices"),      # host: same upstream, by address
    ("GET", "localhost", "/admin/users"),      # path
])
def test_deny_by_method_host_path_never_reaches_upstream(env: Env, method: str, host: str, path: str) -> None:
    r = curl(env.k, env.upstream.url(path, host=host), "-H", f"Authorization: Bearer {APP_SECRET}", method=method)
    rec = assert_refused(r, 403, "forbidden", env)
    assert rec["decision"]["allow"] is False
    assert rec["request"]["method"] == method and rec["request"]["host"] == host
    assert rec["request"]["path"] == path


def test_deny_over_plain_http_with_aiohttp(env: Env) -> None:
    r = aio(env.k, "DELETE", env.upstream.url("/v1/x", tls=False))
    assert_refused(r, 403, "forbidden", env)


def test_undefined_decision_is_a_deny(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/undefined/x"))
    assert_refused(r, 403, "forbidden", env)
    assert "undefined" in r.json()["message"]


@pytest.mark.parametrize("path", ["/v1/../admin/users", "/v1/%2e%2e/admin", "/v1/..%2Fadmin", "/v1/%2E%2E%2fadmin",
                                  "/v1/./x", "/v1/..;/admin", "/v1/..%5cadmin"])
def test_dot_segments_cannot_escape_a_granted_path_prefix(env: Env, path: str) -> None:
    """/v1/ is granted, /admin is not. Many servers resolve dot-segments (also percent-encoded
    ones) before routing, so "/v1/../admin" must not be decided as a /v1/ call and forwarded."""
    for tls in (True, False):
        env.upstream.received.clear()
        r = curl(env.k, env.upstream.url(path, tls=tls), "--path-as-is")
        assert_refused(r, 400, "bad_request", env)


def test_encoded_slash_without_dots_is_an_ordinary_path(env: Env) -> None:
    # e.g. GitLab's /projects/group%2Fproject: nothing to resolve, the policy decides as usual.
    r = curl(env.k, env.upstream.url("/v1/projects/group%2Fproject"), "--path-as-is")
    assert r.status == 200
    assert only_received(env).path == "/v1/projects/group/project"  # aiohttp shows it decoded


# --- fail closed ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/policy-error/string", "/policy-error/allow-yes", "/policy-error/eval"])
def test_policy_error_is_503(env: Env, path: str) -> None:
    # /policy-error/eval: to_number("not a number") fails; the default engine (regorus's
    # interpreter) reports the error, so the request is refused as policy_unavailable.
    r = curl(env.k, env.upstream.url(path))
    rec = assert_refused(r, 503, "policy_unavailable", env)
    assert rec["decision"] is None


def test_decision_naming_unconfigured_credential_is_503(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/ghost/x"))
    assert_refused(r, 503, "credential_unavailable", env)
    assert "ghost" in r.json()["message"]


def test_missing_secret_file_is_503_and_nothing_forwarded(env: Env) -> None:
    ok = curl(env.k, env.upstream.url("/doomed/x"))
    assert ok.status == 200
    assert only_received(env).headers["authorization"] == f"Bearer {env.doomed_secret}"
    env.upstream.received.clear()
    env.doomed_file.unlink()
    r = curl(env.k, env.upstream.url("/doomed/x"), "-H", f"Authorization: Bearer {APP_SECRET}")
    assert_refused(r, 503, "credential_unavailable", env)
    assert env.doomed_secret not in r.body.decode()


# --- Host / SNI / CONNECT must agree ----------------------------------------------------------


def test_plain_http_host_header_mismatch_is_421(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/v1/x", tls=False), "-H", "Host: evil.example")
    assert_refused(r, 421, "misdirected_request", env)
    assert "Host header" in r.json()["message"]


def test_host_header_differs_from_connect_authority_is_421(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/v1/x"), "-H", f"Host: evil.example:{env.upstream.https_port}")
    assert_refused(r, 421, "misdirected_request", env)
    assert "evil.example" in r.json()["message"]


@contextlib.contextmanager
def tls_tunnel(env: Env, port: int, sni: str) -> Iterator[ssl.SSLSocket]:
    """CONNECT to localhost:``port`` through Keyless, then a TLS handshake naming ``sni``."""
    with socket.create_connection(("127.0.0.1", env.k.config["listen"]["port"]), timeout=10) as raw:
        raw.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(env.k.ca_cert))
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            yield tls


def test_sni_differs_from_connect_authority_is_421(env: Env) -> None:
    """CONNECT to localhost, then a TLS handshake for another name, then a request for localhost."""
    port = env.upstream.https_port
    with tls_tunnel(env, port, "evil.example") as tls:
        tls.sendall(f"GET /v1/x HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {line.split(b":", 1)[0].strip().lower().decode(): line.split(b":", 1)[1].strip().decode()
               for line in head.split(b"\r\n")[1:]}
    reply = Reply(status, headers, body)
    assert_refused(reply, 421, "misdirected_request", env)
    assert "SNI" in reply.json()["message"]


def raw_tunnel(env: Env, connect_to: str, request: bytes) -> Reply:
    """CONNECT to ``connect_to``, then send ``request`` in clear text inside the tunnel."""
    with socket.create_connection(("127.0.0.1", env.k.config["listen"]["port"]), timeout=10) as raw:
        raw.sendall(f"CONNECT {connect_to} HTTP/1.1\r\nHost: {connect_to}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        raw.sendall(request)
        data = b""
        while chunk := raw.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}
    return Reply(int(lines[0].split(" ", 2)[1]), headers, body)


def test_plain_http_inside_a_tunnel_must_match_the_connect_authority(env: Env) -> None:
    port = env.upstream.http_port
    ok = raw_tunnel(env, f"localhost:{port}",
                    f"GET /v1/t HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode())
    assert ok.status == 200
    assert only_received(env).headers["authorization"] == f"Bearer {env.file_secret}"
    env.upstream.received.clear()
    # Same tunnel destination, but the request names another authority (absolute form + Host).
    other = f"evil.example:{port}"
    r = raw_tunnel(env, f"localhost:{port}",
                   f"GET http://{other}/v1/t HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n".encode())
    assert_refused(r, 421, "misdirected_request", env)
    r = raw_tunnel(env, f"localhost:{port}",
                   f"GET /v1/t HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n".encode())
    assert_refused(r, 421, "misdirected_request", env)


def test_absolute_form_authority_inside_a_tunnel_must_match(env: Env) -> None:
    """Host and CONNECT agree but the request line names another authority: servers route on
    the request line (RFC 9112 3.2.2), so the credential would reach that other host."""
    port = env.upstream.http_port
    r = raw_tunnel(env, f"localhost:{port}",
                   f"GET http://evil.example:{port}/v1/t HTTP/1.1\r\nHost: localhost:{port}\r\n"
                   "Connection: close\r\n\r\n".encode())
    assert_refused(r, 421, "misdirected_request", env)
    assert "request target" in r.json()["message"]


def test_absolute_form_inside_a_tls_tunnel_leaves_in_origin_form(env: Env) -> None:
    port = env.upstream.https_port
    with tls_tunnel(env, port, "localhost") as tls:
        for target, want in ((f"https://evil.example:{port}/v1/t", 421), (f"https://localhost:{port}/v1/t", 200)):
            env.upstream.received.clear()
            tls.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(1)
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = b""
            while len(body) < length:
                body += tls.recv(length - len(body))
            assert int(head.split(b" ", 2)[1]) == want, (target, head, body)
            if want == 421:
                assert env.upstream.received == []
            else:
                # Forwarded with its checked Host, and the credential, to the tunnel's host.
                assert only_received(env).host == f"localhost:{port}"


# --- audit: exactly one line per request, every field, no secrets ----------------------------


def test_exactly_one_audit_line_per_request(env: Env) -> None:
    k = env.k
    cases: list[tuple[Callable[[], Reply], int]] = [
        (lambda: curl(k, env.upstream.url("/v1/one")), 200),                    # allowed, static
        (lambda: curl(k, env.upstream.url("/jwt/one", tls=False)), 200),        # allowed, jwt
        (lambda: curl(k, env.upstream.url("/admin")), 403),                     # denied
        (lambda: curl(k, env.upstream.url("/policy-error/string")), 503),      # failed
        (lambda: curl(k, env.upstream.url("/v1/x", tls=False), "-H", "Host: a.example"), 421),
    ]
    for call, status in cases:
        before = len(k.audit())
        r = call()
        assert r.status == status
        wait_for_audit(k, before + 1)
        time.sleep(0.2)  # a second (duplicate) record would be written right after the first
        records = k.audit()
        assert len(records) == before + 1
        assert records[-1]["decision_id"] == r.decision_id


def test_audit_record_fields(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/v1/fields?page=1&api_key=" + APP_SECRET),
             "-H", f"Authorization: Bearer {APP_SECRET}", "-H", "User-Agent: audit-test")
    rec = record(env.k, r.decision_id)
    for key in ("decision_id", "time", "source", "identity", "request", "decision", "credential", "outcome",
                "latency_ms"):
        assert key in rec, key
    assert rec["time"].endswith("Z")
    assert rec["source"]["address"] == "127.0.0.1" and isinstance(rec["source"]["port"], int)
    assert rec["identity"]["id"] == BILLING
    assert rec["identity"]["attestations"][0]["provider"] == "loopback"
    # upstream_address: the address Keyless dialled for the name (the checked, pinned answer).
    assert rec["request"].pop("upstream_address") == {"address": "127.0.0.1", "port": env.upstream.https_port}
    assert rec["request"] == {"method": "GET", "scheme": "https", "host": "localhost",
                              "port": env.upstream.https_port, "path": "/v1/fields"}
    assert rec["decision"]["allow"] is True and rec["decision"]["credential"] == "file-key"
    assert rec["decision"]["revision"].startswith("sha256:")
    cred = rec["credential"]
    assert set(cred) == {"name", "type", "expires_at", "fingerprint"}
    assert cred["fingerprint"].startswith("hmac-sha256:") and len(cred["fingerprint"]) == len("hmac-sha256:") + 16
    # Keyed: a bare hash of the secret would let a reader of the audit log test guesses offline.
    assert hashlib.sha256(env.file_secret.encode()).hexdigest()[:16] not in cred["fingerprint"]
    assert rec["outcome"] == {"status": 200, "error": None, "message": None}
    assert isinstance(rec["latency_ms"], float) and rec["latency_ms"] >= 0
    assert "audit-test" not in str(rec) and APP_SECRET not in str(rec)


def test_canary_secrets_appear_nowhere_but_upstream(env: Env) -> None:
    """Drive every outcome, then search the debug log, the audit file and every reply body."""
    k, u = env.k, env.upstream
    replies = [
        curl(k, u.url("/v1/c")), curl(k, u.url("/env/c", tls=False)), curl(k, u.url("/jwt/c")),
        curl(k, u.url("/admin")), curl(k, u.url("/v1/c"), "--interface", "127.0.0.3"),
        curl(k, u.url("/policy-error/eval")), curl(k, u.url("/ghost/c")),
        curl(k, u.url("/v1/c", tls=False), "-H", "Host: other.example"),
        req(k, "GET", u.url("/env/c")), aio(k, "GET", u.url("/v1/c")),
    ]
    assert [r.status for r in replies] == [200, 200, 200, 403, 403, 503, 503, 421, 200, 200]
    upstream_text = repr(u.received)
    assert env.file_secret in upstream_text and env.env_secret in upstream_text  # the canaries are live
    wait_for_audit(k, 1)
    time.sleep(0.2)
    log = k.log_file.read_text()
    audit = k.audit_file.read_text()
    assert "DEBUG" in log  # the proxy really ran at debug level
    for canary in env.canaries():
        assert canary not in log
        assert canary not in audit
        for r in replies:
            if r.status != 200:
                assert canary.encode() not in r.body
    assert APP_SECRET not in audit and APP_SECRET not in log


# --- more fail-closed edges -------------------------------------------------------------------


def test_admin_listener_serves_health_jwks_and_ca(env: Env) -> None:
    base = env.k.admin_url
    assert requests.get(base + "/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(base + "/readyz", timeout=5).status_code == 200
    keys = requests.get(base + "/jwks.json", timeout=5).json()["keys"]
    assert len(keys) == 1 and keys[0]["kty"] == "EC" and keys[0]["alg"] == "ES256" and "kid" in keys[0]
    assert "d" not in keys[0]  # the private scalar never leaves
    assert requests.get(base + "/ca.pem", timeout=5).content == env.k.ca_cert.read_bytes()


def test_untrusted_upstream_certificate_is_refused(env: Env, tmp_path: Path) -> None:
    """An upstream whose CA Keyless does not trust gets no request (and no credential)."""
    stranger = Upstream(tmp_path / "stranger").start()
    try:
        before = len(env.k.audit())
        r = curl(env.k, stranger.url("/v1/x"))
        assert r.status == 502, r.body
        assert r.json()["error"] == "upstream_tls_failed"
        assert stranger.received == []
        records = wait_for_audit(env.k, before + 1)
        assert len(records) == before + 1
        assert records[-1]["outcome"]["error"] == "upstream_tls_failed"
        assert "certificate" in records[-1]["outcome"]["message"].lower()
    finally:
        stranger.stop()


class TcpSink:
    """A bare TCP listener that records every connection and every byte it is sent.

    Stands in for an upstream where even a TCP connect (with no HTTP request) must not happen.
    """

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port: int = self.server.getsockname()[1]
        self.accepted = 0
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    while data := conn.recv(4096):
                        self.received.append(data)

    def close(self, linger: float = 0.5) -> None:
        time.sleep(linger)  # a late connection attempt would still be counted
        self._stop.set()
        self._thread.join(3)
        self.server.close()


def test_non_http_bytes_in_a_tunnel_are_not_relayed(env: Env) -> None:
    """CONNECT, then bytes that are neither TLS nor HTTP: mitmproxy would relay them raw."""
    sink = TcpSink()
    before = len(env.k.audit())
    with socket.create_connection(("127.0.0.1", env.k.config["listen"]["port"]), timeout=5) as raw:
        raw.sendall(f"CONNECT localhost:{sink.port} HTTP/1.1\r\nHost: localhost:{sink.port}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        raw.sendall(b"\x00\x01 not http, not tls " + env.file_secret.encode() + b"\r\n\r\n")
        with contextlib.suppress(OSError):
            raw.recv(4096)
    sink.close()
    assert sink.accepted == 0 and sink.received == []
    records = wait_for_audit(env.k, before + 1)
    assert len(records) == before + 1
    assert records[-1]["request"]["scheme"] == "tcp" and records[-1]["outcome"]["error"] == "bad_request"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_denied_request_opens_no_connection_upstream(env: Env, scheme: str) -> None:
    """Not even a TCP handshake: the decision comes before mitmproxy connects (lazy strategy)."""
    sink = TcpSink()
    try:
        r = curl(env.k, f"{scheme}://localhost:{sink.port}/admin/x")
        assert r.status == 403 and r.json()["error"] == "forbidden"
        r = curl(env.k, f"{scheme}://localhost:{sink.port}/policy-error/string")
        assert r.status == 503
    finally:
        sink.close()
    assert sink.accepted == 0 and sink.received == []


def test_concurrent_requests_one_audit_line_each(env: Env) -> None:
    n = 20
    ctx = ssl.create_default_context(cafile=str(env.k.ca_cert))

    async def one(s: aiohttp.ClientSession, i: int) -> tuple[int, str]:
        path = f"/v1/par/{i}" if i % 2 else f"/admin/{i}"
        async with s.get(env.upstream.url(path), ssl=ctx) as r:
            await r.read()
            return r.status, r.headers["Keyless-Decision-Id"]

    async def main() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession(trust_env=True) as s:
            return await asyncio.gather(*(one(s, i) for i in range(n)))

    before = len(env.k.audit())
    with proxy_environ(env.k):
        results = asyncio.run(main())
    assert sorted(s for s, _ in results) == [200] * (n // 2) + [403] * (n // 2)
    assert len(env.upstream.received) == n // 2
    assert all(r.path.startswith("/v1/par/") for r in env.upstream.received)
    records = wait_for_audit(env.k, before + n)
    time.sleep(0.2)
    records = env.k.audit()[before:]
    assert sorted(r["decision_id"] for r in records) == sorted(d for _, d in results)


def test_duplicate_app_credentials_are_all_stripped(env: Env) -> None:
    r = curl(env.k, env.upstream.url("/open/dup?api_key=a&api_key=b", tls=False),
             "-H", "Authorization: one", "-H", "authorization: two", "-H", "X-Api-Key: k1", "-H", "x-api-key: k2")
    assert r.status == 200
    got = only_received(env)
    assert "authorization" not in got.headers and "x-api-key" not in got.headers
    assert got.query == {}


def test_request_body_arrives_intact_with_the_credential(env: Env, tmp_path: Path) -> None:
    body = secrets.token_bytes(600_000)
    (tmp_path / "body").write_bytes(body)
    r = curl(env.k, env.upstream.url("/jwt/upload"), "--data-binary", f"@{tmp_path / 'body'}",
             "-H", "Content-Type: application/octet-stream")
    assert r.status == 200, r.body
    got = only_received(env)
    assert got.method == "POST" and got.body == body
    verify_jwt(env, got.headers["authorization"].removeprefix("Bearer "),
               f"https://localhost:{env.upstream.https_port}")


def test_client_aborting_mid_body_is_one_audit_line_and_nothing_forwarded(env: Env) -> None:
    port = env.upstream.http_port
    before = len(env.k.audit())
    with socket.create_connection(("127.0.0.1", env.k.config["listen"]["port"]), timeout=5) as raw:
        raw.sendall(f"POST http://localhost:{port}/v1/abort HTTP/1.1\r\nHost: localhost:{port}\r\n"
                    "Content-Length: 1000\r\n\r\nonly a few bytes".encode())
        time.sleep(0.3)
    records = wait_for_audit(env.k, before + 1)
    time.sleep(0.3)
    records = env.k.audit()
    assert len(records) == before + 1
    assert records[-1]["request"]["path"] == "/v1/abort" and records[-1]["outcome"]["error"] is not None
    assert env.upstream.received == []


def test_secret_file_rotation_and_crlf_rejected_on_reload(env: Env) -> None:
    url = env.upstream.url("/rotate/x")
    assert curl(env.k, url).status == 200
    assert only_received(env).headers["x-rotating"] == "Key rotation-one"
    # Rotate the way secret managers do: write a new file, rename it over the old one.
    new = env.rotating_file.with_suffix(".new")
    new.write_text("rotation-two-longer\n")
    new.replace(env.rotating_file)
    env.upstream.received.clear()
    assert curl(env.k, url).status == 200
    assert only_received(env).headers["x-rotating"] == "Key rotation-two-longer"
    # A value with CR/LF could split the header: rejected when loaded, and nothing is forwarded.
    new.write_text("evil\r\nX-Injected: yes\n")
    new.replace(env.rotating_file)
    env.upstream.received.clear()
    r = curl(env.k, url)
    assert_refused(r, 503, "credential_unavailable", env)
    assert "CR, LF" in r.json()["message"] and "evil" not in r.body.decode()


def test_upstream_connect_failure_is_a_json_refusal(env: Env) -> None:
    sink = TcpSink()
    port = sink.port
    sink.close(linger=0)  # nothing listens there any more
    before = len(env.k.audit())
    r = curl(env.k, f"http://localhost:{port}/v1/x")
    rec = wait_for_audit(env.k, before + 1)[-1]
    assert r.status == 502 and rec["outcome"]["status"] == 502
    assert r.json()["error"] == rec["outcome"]["error"] == "upstream_unreachable"
    assert rec["decision"]["allow"] is True and "Connect call failed" in rec["outcome"]["message"]
    assert r.decision_id == rec["decision_id"]
    assert r.json()["decision_id"] == rec["decision_id"]


def test_request_bodies_over_max_body_size_are_refused(tmp_path: Path, upstream: Upstream) -> None:
    # listen.max_body_size: the deprecated name of listen.max_request_body, still honoured.
    (tmp_path / "key").write_text("body-limit-canary\n")
    cfg = base_config(tmp_path, upstream, listen={"address": "127.0.0.1", "port": free_port(),
                                                  "max_body_size": "1k"},
                      credentials={"workload-jwt": {"type": "jwt"},
                                   "demo-api": {"type": "static", "from": "file", "file": str(tmp_path / "key")}})
    k = Keyless(tmp_path, cfg).start()
    try:
        big = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", k.proxy_url,
                              "-X", "POST", "--data-binary", "x" * 4096, upstream.url("/v1/reports", tls=False)],
                             capture_output=True, text=True, timeout=30)
        small = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", k.proxy_url,
                                "-X", "POST", "--data-binary", "x" * 100, upstream.url("/v1/reports", tls=False)],
                               capture_output=True, text=True, timeout=30)
    finally:
        k.stop()
    assert big.stdout == "413"
    assert small.stdout == "200"
    assert len(upstream.received) == 1 and len(upstream.received[0].body) == 100
