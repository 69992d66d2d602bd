"""Wire limits: what a client may send before the policy ever sees a request.

Plain, typed functions with no mitmproxy import: the configuration (``listen.limits``), the
HTTP/1 header-block inspection that runs while mitmproxy is still buffering it, the header-field
checks every protocol gets, the framing an HTTP/2 body needs on an HTTP/1.1 upstream, and the
per-connection clock behind the idle, header-read and total-request timeouts. The mitmproxy
patches that call them live in ``proxy.wirepatch``.

Why Keyless checks all this itself: mitmproxy 12 keeps an HTTP/1 obs-fold line as a value with
CR LF inside and forwards it verbatim, accepts ``Name : value`` and any byte in a name, buffers a
header block without bound ("FIXME: protect against header size DoS" in its ``_http1.py``) and
has one 600 s inactivity timeout, which a client trickling a byte at a time never reaches.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from proxy.confread import Section
from proxy.errors import KeylessError


@dataclass(frozen=True, slots=True)
class WireLimits:
    """``listen.limits``. Sizes in bytes, times in seconds; a timeout of 0 disables it."""

    # Envoy's defaults: max_request_headers_kb 60, max_headers_count 100.
    max_header_bytes: int = 60 * 1024
    max_headers: int = 100
    # Keep-alive connection with no request in flight (nginx keepalive_timeout is 75 s).
    idle_timeout: float = 60.0
    # From the first byte of a request head (or of a TLS handshake) to the complete header
    # block: what ends slowloris (nginx client_header_timeout is 60 s; 10 s is plenty for a
    # machine client on the same host or network).
    header_timeout: float = 10.0
    # From the first byte of a request to the end of its response.
    request_timeout: float = 300.0
    # Client connections per process (per worker with listen.workers > 1).
    max_connections: int = 1024
    # Seconds a client over max_connections is told to wait (Retry-After).
    retry_after: int = 1


def parse(s: Section) -> WireLimits:
    """Read ``listen.limits``; problems go to the section's shared list with their key path."""
    d = WireLimits()
    limits = WireLimits(
        max_header_bytes=_size(s, "max_header_bytes", d.max_header_bytes),
        max_headers=s.integer("max_headers", d.max_headers, lo=1, hi=10_000),
        idle_timeout=s.number("idle_timeout", d.idle_timeout),
        header_timeout=s.number("header_timeout", d.header_timeout),
        request_timeout=s.number("request_timeout", d.request_timeout),
        max_connections=s.integer("max_connections", d.max_connections, lo=1, hi=1_000_000),
        retry_after=s.integer("retry_after", d.retry_after, lo=0, hi=3600),
    )
    s.done()
    return limits


_SIZE = re.compile(r"([1-9][0-9]*)([km]?)")
_UNIT: Final = {"": 1, "k": 1024, "m": 1024 * 1024}
# Below one typical request head nothing works; above 16 MiB the limit protects nothing.
_MIN_HEADER_BYTES, _MAX_HEADER_BYTES = 1024, 16 * 1024 * 1024


def _size(s: Section, key: str, default: int) -> int:
    s.has(key)
    raw = s.raw.get(key)
    if raw is None:
        return default
    value: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and (m := _SIZE.fullmatch(raw.strip().lower())):
        value = int(m.group(1)) * _UNIT[m.group(2)]
    if value is None or not _MIN_HEADER_BYTES <= value <= _MAX_HEADER_BYTES:
        s.error(f"must be a size from 1k to 16m such as 60k or 61440, got {raw!r}", key)
        return default
    return value


# --- header blocks ---------------------------------------------------------------------------

# RFC 9110 5.6.2 token: what a field name is made of. Anything else (a space before the colon,
# a control byte) is how a lenient upstream and a strict proxy are made to disagree.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# h11's end of a header block: an empty line, LF or CR LF terminated.
_BLANK_LINE = re.compile(rb"\n\r?\n")
_LEADING_EMPTY = re.compile(rb"(?:\r?\n)*")
# Per-field overhead in the size count: ": " and CR LF for HTTP/1, RFC 7541's 32 for HTTP/2
# (the figure h2 and its SETTINGS_MAX_HEADER_LIST_SIZE use).
_H1_OVERHEAD, _H2_OVERHEAD = 4, 32


def too_large(what: str) -> KeylessError:
    return KeylessError("request_header_fields_too_large", what)


