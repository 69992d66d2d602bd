"""Which response bodies are scanned for a reflected credential, and how; and TRACE.

``proxy.redact`` knows how to find and replace the injected secret forms. This module decides,
from the response headers alone (the ``responseheaders`` hook, before any body byte is read),
what happens to the body:

* ``full``: a text body whose Content-Length is at most ``listen.redact_max_body`` is buffered,
  decoded per Content-Encoding, redacted, and sent on as identity with Content-Length fixed;
* ``stream``: a longer text body, or one of unknown length, streams through a decoder and a
  ``StreamRedactor`` (an overlap of the longest pattern minus one byte is kept across chunks)
  and leaves as identity without Content-Length (chunked to an HTTP/1.1 client);
* ``binary``: a body whose Content-Type is not text, longer than ``redact_max_body`` or of
  unknown length, or in an encoding Keyless cannot decode, streams through unscanned (a short
  one in a known encoding is scanned like text: it costs next to nothing);
* ``none``: no body (HEAD, 204, 304, Content-Length 0);
* ``too_large``: Content-Length over ``listen.max_response_body``: a JSON 502 instead;
* ``unscannable``: a text body in a Content-Encoding Keyless cannot decode: a JSON 502 (fail
  closed: the alternative is handing on bytes that may carry the credential).

No mitmproxy here: the addon passes header values and plugs ``BodyStream`` in as mitmproxy's
``response.stream`` callable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.answers import parse_size
from proxy.decoding import DecodeError, Decoder, decoder_for, is_identity
from proxy.errors import KeylessError
from proxy.redact import Redactor, StreamRedactor, redact_headers

# Methods whose response is the request itself: a credential injected into one comes straight
# back. TRACK is IIS's TRACE. Compared case-insensitively: a lenient server may treat "trace"
# as TRACE although methods are case-sensitive.
TRACE_METHODS = frozenset({"TRACE", "TRACK"})

# Content types scanned besides text/*: what APIs and debug pages echo requests in.
_TEXT_TYPES = frozenset({
    "application/json", "application/xml", "application/javascript", "application/ecmascript",
    "application/x-javascript", "application/x-www-form-urlencoded", "application/x-ndjson",
    "application/ndjson", "application/yaml", "application/x-yaml", "application/graphql",
    "application/jwt", "application/jsonl", "application/x-jsonlines",
})
_TEXT_PREFIXES = ("text/", "message/", "multipart/")
_TEXT_SUFFIXES = ("+json", "+xml", "+yaml", "-json")

# Decoded bytes one streamed upstream chunk may expand to (gzip's ratio tops out near 1000:1).
MAX_EXPANSION = 64 * 1024 * 1024


def is_trace(method: str) -> bool:
    return method.upper() in TRACE_METHODS


def trace_refusal(method: str, mode: str) -> KeylessError | None:
    """The refusal for a TRACE under ``egress.trace: refuse`` (the default), else None.

    Checked before the policy is asked, so it holds whatever the policy says. Under
    ``forward_bare`` the request is decided as usual but never gets a credential (see
    ``injects``)."""
    if is_trace(method) and mode != "forward_bare":
        return KeylessError("forbidden", f"{method.upper()} echoes the request and is refused (egress.trace)")
    return None


def injects(method: str) -> bool:
    """Whether a credential may be injected into a request with this method: never on TRACE."""
    return not is_trace(method)


def is_text(content_type: str | None) -> bool:
    """Whether a body of this Content-Type is scanned. No Content-Type counts as text."""
    if not content_type or not content_type.strip():
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    return (mime in _TEXT_TYPES or mime.startswith(_TEXT_PREFIXES) or mime.endswith(_TEXT_SUFFIXES))


@dataclass(frozen=True, slots=True)
class ResponseLimits:
    """``listen.redact_max_body`` and ``listen.max_response_body`` in bytes."""

    scan_max: int = 4 * 1024 * 1024
    max_body: int | None = None

    @classmethod
    def parse(cls, redact_max_body: str, max_response_body: str | None) -> ResponseLimits:
        return cls(parse_size(redact_max_body),
                   None if max_response_body is None else parse_size(max_response_body))

    @property
    def decoded_max(self) -> int:
        # A buffered body is decoded in memory: one that expands past this is a bomb, refused.
        return 16 * self.scan_max


def plan_body(*, scanning: bool, content_type: str | None, content_encoding: str | None,
              expected: int | None, limits: ResponseLimits) -> str:
    """What to do with a response body, from its headers (see the module docstring).

    ``expected`` is mitmproxy's expected body size: 0 none, a length, None (chunked) or -1
    (until the connection closes). ``scanning`` is false when no credential was injected:
    nothing can be reflected, and bodies are only buffered when small."""
    if expected == 0:
        return "none"
    known = expected is not None and expected > 0
    if limits.max_body is not None and known and expected is not None and expected > limits.max_body:
        return "too_large"
    small = known and expected is not None and expected <= limits.scan_max
    if not scanning:
        return "full" if small else "binary"
    decodable = decoder_for(content_encoding) is not None
    if not is_text(content_type):
        # Scanning a small buffered body costs next to nothing, whatever its type.
        return "full" if small and decodable else "binary"
    if not decodable:
        return "unscannable"
    return "full" if small else "stream"


@dataclass(slots=True)
class ResponseScan:
    """What was found in one response; becomes the audit record's ``reflected``."""

    redactor: Redactor
    plan: str = "none"
    headers: list[str] = field(default_factory=list)
    body: bool = False

    def as_audit(self) -> dict[str, Any]:
        scan = "binary" if self.plan == "binary" else self.plan if self.plan in ("full", "stream", "none") else "none"
        return {"headers": list(self.headers), "body": self.body, "body_scan": scan}


