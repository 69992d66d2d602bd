"""``aws_sigv4``: sign AWS requests with short-lived STS credentials for the calling workload.

Keyless mints a JWT for the caller's attested identity and trades it for temporary credentials
with STS ``AssumeRoleWithWebIdentity`` (the role from config or ``params.role_arn``). The
credentials are cached per (identity, role) until shortly before they expire. The request is
then signed with botocore's SigV4 signer after everything the app sent for AWS auth is removed.

Keyless signs only HTTPS requests to the endpoints listed in ``endpoints`` (each with its
service and region). mitmproxy verifies every upstream certificate, so a signature is only ever
sent to the host it was computed for: Keyless cannot be used as a signing oracle.

Payloads: the body is hashed (``x-amz-content-sha256``) because mitmproxy buffers it. If the app
sent ``UNSIGNED-PAYLOAD`` (S3 over HTTPS) and the endpoint has ``unsigned_payload: true``, that
literal is kept. An ``aws-chunked`` upload with ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` (what
current SDKs send by default) is decoded into a plain body whose checksum trailer becomes a
header, then signed with its hash. Chunk-signed uploads (``STREAMING-AWS4-HMAC-SHA256-*``)
cannot be re-signed and are refused.
"""

from __future__ import annotations

import hashlib
import re
import time
import xml.etree.ElementTree as ET  # noqa: S405 - the STS endpoint is configured and TLS-verified
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from proxy.authority import canonical_host, config_host
from proxy.confread import Section
from proxy.credentials import Runtime
from proxy.credentials.cache import CachePolicy, FetchError, Token, TokenCache
from proxy.credentials.http import endpoint_url, quiet_botocore, request_body
from proxy.errors import KeylessError
from proxy.model import Grant, GrantContext, OutboundRequest, fingerprint
from proxy.shared.tokens import SharedTokens, shared_tokens

