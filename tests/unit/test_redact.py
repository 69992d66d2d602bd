"""proxy.redact, proxy.reflect and proxy.decoding without a proxy: patterns, headers, bodies, streams,
decoders."""

from __future__ import annotations

import base64
import gzip
import json
import secrets
import zlib

import brotli
import pytest

from proxy.credentials.aws_sigv4 import sigv4_forms
from proxy.decoding import DecodeError, decoder_for
from proxy.model import Grant
from proxy.redact import MARKER, MIN_FORM_BYTES, Redactor, StreamRedactor, header_forms, patterns, redact_headers
from proxy.reflect import (
    BodyStream,
    ResponseLimits,
    injects,
    is_text,
    plan_body,
    prepare_response,
    redact_buffered,
    trace_refusal,
)

TOKEN = "tok-" + secrets.token_urlsafe(24)
HEADER = f"Bearer {TOKEN}"


def redactor() -> Redactor:
    return Redactor.for_forms(header_forms(HEADER, TOKEN))


def test_forms_of_a_bearer_header() -> None:
    assert header_forms(HEADER, TOKEN) == (HEADER, TOKEN)


def test_forms_of_a_basic_header_include_the_pair_and_password() -> None:
    pair = "svc-user:pa55-w0rd-long"
    b64 = base64.b64encode(pair.encode()).decode()
    forms = header_forms(f"Basic {b64}", b64)
    assert forms == (f"Basic {b64}", b64, pair, "pa55-w0rd-long")
    # A secret configured as the raw pair is also looked for base64-encoded.
    assert b64 in header_forms(f"Basic {pair}", pair)


def test_short_forms_are_not_scanned() -> None:
    short = "a" * (MIN_FORM_BYTES - 1)
    assert patterns([short]) == ()
    # The whole header value is long enough and still is.
    assert set(patterns(header_forms(f"Key {short}", short))) == {
        f"Key {short}".encode(), f"Key%20{short}".encode(), f"Key+{short}".encode()}
    body = b"aaaaaaa appears in ordinary text: aaaaaaa"
    assert Redactor.for_forms((short,)).redact(body) == (body, False)


def test_grant_never_shows_its_forms() -> None:
    g = Grant("api", "static", None, "hmac-sha256:00", (HEADER, TOKEN))
    assert TOKEN not in repr(g)
    assert TOKEN not in json.dumps(g.as_audit())
    assert g == Grant("api", "static", None, "hmac-sha256:00")


def test_sigv4_forms() -> None:
    auth = ("AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/20260101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=" + "ab" * 32)
    forms = sigv4_forms({"Authorization": auth, "X-Amz-Security-Token": "session-token-value"})
    assert forms == (auth, "ab" * 32, "session-token-value")


def test_body_whole_value_wins_over_bare_token() -> None:
    body = json.dumps({"headers": {"Authorization": HEADER}, "token": TOKEN}).encode()
    out, hit = redactor().redact(body)
    assert hit and TOKEN.encode() not in out
    assert json.loads(out) == {"headers": {"Authorization": MARKER.decode()}, "token": MARKER.decode()}


def test_escaped_spellings_are_found() -> None:
    secret = "s3cr/t+value=with:chars"
    r = Redactor.for_forms((secret,))
    for body in (json.dumps({"v": secret}).encode(), json.dumps(secret).replace("/", "\\/").encode(),
                 b"q=s3cr%2Ft%2Bvalue%3Dwith%3Achars", b"q=s3cr%2Ft%2Bvalue%3Dwith%3Achars&x=1"):
        out, hit = r.redact(body)
        assert hit, body
        assert MARKER in out


def test_headers_values_and_names() -> None:
    fields = [(b"Content-Type", b"application/json"), (b"X-Echo-Authorization", HEADER.encode()),
              (f"X-{TOKEN}".encode(), b"1"), (b"X-Other", f"prefix {TOKEN} suffix".encode())]
    out, names = redact_headers(fields, redactor())
    assert names == ["x-echo-authorization", "x-[keyless:redacted]", "x-other"]
    assert out == [(b"Content-Type", b"application/json"), (b"X-Echo-Authorization", MARKER),
                   (b"X-Other", b"prefix " + MARKER + b" suffix")]


@pytest.mark.parametrize("cut", range(1, len(HEADER) + 8))
def test_canary_split_across_chunks(cut: int) -> None:
    body = b"x" * 5 + f'{{"authorization": "{HEADER}", "again": "{TOKEN}"}}'.encode() + b"y" * 3
    stream = StreamRedactor(redactor())
    out = b"".join(stream.run([body[:cut], body[cut:cut + 3], body[cut + 3:]]))
    assert out == redactor().redact(body)[0]
    assert TOKEN.encode() not in out and stream.reflected


def test_stream_one_byte_at_a_time() -> None:
    body = (b"lorem " * 50 + HEADER.encode() + b" ipsum " * 50) * 3
    stream = StreamRedactor(redactor())
    out = b"".join(stream.run(body[i:i + 1] for i in range(len(body))))
    assert out == redactor().redact(body)[0]
    assert out.count(MARKER) == 3