def redact_buffered(raw: bytes, content_encoding: str | None, redactor: Redactor,
                    limits: ResponseLimits) -> bytes | None:
    """A whole buffered body, redacted and decoded to identity; None when nothing was found
    (the body then leaves exactly as it came). Raises DecodeError, or KeylessError
    ``response_too_large`` for a body that decodes past ``limits.decoded_max``."""
    if is_identity(content_encoding):
        body, hit = redactor.redact(raw)
        return body if hit else None
    decoder = decoder_for(content_encoding)
    if decoder is None:
        raise DecodeError("unknown content encoding")
    parts: list[bytes] = []
    size = 0
    for piece in (*decoder.feed(raw), *decoder.finish()):
        size += len(piece)
        if size > limits.decoded_max:
            raise KeylessError("response_too_large", "compressed response body expands past the scan limit")
        parts.append(piece)
    body, hit = redactor.redact(b"".join(parts))
    return body if hit else None


class BodyStream:
    """mitmproxy's ``response.stream`` callable: called with each chunk, then with b"".

    Decodes (when ``decoder`` is given), redacts (when ``redactor`` is), counts raw bytes
    against ``max_body``. It never raises into mitmproxy: a failure (``response_too_large``,
    ``response_unscannable``) stops all output and is left in ``failure`` for the ``response``
    hook, which then kills the flow so the client sees a cut-off body, never a complete-looking
    truncated one. Empty pieces are never yielded: to a chunked HTTP/1.1 client mitmproxy would
    frame one as the terminating zero-length chunk."""

    def __init__(self, redactor: Redactor | None, decoder: Decoder | None, max_body: int | None) -> None:
        self._redact = StreamRedactor(redactor) if redactor else None
        self._decoder = decoder
        self._max = max_body
        self.received = 0
        self.failure: str | None = None

    @property
    def reflected(self) -> bool:
        return self._redact is not None and self._redact.reflected

    def __call__(self, data: bytes) -> Iterator[bytes]:
        return self._pieces(data)

    def _pieces(self, data: bytes) -> Iterator[bytes]:
        if self.failure is not None:
            return
        try:
            self.received += len(data)
            if self._max is not None and self.received > self._max:
                self.failure = "response_too_large"
                return
            last = not data
            decoded: Iterator[bytes]
            if self._decoder is None:
                decoded = iter((data,))
            else:
                decoded = self._decoder.finish() if last else self._decoder.feed(data)
            expanded = 0
            for piece in decoded:
                expanded += len(piece)
                if expanded > MAX_EXPANSION:
                    # One upstream chunk that decodes past this is a decompression bomb.
                    self.failure = "response_unscannable"
                    return
                if self._redact is not None:
                    piece = self._redact.feed(piece)
                if piece:
                    yield piece
            if last and self._redact is not None:
                tail = self._redact.finish()
                if tail:
                    yield tail
        except Exception:  # noqa: BLE001 - DecodeError or worse: it must not reach mitmproxy's layer
            self.failure = "response_unscannable"


