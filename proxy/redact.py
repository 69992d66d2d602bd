"""Remove an injected credential that an upstream echoes back, before the app sees it.

An upstream that reflects request headers (httpbin's ``/anything``, a TRACE, a debug error page)
would hand the app the very credential Keyless exists to keep from it. Each credential provider
records the strings it put on the wire (``Grant.secret_forms``: the whole header value, the bare
token, a Basic pair and its password, SigV4's signature and session token); this module turns
them into byte patterns and replaces every occurrence in response headers and text bodies with
``MARKER``.

Pure functions and small classes over bytes: no mitmproxy, no I/O. ``proxy.reflect`` decides
which bodies are scanned and how; ``proxy.addon`` wires both into mitmproxy's hooks.
"""

from __future__ import annotations

import base64
import binascii
import functools
import html
import json
import re
from collections.abc import Iterable, Iterator
from urllib.parse import quote, quote_plus

MARKER = b"[keyless:redacted]"
# Shorter forms are never scanned for: an 8-byte-or-shorter string (a username, a short
# password half) occurs by chance in ordinary bodies and replacing it would mangle them. Every
# credential Keyless mints is far longer; a static secret this short is reported by its whole
# header value (``Bearer abc`` is long enough) but not as a bare token.
MIN_FORM_BYTES = 8


def header_forms(value: str, secret: str) -> tuple[str, ...]:
    """The secret forms of one injected header: the whole value, the bare secret, and for a
    Basic credential the decoded ``user:pass`` pair and its password (Keyless injects the
    base64; a debug page may show it decoded). A secret that is itself a ``user:pass`` pair is
    also looked for base64-encoded."""
    forms = [value, secret]
    scheme, _, cred = value.partition(" ")
    if scheme.lower() == "basic" and cred:
        try:
            pair = base64.b64decode(cred.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            pair = ""
        if ":" in pair:
            forms += [pair, pair.partition(":")[2]]
    if ":" in secret:
        forms.append(base64.b64encode(secret.encode()).decode())
    return tuple(dict.fromkeys(f for f in forms if f))


def patterns(forms: Iterable[str]) -> tuple[bytes, ...]:
    """Every byte string to look for, longest first.

    Besides each form as sent, the spellings an echo commonly re-encodes it into: JSON string
    escaping (also with ``\\/``), percent-encoding (a form or query echo) and HTML escaping
    (an error page). Forms shorter than ``MIN_FORM_BYTES`` are left out.
    """
    found: set[bytes] = set()
    for form in forms:
        escaped = json.dumps(form)[1:-1]
        for variant in (form, escaped, escaped.replace("/", "\\/"), json.dumps(form, ensure_ascii=False)[1:-1],
                        quote(form, safe=""), quote_plus(form, safe=""), html.escape(form)):
            data = variant.encode("utf-8", "surrogateescape")
            if len(data) >= MIN_FORM_BYTES:
                found.add(data)
    # Longest first: at any position the whole header value wins over the token inside it.
    return tuple(sorted(found, key=lambda p: (-len(p), p)))


class Redactor:
    """Finds and replaces a fixed set of patterns; built once per response."""

    __slots__ = ("_patterns", "_regex", "longest")

    def __init__(self, pats: tuple[bytes, ...]) -> None:
        self._patterns = pats
        self._regex = re.compile(b"|".join(re.escape(p) for p in pats)) if pats else None
        self.longest = len(pats[0]) if pats else 0

    def __repr__(self) -> str:
        # Never the patterns: they are the credential.
        return f"Redactor(patterns={len(self._patterns)})"

    @classmethod
    def for_forms(cls, forms: tuple[str, ...]) -> Redactor:
        # Built once per credential value, not per response: the same token serves many
        # requests. The cache holds what the providers' token caches hold anyway.
        return _redactor(forms)

    def __bool__(self) -> bool:
        return self._regex is not None

    def hit(self, data: bytes) -> bool:
        # Plain substring tests first: bytes ``in`` runs at memory speed, the regex does not,
        # and almost every response contains no pattern at all.
        return any(p in data for p in self._patterns)

    def redact(self, data: bytes) -> tuple[bytes, bool]:
        """``data`` with every pattern replaced by MARKER, and whether anything was."""
        if self._regex is None or not self.hit(data):
            return data, False
        # Longest first, each with bytes.replace (far faster than the regex alternation): a
        # shorter form inside a longer one is gone by the time its turn comes.
        for p in self._patterns:
            if p in data:
                data = data.replace(p, MARKER)
        return data, True

    def split(self, data: bytes, hold: int) -> tuple[bytes, bytes, bool]:
        """Redact ``data`` except for its last ``hold`` bytes, which may begin a pattern that
        the next chunk completes: return (redacted output, unredacted tail, whether replaced).

        A match that starts before the cut is replaced whole, even when it runs into the tail."""
        cut = max(len(data) - hold, 0)
        if self._regex is None or not self.hit(data):
            return data[:cut], data[cut:], False
        out, pos, hit = bytearray(), 0, False
        for m in self._regex.finditer(data):
            if m.start() >= cut:
                break
            out += data[pos:m.start()]
            out += MARKER
            pos, hit = m.end(), True
        if pos >= cut:
            return bytes(out), data[pos:], hit
        out += data[pos:cut]
        return bytes(out), data[cut:], hit


@functools.lru_cache(maxsize=1024)
def _redactor(forms: tuple[str, ...]) -> Redactor:
    return Redactor(patterns(forms))


def redact_headers(fields: Iterable[tuple[bytes, bytes]], redactor: Redactor,
                   ) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """Header fields with every pattern replaced, and the (lower-case) names where one was.

    A pattern in a header *name* drops the field: MARKER is no valid name. The reported name
    then has the pattern replaced, so the audit record never carries it either."""
    fields = list(fields)
    # One pass over all of them first: the usual answer is "nothing here". Every match in a
    # field is a match in the joined block; one spanning two fields only costs the pass below.
    if not redactor.hit(b"\0".join(b"\0".join(f) for f in fields)):
        return fields, []
    out: list[tuple[bytes, bytes]] = []
    names: list[str] = []
    for name, value in fields:
        new_name, in_name = redactor.redact(name)
        new_value, in_value = redactor.redact(value)
        if in_name or in_value:
            names.append(new_name.decode("latin-1").lower())
        if not in_name:
            out.append((name, new_value))
    return out, list(dict.fromkeys(names))


class StreamRedactor:
    """Redacts a body that arrives in chunks, keeping ``longest - 1`` bytes of overlap so a
    pattern split across a chunk boundary is still found. Memory: one chunk plus the overlap."""

    __slots__ = ("_redactor", "_hold", "_tail", "reflected")

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._hold = max(redactor.longest - 1, 0)
        self._tail = b""
        self.reflected = False

    def feed(self, chunk: bytes) -> bytes:
        out, self._tail, hit = self._redactor.split(self._tail + chunk, self._hold)
        self.reflected |= hit
        return out

    def finish(self) -> bytes:
        out, hit = self._redactor.redact(self._tail)
        self._tail = b""
        self.reflected |= hit
        return out

    def run(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Every chunk through ``feed``, then ``finish``: for tests and benchmarks."""
        for chunk in chunks:
            yield self.feed(chunk)
        yield self.finish()
