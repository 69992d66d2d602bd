"""Incremental, bounded decoders for HTTP Content-Encoding: what ``proxy.reflect`` undoes
before it scans a response body for a reflected credential.

Each decoder takes the body in chunks and yields decoded output in pieces of at most ``PIECE``
bytes, so a small compressed chunk that expands enormously (a decompression bomb) never becomes
one huge buffer. mitmproxy's own decoders (``mitmproxy.net.encoding``) work on whole bodies
only, which a streamed response never is.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import brotli  # type: ignore[import-untyped]

try:  # Python 3.14 has it in the standard library; mitmproxy depends on the backport before.
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

# The largest piece of decoded output one call yields.
PIECE = 64 * 1024


class DecodeError(ValueError):
    """A Content-Encoding that is unknown or whose data is corrupt."""


class Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...
    def finish(self) -> Iterator[bytes]: ...


class _Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def finish(self) -> Iterator[bytes]:
        yield from ()


class _Zlib:
    """gzip (also concatenated members) and deflate (zlib-wrapped or, as some servers send it, raw)."""

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._d: Any = zlib.decompressobj(47) if gzip else None
        # deflate: what was fed before the first output, to replay as raw deflate if the
        # zlib-wrapped guess turns out wrong (as mitmproxy's own decoder falls back).
        self._replay: bytearray | None = None if gzip else bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._replay is not None:
            self._replay += data
            if len(self._replay) > PIECE and self._d is not None:
                # Valid deflate yields output long before this: no fallback, no growing buffer.
                self._replay = None
            elif self._d is None:
                if len(self._replay) < 2:
                    return
                # A zlib header is two bytes: CM=8 and a checksum over both.
                b0, b1 = self._replay[0], self._replay[1]
                self._d = zlib.decompressobj(15 if b0 & 0x0F == 8 and ((b0 << 8) | b1) % 31 == 0 else -15)
                data = bytes(self._replay)
        try:
            yield from self._run(data)
        except zlib.error:
            if self._replay is None:
                raise DecodeError("corrupt compressed body") from None
            # Nothing came out yet: try the bytes again as raw deflate, once.
            replay, self._replay = bytes(self._replay), None
            self._d = zlib.decompressobj(-15)
            try:
                yield from self._run(replay)
            except zlib.error:
                raise DecodeError("corrupt compressed body") from None

    def _run(self, data: bytes) -> Iterator[bytes]:
        while data:
            out = self._d.decompress(data, PIECE)
            if out:
                self._replay = None
                yield out
            data = self._d.unconsumed_tail
            if self._d.eof:
                rest = self._d.unused_data
                if not (self._gzip and rest):
                    return
                self._d = zlib.decompressobj(47)
                data = rest

    def finish(self) -> Iterator[bytes]:
        if self._d is None:
            if self._replay:
                raise DecodeError("truncated compressed body")
            return
        try:
            out = self._d.flush()
        except zlib.error:
            raise DecodeError("corrupt compressed body") from None
        if out:
            yield out


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            out = self._d.process(data, output_buffer_limit=PIECE)
            # can_accept_more_data() turns true while output is still pending: drain until a
            # call yields nothing.
            while out:
                yield out
                if self._d.is_finished():
                    return
                out = self._d.process(b"", output_buffer_limit=PIECE)
        except brotli.error:
            raise DecodeError("corrupt brotli body") from None

    def finish(self) -> Iterator[bytes]:
        yield from ()


class _Zstd:
    def __init__(self) -> None:
        self._d = zstd.ZstdDecompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while True:
                if self._d.eof:
                    # A body may hold several frames.
                    data = self._d.unused_data + data
                    if not data:
                        return
                    self._d = zstd.ZstdDecompressor()
                out = self._d.decompress(data, PIECE)
                data = b""
                if out:
                    yield out
                if self._d.needs_input and not self._d.eof:
                    return
        except (zstd.ZstdError, EOFError):
            raise DecodeError("corrupt zstd body") from None

    def finish(self) -> Iterator[bytes]:
        yield from ()


_DECODERS: dict[str, Callable[[], Decoder]] = {
    "identity": _Identity, "none": _Identity,
    "gzip": lambda: _Zlib(gzip=True), "x-gzip": lambda: _Zlib(gzip=True),
    "deflate": lambda: _Zlib(gzip=False),
    "br": _Brotli, "zstd": _Zstd,
}


class _Chain:
    def __init__(self, decoders: list[Decoder]) -> None:
        self._decoders = decoders

    def feed(self, data: bytes) -> Iterator[bytes]:
        return self._run(0, self._decoders[0].feed(data))

    def finish(self) -> Iterator[bytes]:
        return self._run(0, self._decoders[0].finish(), finishing=True)

    def _run(self, i: int, pieces: Iterator[bytes], finishing: bool = False) -> Iterator[bytes]:
        if i + 1 == len(self._decoders):
            yield from pieces
            return
        nxt = self._decoders[i + 1]
        for piece in pieces:
            yield from self._run(i + 1, nxt.feed(piece))
        if finishing:
            yield from self._run(i + 1, nxt.finish(), finishing=True)


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """An incremental decoder for a Content-Encoding value, or None when one coding in it is
    unknown. Codings listed in order of application are undone last first."""
    names = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    if not names:
        return _Identity()
    if any(n not in _DECODERS for n in names):
        return None
    decoders = [_DECODERS[n]() for n in reversed(names)]
    return decoders[0] if len(decoders) == 1 else _Chain(decoders)


def is_identity(content_encoding: str | None) -> bool:
    return all(c.strip().lower() in ("", "identity", "none") for c in (content_encoding or "").split(","))