# Everything an app may send to authenticate to AWS; removed before Keyless signs.
AUTH_HEADERS = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
PRESIGN_PARAMS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                  "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token")
UNSIGNED = ("UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
# Headers that go into the signature: enough for AWS to bind it to this request, and none that
# a hop between Keyless and AWS could legitimately rewrite.
SIGNED_EXTRA = ("content-type", "content-md5", "content-encoding")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"
quiet_botocore()


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    service: str
    region: str
    unsigned_payload: bool


@dataclass(frozen=True, slots=True)
class AwsOptions:
    role_arn: str | None
    region: str
    sts_endpoint: str
    token_audience: str
    duration: int
    endpoints: tuple[Endpoint, ...]
    ca_file: Path | None
    cache: CachePolicy


def parse(s: Section) -> AwsOptions:
    region = s.text("region", "us-east-1")
    role = s.text("role_arn", None)
    if role is not None and not _ROLE_ARN.match(role):
        s.error("must be an IAM role ARN such as arn:aws:iam::123456789012:role/app", "role_arn")
    endpoints: list[Endpoint] = []
    raw = s.raw.get("endpoints")
    s.has("endpoints")
    if not isinstance(raw, list) or not raw:
        s.error("is required: a list of {host, service, region, port, unsigned_payload} Keyless may sign for",
                "endpoints")
        raw = []
    for i, item in enumerate(raw):
        e = Section(item, s.key_path(f"endpoints[{i}]"), s.problems, s.base_dir)
        endpoints.append(Endpoint(
            host=config_host(e) or "", port=e.integer("port", 443, lo=1, hi=65535),
            service=e.text("service"), region=e.text("region", region),
            unsigned_payload=e.flag("unsigned_payload", False)))
        e.done()
    return AwsOptions(
        role_arn=role, region=region,
        sts_endpoint=endpoint_url(s, "sts_endpoint", f"https://sts.{region}.amazonaws.com") or "",
        token_audience=s.text("token_audience", "sts.amazonaws.com"),
        duration=s.integer("session_duration", 3600, lo=900, hi=43200),
        endpoints=tuple(endpoints), ca_file=s.path_value("ca_file", None),
        cache=CachePolicy(timeout=s.number("timeout", 5.0, lo=0.1), retries=s.integer("retries", 2, lo=0, hi=10),
                          # STS credentials live an hour or more: refresh with minutes to spare.
                          refresh_at=0.8, min_remaining=60.0),
    )


class _Signer:
    """botocore's SigV4 (or its S3 variant) with the payload hash Keyless decided on."""

    @staticmethod
    def sign(service: str, region: str, creds: ReadOnlyCredentials, request: AWSRequest, payload: str) -> None:
        base = S3SigV4Auth if service == "s3" else SigV4Auth

        class Auth(base):  # type: ignore[valid-type,misc]
            def payload(self, request: AWSRequest) -> str:
                return payload

        request.headers["X-Amz-Content-SHA256"] = payload
        Auth(creds, service, region).add_auth(request)


def session_name(subject: str) -> str:
    """An STS RoleSessionName ([\\w+=,.@-]{2,64}) that names the workload and is unique to it."""
    readable = re.sub(r"[^\w+=,.@-]", "-", subject.split("://", 1)[-1])[:40]
    return f"{readable}-{hashlib.sha256(subject.encode()).hexdigest()[:16]}"


def parse_sts(body: bytes, started: float) -> Token:
    try:
        root = ET.fromstring(body)  # noqa: S314 - expat refuses entity expansion bombs since 2.4
    except ET.ParseError:
        raise FetchError("STS answered with a body that is not XML") from None
    creds = root.find(f".//{_NS}Credentials")
    if creds is None:
        creds = root.find(".//Credentials")
    if creds is None:
        raise FetchError("STS answer has no Credentials")

    def text(tag: str) -> str:
        node = creds.find(_NS + tag)
        if node is None:
            node = creds.find(tag)
        if node is None or not node.text:
            raise FetchError(f"STS answer has no {tag}")
        return node.text.strip()

    key_id, secret, token = text("AccessKeyId"), text("SecretAccessKey"), text("SessionToken")
    try:
        expires = datetime.fromisoformat(text("Expiration").replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise FetchError("STS answer has a malformed Expiration") from None
    return Token(key_id, expires, data=ReadOnlyCredentials(key_id, secret, token), obtained_at=started)


class AwsSigV4Credential:
    type = "aws_sigv4"

    def __init__(self, name: str, options: AwsOptions, runtime: Runtime) -> None:
        self.name = name
        self.options = options
        self.label = f"aws_sigv4({name})"
        self.runtime = runtime
        # The STS triple is sealed as a list and rebuilt (proxy/shared/tokens.py).
        shared: SharedTokens[tuple[str, str]] | None = shared_tokens(
            runtime, self.label, options, identity_of=lambda k: k[0], encode=list,
            decode=lambda d: ReadOnlyCredentials(*d))
        self.cache: TokenCache[tuple[str, str]] = TokenCache(self.label, self._fetch, options.cache, shared=shared)
        self._endpoints = {(e.host, e.port): e for e in options.endpoints}

    def __repr__(self) -> str:
        return f"AwsSigV4Credential(name={self.name!r})"

    async def _fetch(self, key: tuple[str, str]) -> Token:
        subject, role = key
        o = self.options
        web_token, _ = self.runtime.signer.mint(subject, o.token_audience, 300)
        form = {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15", "RoleArn": role,
                "RoleSessionName": session_name(subject), "WebIdentityToken": web_token,
                "DurationSeconds": str(o.duration)}
        started = time.time()
        _, body = await request_body(self.runtime.http.session(o.ca_file), "POST", o.sts_endpoint, what="STS",
                                     data=form)
        return parse_sts(body, started)

    def endpoint_for(self, host: str, port: int, scheme: str) -> Endpoint:
        # ctx.host is canonical already; canonical again so that any caller's spelling matches.
        endpoint = self._endpoints.get((canonical_host(host), port))
        if endpoint is None:
            raise KeylessError("credential_unavailable",
                               f"{host}:{port} is not an AWS endpoint this credential signs for",
                               self.label)
        if scheme != "https":
            raise KeylessError("credential_unavailable", "AWS requests are signed only over verified TLS",
                               self.label)
        return endpoint

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        # ctx.host is the destination name the policy decided on (the dialled address in
        # transparent mode would never match an endpoint).
        endpoint = self.endpoint_for(ctx.host, request.port, request.scheme)
        subject = ctx.identity.id
        if subject is None:
            raise KeylessError("credential_unavailable", "no attested workload identity to assume a role for",
                               self.label)
        role = ctx.decision.params.get("role_arn", self.options.role_arn)
        if not isinstance(role, str) or not _ROLE_ARN.match(role):
            raise KeylessError("credential_unavailable", "no valid role_arn in config or params", self.label)
        payload = self._payload(request, endpoint)
        token = await self.cache.get((subject, role))
        sign_request(request, endpoint, token.data, payload)
        return Grant(self.name, self.type, token.expires_at, fingerprint(token.value), sigv4_forms(request.headers))

    def _payload(self, request: OutboundRequest, endpoint: Endpoint) -> str:
        claimed = request.headers.get("x-amz-content-sha256", "")
        if claimed.startswith("STREAMING-AWS4-HMAC-SHA256"):
            raise KeylessError("credential_unavailable",
                               f"cannot re-sign a chunk-signed upload ({claimed}); see docs/credentials.md", self.label)
        if claimed == "UNSIGNED-PAYLOAD" and endpoint.unsigned_payload:
            return claimed
        body: Any = getattr(request, "raw_content", b"")
        if body is None:
            raise KeylessError("credential_unavailable", "request body was streamed; cannot hash it", self.label)
        if claimed == "STREAMING-UNSIGNED-PAYLOAD-TRAILER":
            # What SDKs send by default for uploads (flexible checksums). The body is buffered
            # anyway, so Keyless turns it back into a plain body and signs its hash: the payload
            # ends up covered by the signature, which the app's unsigned upload never was.
            body = dechunk(request, body)
        return hashlib.sha256(body).hexdigest()


def sigv4_forms(headers: Mapping[str, str]) -> tuple[str, ...]:
    """What signing put on the wire that an echo must not hand the app: the whole
    Authorization value, its Signature and the session token (the secret key never leaves)."""
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower.get("authorization", "")
    signature = auth.rpartition("Signature=")[2] if "Signature=" in auth else ""
    forms = (auth, signature, lower.get("x-amz-security-token", ""))
    return tuple(f for f in forms if f)


def dechunk(request: OutboundRequest, body: bytes) -> bytes:
    """Decode an unsigned ``aws-chunked`` body in place; trailers (checksums) become headers."""
    out, pos = bytearray(), 0
    trailers: dict[str, str] = {}
    try:
        while True:
            end = body.index(b"\r\n", pos)
            size = int(body[pos:end].split(b";", 1)[0], 16)
            pos = end + 2
            if size == 0:
                break
            out += body[pos:pos + size]
            if len(body) < pos + size + 2 or body[pos + size:pos + size + 2] != b"\r\n":
                raise ValueError("chunk overruns body")
            pos += size + 2
        while True:
            end = body.index(b"\r\n", pos)
            line = body[pos:end].decode("ascii")
            pos = end + 2
            if not line:
                break
            name, _, value = line.partition(":")
            if not name.lower().startswith("x-amz-checksum-"):
                raise ValueError("unexpected trailer")
            trailers[name.strip().lower()] = value.strip()
    except (ValueError, UnicodeDecodeError):
        raise KeylessError("bad_request", "malformed aws-chunked request body") from None
    h = request.headers
    for name in ("x-amz-trailer", "x-amz-decoded-content-length"):
        if name in h:
            del h[name]
    encodings = [e.strip() for e in h.get("content-encoding", "").split(",") if e.strip() not in ("", "aws-chunked")]
    if "content-encoding" in h:
        del h["content-encoding"]
    if encodings:
        h["content-encoding"] = ", ".join(encodings)
    h.update(trailers)
    h["content-length"] = str(len(out))
    cast(Any, request).raw_content = bytes(out)
    return bytes(out)


def sign_request(request: OutboundRequest, endpoint: Endpoint, creds: ReadOnlyCredentials, payload: str) -> None:
    """Strip the app's AWS auth, sign a copy with botocore, copy the signature headers back."""
    for name in AUTH_HEADERS:
        if name in request.headers:
            del request.headers[name]
    if "?" in request.path:
        query = request.query
        for param in PRESIGN_PARAMS:
            if param in query:
                del query[param]
    default = endpoint.port == 443
    host = request.headers.get("host") or (endpoint.host if default else f"{endpoint.host}:{endpoint.port}")
    headers = {"host": host}
    for name, value in request.headers.items():
        lname = name.lower()
        if lname in SIGNED_EXTRA or (lname.startswith("x-amz-") and lname not in AUTH_HEADERS):
            headers[lname] = value
    signed = AWSRequest(method=request.method, url=f"https://{host}{request.path}", headers=headers)
    _Signer.sign(endpoint.service, endpoint.region, creds, signed, payload)
    for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256"):
        value = signed.headers.get(name)
        if value is not None:
            request.headers[name] = value