Fields = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Prepared:
    """What ``responseheaders`` does to a response: its new header fields, what to set as
    mitmproxy's ``response.stream`` (False: buffer), and the scan state (None: no credential)."""

    fields: Fields
    stream: BodyStream | bool
    scan: ResponseScan | None


def prepare_response(forms: tuple[str, ...], fields: Fields, *, expected: int | None, client_http11: bool,
                     limits: ResponseLimits) -> Prepared:
    """Redact the response headers and plan the body, from the headers alone.

    Raises KeylessError ``response_too_large`` or ``response_unscannable`` when the response
    must be refused instead."""
    redactor = Redactor.for_forms(forms)
    scan = ResponseScan(redactor) if redactor else None
    if scan is not None:
        fields, scan.headers = redact_headers(fields, redactor)
    content_type, encoding = _header(fields, b"content-type"), _header(fields, b"content-encoding")
    plan = plan_body(scanning=scan is not None, content_type=content_type, content_encoding=encoding,
                     expected=expected, limits=limits)
    if scan is not None:
        scan.plan = plan
    if plan == "too_large":
        raise KeylessError("response_too_large", "upstream response is larger than listen.max_response_body")
    if plan == "unscannable":
        raise KeylessError("response_unscannable", f"cannot decode Content-Encoding {encoding!r} to scan it")
    if plan == "stream":
        # Redacting changes the length and the body leaves decoded: no Content-Length or
        # Content-Encoding any more; an HTTP/1.1 client gets it chunked.
        fields = [f for f in fields if f[0].lower() not in (b"content-length", b"content-encoding")]
        if client_http11 and _header(fields, b"transfer-encoding") is None:
            fields.append((b"transfer-encoding", b"chunked"))
        return Prepared(fields, BodyStream(redactor, decoder_for(encoding), limits.max_body), scan)
    if plan == "binary":
        return Prepared(fields, BodyStream(None, None, limits.max_body) if limits.max_body is not None else True,
                        scan)
    return Prepared(fields, False, scan)


@dataclass(slots=True)
class Finished:
    """What ``response`` does to the response: new trailer fields (None: unchanged) and a new
    identity body (None: unchanged, the body leaves exactly as it came)."""

    trailers: Fields | None = None
    body: bytes | None = None


def finish_response(scan: ResponseScan | None, stream: object, *, trailers: Fields | None,
                    raw: bytes | None, content_encoding: str | None, limits: ResponseLimits) -> Finished:
    """Scan what mitmproxy buffered (the body under plan ``full``, trailers), and turn a failure
    the body stream recorded into its KeylessError; fills ``scan`` for the audit record."""
    done = Finished()
    if scan is not None:
        if trailers:
            done.trailers, names = redact_headers(trailers, scan.redactor)
            scan.headers += [n for n in names if n not in scan.headers]
        if isinstance(stream, BodyStream):
            scan.body = stream.reflected
        elif scan.plan == "full" and raw:
            try:
                done.body = redact_buffered(raw, content_encoding, scan.redactor, limits)
            except DecodeError:
                raise KeylessError("response_unscannable", "corrupt Content-Encoding; cannot scan it") from None
            scan.body = done.body is not None
    if isinstance(stream, BodyStream) and stream.failure is not None:
        raise KeylessError(stream.failure, "upstream response stopped: " + (
            "larger than listen.max_response_body" if stream.failure == "response_too_large"
            else "its body could not be decoded to scan it"))
    return done


def _header(fields: Fields, name: bytes) -> str | None:
    """Every line of the field, joined as mitmproxy's ``Headers.get`` joins them: an upstream
    that repeats ``Content-Encoding`` must not have the body decoded by its first line alone."""
    values = [v.decode("latin-1") for k, v in fields if k.lower() == name]
    return ", ".join(values) if values else None


class RefusalStream:
    """Streams a Keyless refusal in place of an upstream body that is never read into memory:
    the refusal goes out with the first chunk, every further upstream chunk is dropped."""

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    @property
    def sent(self) -> bool:
        return self._body is None

    def __call__(self, data: bytes) -> list[bytes]:
        body, self._body = self._body, None
        return [body] if body else []