def inspect_http1_head(data: bytes | bytearray, limits: WireLimits) -> KeylessError | None:
    """Check a client's HTTP/1 request head while it is still being buffered.

    ``data`` is everything received for this request so far (mitmproxy's receive buffer).
    Returns the refusal as soon as the bytes already break a rule, None while they do not (the
    head may still be incomplete). Called on every read, so the buffer never grows past
    ``max_header_bytes`` plus one read (64 KiB): no allocation proportional to the input.
    The size counted is the request line plus the header lines, as received.
    """
    start = _LEADING_EMPTY.match(data)
    offset = start.end() if start else 0
    end = _BLANK_LINE.search(data, offset)
    stop = end.end() if end is not None else len(data)
    # Counted from the buffer's start: mitmproxy drops one leading empty line per read, so a
    # flood of CR LF would otherwise grow the buffer without ever starting a head.
    if stop > limits.max_header_bytes:
        return too_large(f"request header block over {limits.max_header_bytes} bytes")
    first = data.find(b"\n", offset, stop)
    if first == -1:
        return None  # the request line is still arriving
    # The complete field lines, each with its LF: up to the blank line, or while the head is
    # still arriving, up to the last LF (the line after it may be incomplete).
    last = end.start() + 1 if end is not None else data.rfind(b"\n", offset, stop) + 1
    fields = bytes(data[first + 1:last])
    if fields.count(b"\n") > limits.max_headers:
        return too_large(f"more than {limits.max_headers} request header fields")
    if b"\0" in data[offset:first]:
        return KeylessError("bad_request", "NUL byte in the request line")
    if _FIELD_LINES.fullmatch(fields):
        return None
    return _diagnose(fields)


# Well-formed field lines: a token, a colon, a value without CR (except before LF), LF or NUL.
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*\r?\n)*")


