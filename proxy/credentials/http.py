"""Outbound HTTP for credential providers: one aiohttp session per CA bundle, token POSTs.

Sessions are created lazily on the running loop (providers are built before it starts) and
never read proxy variables from the environment: token requests go straight to the issuer,
not through Keyless itself. TLS is always verified, against the system store plus ``ca_file``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from proxy.confread import Section
from proxy.credentials.cache import FetchError

MAX_BODY = 1 << 20
_ERROR_CODE = re.compile(r"^[A-Za-z_.]{1,64}$")
_XML_CODE = re.compile(rb"<Code>([A-Za-z_.]{1,64})</Code>")


def quiet_botocore() -> None:
    """Cap botocore's loggers at INFO: at DEBUG it logs canonical requests (with the session
    token) and response bodies (with secret values), and ``--log-level debug`` must stay safe."""
    for name in ("botocore", "boto3", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.INFO:
            logger.setLevel(logging.INFO)


class HttpClients:
    def __init__(self) -> None:
        self._sessions: dict[Path | None, aiohttp.ClientSession] = {}

    def __repr__(self) -> str:
        return f"HttpClients(sessions={len(self._sessions)})"

    def session(self, ca_file: Path | None = None) -> aiohttp.ClientSession:
        s = self._sessions.get(ca_file)
        if s is None or s.closed:
            ctx = ssl.create_default_context()
            if ca_file is not None:
                ctx.load_verify_locations(cafile=str(ca_file))
            # Timeouts are enforced per attempt by the token cache; this is only a backstop.
            s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=64),
                                      timeout=aiohttp.ClientTimeout(total=60), trust_env=False)
            self._sessions[ca_file] = s
        return s

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()
        self._sessions.clear()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def endpoint_url(s: Section, key: str, default: Any = None) -> str | None:
    """An https URL (plain http only to a loopback address, for local issuers and tests)."""
    value: str | None = s.text(key, default)
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError:
        s.error(f"is not a valid URL: {value!r}", key)
        return None
    if parts.scheme == "https" and host:
        return value
    if parts.scheme == "http" and is_loopback(host):
        return value
    s.error("must be an https:// URL (http:// only for a loopback address)", key)
    return None


def _reason_for(e: BaseException, what: str) -> FetchError:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return FetchError(f"{what}: TLS certificate verification failed", retryable=False)
    if isinstance(e, aiohttp.ClientConnectorError):
        return FetchError(f"{what}: cannot connect ({e.os_error.strerror or type(e.os_error).__name__})")
    return FetchError(f"{what}: {type(e).__name__}")


async def request_body(session: aiohttp.ClientSession, method: str, url: str, *, what: str = "token endpoint",
                       ok: tuple[int, ...] = (200,), **kwargs: Any) -> tuple[int, bytes]:
    """Send one request and return (status, body) for an ``ok`` status, else raise FetchError.

    5xx, 429 and transport errors are retryable; other 4xx are not (the same request would be
    refused again). An OAuth ``error`` or AWS ``<Code>`` is kept in the reason; free-text
    descriptions are not, since servers sometimes echo request data in them.
    """
    try:
        async with session.request(method, url, allow_redirects=False, **kwargs) as resp:
            body = await resp.content.read(MAX_BODY + 1)
            status = resp.status
    except aiohttp.ClientError as e:
        raise _reason_for(e, what) from None
    if len(body) > MAX_BODY:
        raise FetchError(f"{what} answered more than {MAX_BODY} bytes")
    if status not in ok:
        code = _error_code(body)
        raise FetchError(f"{what} answered {status}{f' ({code})' if code else ''}",
                         retryable=status >= 500 or status == 429)
    return status, body


def _error_code(body: bytes) -> str | None:
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        match = _XML_CODE.search(body[:4096])
        err = match.group(1).decode() if match else None
    return err if isinstance(err, str) and _ERROR_CODE.match(err) else None


async def request_json(session: aiohttp.ClientSession, method: str, url: str, *, what: str = "token endpoint",
                       ok: tuple[int, ...] = (200,), **kwargs: Any) -> dict[str, Any]:
    """``request_body`` for a JSON object answer; anything else is a (retryable) FetchError."""
    status, body = await request_body(session, method, url, what=what, ok=ok, **kwargs)
    try:
        doc = json.loads(body)
    except ValueError:
        raise FetchError(f"{what} answered {status} with a body that is not JSON") from None
    if not isinstance(doc, dict):
        raise FetchError(f"{what} answered {status} with JSON that is not an object")
    return doc