def test_stream_without_reflection_is_unchanged() -> None:
    body = secrets.token_bytes(100_000)
    stream = StreamRedactor(redactor())
    assert b"".join(stream.run([body[:4096], body[4096:50_000], body[50_000:]])) == body
    assert not stream.reflected


def test_text_types() -> None:
    for t in ("text/html; charset=utf-8", "application/json", "application/problem+json", "application/xml",
              "application/javascript", "application/x-www-form-urlencoded", "message/http", None, ""):
        assert is_text(t), t
    for t in ("image/png", "application/octet-stream", "application/zip", "video/mp4", "application/pdf"):
        assert not is_text(t), t


def test_plans() -> None:
    lim = ResponseLimits(scan_max=1000, max_body=10_000)

    def plan(ct: str | None, ce: str | None, n: int | None, scanning: bool = True) -> str:
        return plan_body(scanning=scanning, content_type=ct, content_encoding=ce, expected=n, limits=lim)

    assert plan("application/json", None, 0) == "none"
    assert plan("application/json", None, 500) == "full"
    assert plan("application/json", "gzip", 500) == "full"
    assert plan("application/json", None, 5000) == "stream"
    assert plan("application/json", None, None) == "stream"
    assert plan("application/json", None, -1) == "stream"
    assert plan("application/json", None, 20_000) == "too_large"
    assert plan("image/png", None, 20_000) == "too_large"
    assert plan("image/png", None, 5000) == "binary"
    assert plan("image/png", None, 500) == "full"
    assert plan("text/plain", "compress", 500) == "unscannable"
    assert plan("image/png", "compress", 500) == "binary"
    assert plan("text/plain", None, 500, scanning=False) == "full"
    assert plan("text/plain", None, 5000, scanning=False) == "binary"


def test_trace() -> None:
    assert trace_refusal("TRACE", "refuse") is not None
    assert trace_refusal("trace", "refuse") is not None
    assert trace_refusal("TRACK", "refuse") is not None
    assert trace_refusal("TRACE", "forward_bare") is None
    assert trace_refusal("GET", "refuse") is None
    assert not injects("TRACE") and not injects("Trace") and injects("GET")


def _zstd(data: bytes) -> bytes:
    from backports import zstd

    return zstd.compress(data)


ENCODERS = {
    "gzip": lambda b: gzip.compress(b),
    "deflate": lambda b: zlib.compress(b),
    "br": lambda b: brotli.compress(b),
    "zstd": _zstd,
}


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_buffered_compressed_body(encoding: str) -> None:
    body = json.dumps({"headers": {"Authorization": HEADER}}).encode()
    out = redact_buffered(ENCODERS[encoding](body), encoding, redactor(), ResponseLimits())
    assert out is not None and TOKEN.encode() not in out and MARKER in out
    assert redact_buffered(ENCODERS[encoding](b"nothing here"), encoding, redactor(), ResponseLimits()) is None


def test_raw_deflate_and_gzip_members() -> None:
    c = zlib.compressobj(wbits=-15)
    raw = c.compress(HEADER.encode()) + c.flush()
    assert redact_buffered(raw, "deflate", redactor(), ResponseLimits()) == MARKER
    two = gzip.compress(b"a " + HEADER.encode()[:10]) + gzip.compress(HEADER.encode()[10:])
    assert redact_buffered(two, "gzip", redactor(), ResponseLimits()) == b"a " + MARKER


def test_bomb_in_a_buffered_body_is_refused() -> None:
    from proxy.errors import KeylessError

    bomb = gzip.compress(b"\0" * (20 * 1024 * 1024))
    with pytest.raises(KeylessError) as e:
        redact_buffered(bomb, "gzip", redactor(), ResponseLimits(scan_max=1024 * 1024))
    assert e.value.code == "response_too_large"


def test_unknown_and_corrupt_encodings() -> None:
    assert decoder_for("compress") is None
    assert decoder_for("gzip, br") is not None
    with pytest.raises(DecodeError):
        redact_buffered(b"not gzip at all", "gzip", redactor(), ResponseLimits())


@pytest.mark.parametrize("encoding", [*sorted(ENCODERS), "gzip, br", None])
def test_body_stream_decodes_and_redacts_across_chunks(encoding: str | None) -> None:
    body = (b"line of log text\n" * 3000 + HEADER.encode() + b"\n") * 4
    data = body
    for name in [e.strip() for e in (encoding or "").split(",") if e.strip()]:
        data = ENCODERS[name](data)
    stream = BodyStream(redactor(), decoder_for(encoding), None)
    out = b"".join(b"".join(stream(data[i:i + 977])) for i in range(0, len(data), 977)) + b"".join(stream(b""))
    assert stream.failure is None and stream.reflected
    assert out == body.replace(HEADER.encode(), MARKER)


