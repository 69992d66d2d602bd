"""Keyless's own answers for what goes wrong on the wire, as plain functions.

mitmproxy reduces every failure (an upstream that refuses the connection, a TLS handshake that
fails, a request it cannot parse) to an error code and a message, and answers the client with an
HTML page of its own. Keyless answers with the same JSON refusal as a policy denial, with a
stable code, the ``Keyless-Decision-Id`` header and one audit record. This module decides which
code, builds the body and reads the size limits; ``proxy.answer_layers`` applies it inside
mitmproxy's HTTP layer. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from proxy.errors import KeylessError

DECISION_HEADER: Final = "Keyless-Decision-Id"

# mitmproxy's ErrorCode names, by who caused the error (mitmproxy/proxy/layers/http/_events.py).
_CLIENT_CODES: Final = frozenset({"GENERIC_CLIENT_ERROR", "REQUEST_VALIDATION_FAILED", "DESTINATION_UNKNOWN"})
_UPSTREAM_CODES: Final = frozenset({"GENERIC_SERVER_ERROR", "RESPONSE_VALIDATION_FAILED", "RESPONSE_TOO_LARGE"})
# The codes mitmproxy answers with a status (ErrorCode.http_status_code()); the others (kill,
# client gone, cancel, passthrough close) only end the connection or stream.
_ANSWERED_CODES: Final = _CLIENT_CODES | _UPSTREAM_CODES | {"CONNECT_FAILED", "REQUEST_TOO_LARGE"}

_ERRNO: Final = re.compile(r"\[Errno (-?\d+)\]")
# errno values for a connect that timed out; negative ones are getaddrinfo's EAI_* codes.
_TIMEOUT_ERRNOS: Final = frozenset({110})
_SIZE: Final = re.compile(r"([1-9][0-9]*)([kmg]?)")


@dataclass(frozen=True, slots=True)
class Answer:
    """The refusal a failed flow is answered with, and the decision id it carries."""

    error: KeylessError
    decision_id: str


@dataclass(frozen=True, slots=True)
class WireError:
    """What mitmproxy's HTTP layer reported for a flow: its ErrorCode name and its message.

    ``code`` is ``CONNECT_FAILED`` for a connection that could not be opened (TCP, TLS, or
    refused by Keyless's own ``server_connect``).
    """

    code: str
    message: str

    @property
    def answerable(self) -> bool:
        """Whether mitmproxy would answer the client at all (it only closes on kills and on
        errors the client caused by going away)."""
        return self.code in _ANSWERED_CODES


def refusal_body(error: KeylessError, decision_id: str) -> bytes:
    return json.dumps({"error": error.code, "message": error.message, "decision_id": decision_id}).encode()


def refusal_headers(error: KeylessError, decision_id: str, *, close: bool = False) -> dict[str, str]:
    """Headers of a JSON refusal; ``close`` when the connection will not be reused (a body the
    client may still be sending was left unread)."""
    headers = {"Content-Type": "application/json", DECISION_HEADER: decision_id}
    if error.code == "attestation_failed":
        headers["Proxy-Authenticate"] = 'Bearer realm="keyless"'
    if close:
        headers["Connection"] = "close"
    return headers


def connect_error(message: str) -> KeylessError:
    """The refusal for a TCP connect (or name resolution) that failed with ``message``.

    mitmproxy passes on ``str(OSError)`` only, so the errno in its text is what tells a timeout
    and a resolver failure from a refused connection.
    """
    codes = [int(n) for n in _ERRNO.findall(message)]
    if any(c < 0 for c in codes) or "Name or service not known" in message:
        return KeylessError("upstream_dns_failed", f"upstream name did not resolve: {message}")
    if codes and all(c in _TIMEOUT_ERRNOS for c in codes) or message.strip().lower() == "timed out":
        return KeylessError("upstream_timeout", f"upstream connection timed out: {message}")
    return KeylessError("upstream_unreachable", f"cannot connect to upstream: {message}")


def tls_error(message: str) -> KeylessError:
    return KeylessError("upstream_tls_failed", f"upstream TLS handshake failed: {message}")


def wire_refusal(wire: WireError, connect_failure: KeylessError | None = None) -> KeylessError:
    """The refusal for an error mitmproxy's HTTP layer reported.

    ``connect_failure`` is what Keyless's connection hooks learned about a failed connection
    (its own egress refusal, a TLS failure, a resolver failure); mitmproxy's message alone
    does not say which it was.
    """
    if wire.code == "CONNECT_FAILED":
        return connect_failure if connect_failure is not None else connect_error(wire.message)
    if wire.code == "REQUEST_TOO_LARGE":
        return KeylessError("body_too_large", "request body too large")
    if wire.code in _UPSTREAM_CODES:
        return KeylessError("upstream_failed", f"upstream failed: {_reason(wire.message)}")
    return KeylessError("bad_request", f"malformed request: {_reason(wire.message)}")


def _reason(message: str) -> str:
    """mitmproxy's message without the input it quotes (a header line may hold a credential)."""
    text = message.removeprefix("Received ").split(":", 1)[0]
    text = text.split(" from client", 1)[0].split(" from server", 1)[0]
    return text.strip().rstrip(".") or "protocol error"


def parse_size(text: str) -> int:
    """``512k``, ``64m``, ``1g`` (powers of 1024) or a plain byte count, as bytes."""
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def declared_length(values: list[str]) -> int | None:
    """The request's Content-Length, or None when absent or not a single valid number (mitmproxy
    refuses those itself, before any hook)."""
    if len(values) != 1 or not values[0].strip().isdigit():
        return None
    return int(values[0].strip())


def body_too_large(limit: int) -> KeylessError:
    return KeylessError("body_too_large", f"request body exceeds listen.max_request_body ({limit} bytes)")


def check_declared_size(content_length: list[str], limit: int) -> None:
    """Refuse a request whose Content-Length is over ``limit`` before its body is read."""
    size = declared_length(content_length)
    if size is not None and size > limit:
        raise body_too_large(limit)