def _diagnose(fields: bytes) -> KeylessError:
    """Which rule a block that failed ``_FIELD_LINES`` breaks (the slow path, refusals only)."""
    for line in fields.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 5.2: a server MUST reject obs-fold with 400 (or replace it by spaces;
            # rejecting is the only choice that cannot be disagreed with downstream).
            return KeylessError("bad_request", "obsolete line folding (obs-fold) in request headers")
        name, colon, value = line.partition(b":")
        if line and (not colon or not _TOKEN.fullmatch(name)):
            return KeylessError("bad_request", "malformed request header line")
        if b"\0" in value:
            return KeylessError("bad_request", "NUL byte in a request header value")
        if b"\r" in value:
            return KeylessError("bad_request", "bare CR in a request header value")
    return KeylessError("bad_request", "malformed request header line")


def response_head_incomplete(data: bytes | bytearray) -> bool:
    """True while no complete head is in ``data`` (an upstream's response, not yet parsed)."""
    start = _LEADING_EMPTY.match(data)
    return _BLANK_LINE.search(data, start.end() if start else 0) is None


def check_fields(fields: Iterable[tuple[bytes, bytes]], limits: WireLimits, *, http2: bool) -> KeylessError | None:
    """The header-field rules for a parsed request of any protocol.

    For HTTP/1 ``inspect_http1_head`` already enforced them on the raw bytes; HTTP/2 and
    HTTP/3 carry names and values as length-prefixed strings, so a CR, LF or NUL (which would
    split a header line on an HTTP/1.1 upstream) can only be caught here. The size counts each
    field as name + value + 32 for HTTP/2 (RFC 7541) and name + value + 4 for HTTP/1.
    """
    names = [n for n, _ in fields]
    values = [v for _, v in fields]
    overhead = _H2_OVERHEAD if http2 else _H1_OVERHEAD
    if len(names) > limits.max_headers:
        return too_large(f"more than {limits.max_headers} request header fields")
    if sum(map(len, names)) + sum(map(len, values)) + overhead * len(names) > limits.max_header_bytes:
        return too_large(f"request header fields over {limits.max_header_bytes} bytes")
    # Joined, so that a request costs two regex scans rather than four per field.
    joined = b" ".join(names)
    # A space inside a name would pass the pattern as two names: the count gives it away.
    if names and (joined.count(b" ") != len(names) - 1 or not _NAME_LIST.fullmatch(joined)):
        return KeylessError("bad_request", "malformed request header name")
    if _CR_LF_NUL.search(b"".join(values)):
        return KeylessError("bad_request", "CR, LF or NUL in a request header value")
    return None


_NAME_LIST = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?: [!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
_CR_LF_NUL = re.compile(rb"[\r\n\x00]")


def request_line(data: bytes | bytearray) -> bytes | None:
    """The first line of a head (after any empty lines), if it is complete."""
    start = _LEADING_EMPTY.match(data)
    offset = start.end() if start else 0
    nl = data.find(b"\n", offset)
    return None if nl == -1 else bytes(data[offset:nl]).rstrip(b"\r")


def host_line(data: bytes | bytearray, limit: int = 8192) -> bytes | None:
    """The value of the first plain ``Host:`` line among the complete lines of a head, if any.

    Used only to name the destination of a request refused while its head was being read.
    """
    start = _LEADING_EMPTY.match(data)
    offset = start.end() if start else 0
    for line in bytes(data[offset:offset + limit]).split(b"\n")[1:]:
        name, colon, value = line.rstrip(b"\r").partition(b":")
        if not line.strip():
            break
        if colon and name.lower() == b"host":
            value = value.strip(b" \t")
            return value if _TOKEN_OR_AUTHORITY.fullmatch(value) else None
    return None


_TOKEN_OR_AUTHORITY = re.compile(rb"[A-Za-z0-9.\-_~:\[\]%]{1,255}")


# --- HTTP/2 to HTTP/1.1 framing --------------------------------------------------------------


def http1_framing(headers: Iterable[tuple[bytes, bytes]], *, end_stream: bool,
                  buffered_length: int | None) -> list[tuple[bytes, bytes]] | None:
    """The header fields an HTTP/2 or HTTP/3 request needs to go out as HTTP/1.1, or None.

    HTTP/2 frames a body by DATA frames and END_STREAM, so ``content-length`` is optional
    there; on HTTP/1.1 a request without Content-Length or Transfer-Encoding has no body, and
    the body bytes that follow are read as the next request. A buffered body gets its exact
    Content-Length; a streamed one without a declared length gets ``Transfer-Encoding:
    chunked`` (the HTTP/1 client then writes chunks). Transfer-Encoding is a connection-level
    field that HTTP/2 forbids, so any that arrived is dropped rather than trusted.
    """
    original = list(headers)
    fields = [(n, v) for n, v in original if n.lower() != b"transfer-encoding"]
    declared = any(n.lower() == b"content-length" for n, _ in fields)
    if not end_stream and buffered_length is not None:
        fields = [(n, v) for n, v in fields if n.lower() != b"content-length"]
        fields.append((b"content-length", str(buffered_length).encode()))
    elif not end_stream and not declared:
        fields.append((b"transfer-encoding", b"chunked"))
    # Otherwise: no body follows (HTTP/1.1 then reads none), or a streamed body with a declared
    # length, which h2 holds the DATA frames to.
    return None if fields == original else fields


# --- refusals outside a flow -----------------------------------------------------------------


def raw_refusal(error: KeylessError, decision_id: str | None = None, *,
                retry_after: int | None = None) -> tuple[str, bytes]:
    """An HTTP/1.1 JSON refusal as bytes, for a client no flow exists for yet.

    Returns (decision id, bytes). Used where mitmproxy has no request to attach a response to:
    a head too broken to name a destination, a connection over ``max_connections``. The
    connection is closed after it.
    """
    did = decision_id or uuid.uuid4().hex
    body = json.dumps({"error": error.code, "message": error.message, "decision_id": did}).encode()
    head = [f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}",
            "Content-Type: application/json", f"Keyless-Decision-Id: {did}",
            f"Content-Length: {len(body)}", "Connection: close"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return did, ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REASONS: Final = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
                   503: "Service Unavailable"}


# --- per-connection timeouts -----------------------------------------------------------------


@dataclass(slots=True)
class ConnectionClock:
    """Which timeout applies to one client connection, and when it expires.

    States: idle (no request in flight; since connection start or the end of the last
    request), reading a head (bytes arrived while idle: a TLS handshake or an HTTP/1 request
    head), and busy (requests in flight, each with its start). A tunnel that left HTTP
    (WebSocket) is exempt. HTTP/2 connections carry control frames (PING, SETTINGS) while
    idle, so bytes do not start the header clock there: an idle HTTP/2 connection is closed
    after ``idle_timeout`` however it trickles.
    """

    limits: WireLimits
    idle_since: float
    multiplexed: bool = False
    head_since: float | None = None
    inflight: dict[str, float] = field(default_factory=dict)
    exempt: bool = False

    def client_bytes(self, now: float) -> None:
        if not self.inflight and self.head_since is None and not self.multiplexed:
            self.head_since = now

    def request_started(self, key: str, now: float) -> None:
        self.inflight.setdefault(key, self.head_since if self.head_since is not None else now)
        self.head_since = None

    def request_done(self, key: str, now: float) -> None:
        if self.inflight.pop(key, None) is not None and not self.inflight:
            self.idle_since = now

    def deadline(self) -> tuple[float, str] | None:
        """(when, which timeout), or None when no timeout applies."""
        lim = self.limits
        if self.exempt:
            return None
        if self.inflight:
            if lim.request_timeout <= 0:
                return None
            return min(self.inflight.values()) + lim.request_timeout, "request_timeout"
        if self.head_since is not None:
            if lim.header_timeout <= 0:
                return None
            return self.head_since + lim.header_timeout, "header_timeout"
        if lim.idle_timeout <= 0:
            return None
        return self.idle_since + lim.idle_timeout, "idle_timeout"