def test_body_stream_limit_and_corruption() -> None:
    stream = BodyStream(None, None, 100)
    assert b"".join(stream(b"x" * 60)) == b"x" * 60
    assert b"".join(stream(b"x" * 60)) == b""
    assert stream.failure == "response_too_large"
    broken = BodyStream(redactor(), decoder_for("gzip"), None)
    assert list(broken(b"\x1f\x8b garbage that is no gzip stream")) == []
    assert broken.failure == "response_unscannable"


def test_prepare_and_finish_a_streamed_response() -> None:
    from proxy.reflect import finish_response, prepare_response

    fields = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"9000000"), (b"Content-Encoding", b"gzip"),
              (b"X-Echo", HEADER.encode())]
    p = prepare_response(header_forms(HEADER, TOKEN), fields, expected=9_000_000, client_http11=True,
                         limits=ResponseLimits())
    assert p.fields == [(b"Content-Type", b"text/plain"), (b"X-Echo", MARKER), (b"transfer-encoding", b"chunked")]
    assert isinstance(p.stream, BodyStream) and p.scan is not None
    out = b"".join(p.stream(gzip.compress(HEADER.encode()))) + b"".join(p.stream(b""))
    assert out == MARKER
    done = finish_response(p.scan, p.stream, trailers=[(b"X-Trailer", TOKEN.encode())], raw=None,
                           content_encoding=None, limits=ResponseLimits())
    assert done.trailers == [(b"X-Trailer", MARKER)] and done.body is None
    assert p.scan.as_audit() == {"headers": ["x-echo", "x-trailer"], "body": True, "body_scan": "stream"}


def test_prepare_refuses_and_buffers() -> None:
    from proxy.errors import KeylessError
    from proxy.reflect import finish_response, prepare_response

    lim = ResponseLimits(scan_max=1000, max_body=5000)
    with pytest.raises(KeylessError) as e:
        prepare_response((), [(b"Content-Length", b"6000")], expected=6000, client_http11=True, limits=lim)
    assert e.value.code == "response_too_large" and e.value.status == 502
    # No credential: a small body stays buffered and untouched, a large one streams, counted.
    assert prepare_response((), [], expected=10, client_http11=True, limits=lim).stream is False
    assert isinstance(prepare_response((), [], expected=None, client_http11=True, limits=lim).stream, BodyStream)
    p = prepare_response(header_forms(HEADER, TOKEN), [(b"Content-Type", b"application/json")], expected=100,
                         client_http11=True, limits=lim)
    assert p.stream is False and p.scan is not None
    done = finish_response(p.scan, p.stream, trailers=None, raw=json.dumps({"a": HEADER}).encode(),
                           content_encoding=None, limits=lim)
    assert done.body == json.dumps({"a": MARKER.decode()}).encode()
    assert p.scan.as_audit() == {"headers": [], "body": True, "body_scan": "full"}


def test_raw_deflate_that_looks_like_zlib_is_still_decoded() -> None:
    # Raw deflate from zlib never passes the zlib header check, but the spec lets a stored
    # block's padding bits be anything: 0x08 then LEN=29 makes "08 1d", a valid zlib header.
    payload = (b"x" * 10 + HEADER.encode() + b"y" * 10)

    def stored(final: bool, chunk: bytes, first: int) -> bytes:
        n = len(chunk)
        return bytes([first | final]) + n.to_bytes(2, "little") + (n ^ 0xFFFF).to_bytes(2, "little") + chunk

    data = stored(False, payload[:29], 0x08) + stored(True, payload[29:], 0)
    assert data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
    assert zlib.decompress(data, -15) == payload
    want = b"x" * 10 + MARKER + b"y" * 10
    assert redact_buffered(data, "deflate", redactor(), ResponseLimits()) == want
    stream = BodyStream(redactor(), decoder_for("deflate"), None)
    out = b"".join(b"".join(stream(data[j:j + 3])) for j in range(0, len(data), 3)) + b"".join(stream(b""))
    assert out == want and stream.failure is None


def test_a_repeated_content_encoding_is_decoded_in_full() -> None:
    """An upstream that sends Content-Encoding twice (identity, then gzip): the streamed body is
    decoded by both lines, as mitmproxy's Headers.get joins them, so the echoed credential is
    found (decoding by the first line alone passed the gzip body through unscanned)."""
    fields = [(b"content-type", b"text/plain"), (b"content-encoding", b"identity"), (b"content-encoding", b"gzip")]
    p = prepare_response((HEADER, TOKEN), fields, expected=None, client_http11=True, limits=ResponseLimits())
    assert callable(p.stream) and not any(k.lower() == b"content-encoding" for k, _ in p.fields)
    body = b"echo: " + HEADER.encode() + b"\n"
    data = gzip.compress(body)
    out = b"".join(p.stream(data)) + b"".join(p.stream(b""))
    assert HEADER.encode() not in out and MARKER in out
    assert isinstance(p.stream, BodyStream) and p.stream.reflected
