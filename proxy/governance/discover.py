"""Static-secret discovery: what credentials an app still sends, found before Keyless strips them.

``Discovery.inspect`` runs in ``Pipeline.forward`` right before ``strip_credentials``, on the
request as the app sent it. It looks at

- every header value (the credential headers of ``strip.headers`` are findings by name alone,
  whatever the value looks like; ``Proxy-Authorization`` and the identity headers are addressed
  to Keyless and skipped),
- every query parameter and cookie (value through the detectors, name and value through
  detect-secrets' keyword detector),
- a JSON or form body, only when it is buffered anyway: bodies stream after the decision, so
  discovery asks for a body (``wants_body``, consulted by ``Pipeline.needs_body``) only when it
  declares a Content-Length of at most ``discovery.max_body`` and a JSON or form content type.
  A chunked or larger body, or any other content type, is not inspected.

The detectors are Yelp's detect-secrets plugins, called in memory (``analyze_string``); which
ones, and why the entropy detectors are off by default, is in ``proxy.governance.options``.
Each finding carries a keyed fingerprint (``proxy.model.fingerprint``), never the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from proxy.config import IDENTITY_HEADERS, StripConfig
from proxy.governance.finding import Finding
from proxy.governance.options import EXCLUDED_BY_DEFAULT, JSON_TYPES, DiscoveryConfig
from proxy.model import OutboundRequest, fingerprint

STRIP_LIST = "strip_list"
KEYWORD = "KeywordDetector"
# No detect-secrets pattern matches fewer characters than this (BasicAuth's ``://a:b@`` aside,
# which is 7): shorter values skip the regex pass, the common case for most headers.
_MIN_VALUE = 8
# Header names, parameter names and JSON paths are the app's: bounded in the record.
_MAX_NAME = 100
# The memo of scan results: lists of values up to this many characters, this many lists at most
# (then emptied): a few MiB at worst.
_MEMO_CHARS = 2048
_MEMO_ENTRIES = 1024
_MAX_FINDINGS = 32
# ``Bearer x``, ``token x``, ``Basic x``: the scheme is not part of the secret.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*\s+(?=\S)")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_NOT_INSPECTED = frozenset(IDENTITY_HEADERS)
# Header values the protocol defines (no app puts a key there): not worth a detector pass each.
_PROTOCOL_HEADERS = frozenset({"host", "content-length", "content-type", "connection", "accept", "accept-encoding",
                               "accept-language", "te", "transfer-encoding", "upgrade", "expect", "keep-alive"})


@lru_cache(maxsize=1)
def plugin_classes() -> dict[str, type[Any]]:
    """Every detect-secrets plugin class by its class name (the ``detector`` of a finding)."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    classes: list[type[Any]] = list(get_mapping_from_secret_type_to_class().values())
    return {cls.__name__: cls for cls in classes}


class Discovery:
    """The detectors chosen by ``discovery`` config, and the strip list they report against."""

    def __init__(self, config: DiscoveryConfig, strip: StripConfig) -> None:
        from detect_secrets.filters import heuristic

        self.config = config
        self.strip = strip
        self._strip_headers = frozenset(strip.headers) - _NOT_INSPECTED
        self._strip_params = frozenset(strip.query_params)
        classes = plugin_classes()
        names = config.detectors or tuple(n for n in sorted(classes) if n not in EXCLUDED_BY_DEFAULT)
        self._plugins = [(n, classes[n]()) for n in names if n != KEYWORD]
        # Each regex plugin's patterns, flattened once (see _matches for why not analyze_string).
        from detect_secrets.plugins.base import RegexBasedDetector

        self._patterns = [(n, rx) for n, p in self._plugins if isinstance(p, RegexBasedDetector) for rx in p.denylist]
        self._others = [(n, p) for n, p in self._plugins if not isinstance(p, RegexBasedDetector)]
        from detect_secrets.plugins.keyword import DENYLIST

        # The keyword detector's own word list (lower case), as a cheap test of the name before its
        # regexes run; matched against the lower-cased name (IGNORECASE costs ~9x here).
        self._secret_name = re.compile("|".join(DENYLIST))
        self._keyword = classes[KEYWORD]() if config.keywords or KEYWORD in config.detectors else None
        self._h = heuristic
        # Lists of values scanned, and what the scan found (see _scan): bounded.
        self._memo: dict[tuple[str, ...], list[tuple[str, str]]] = {}

    # --- the request path ------------------------------------------------------------------------

    def wants_body(self, headers: Sequence[tuple[str, str]]) -> bool:
        """Whether the body is small and structured enough to buffer for inspection."""
        if self.config.max_body <= 0:
            return False
        length: int | None = None
        ctype = ""
        for name, value in headers:
            n = name.lower()
            if n == "content-length":
                length = int(value) if value.strip().isdigit() else None
            elif n == "content-type":
                ctype = value.split(";", 1)[0].strip().lower()
            elif n == "content-encoding" and value.strip().lower() not in ("", "identity"):
                return False  # never inflated for inspection (see _content): not worth buffering
        return length is not None and 0 < length <= self.config.max_body and _structured(ctype)

    def inspect(self, request: OutboundRequest, body: bool = False) -> tuple[Finding, ...]:
        """The static secrets in ``request``, as it stands before strip. ``body``: the request's
        content is buffered (``wants_body`` said so) and may be read."""
        # Every value the app sent, with where it was and whether strip removes it; name/value
        # pairs (query, cookie, body) also go to the keyword detector.
        values: list[tuple[str, str, bool]] = []
        pairs: list[tuple[str, str, str, bool]] = []
        named: list[tuple[str, str]] = []  # strip-list headers and parameters: findings by name
        ctype = ""
        encoded = False
        for name, v in _header_fields(request.headers):
            n = name.lower()
            if n in _NOT_INSPECTED:
                continue
            if n == "content-encoding" and v.strip().lower() not in ("", "identity"):
                encoded = True
            if n == "cookie":
                for k, cv in _cookies(v):
                    pairs.append((f"cookie:{k[:_MAX_NAME]}", k, cv, self.strip.cookies))
                continue
            if n == "content-type" and not ctype:
                ctype = v.split(";", 1)[0].strip().lower()
            if n in _PROTOCOL_HEADERS:
                continue
            where = "header:" + n[:_MAX_NAME]
            stripped = n in self._strip_headers
            values.append((where, v, stripped))
            if stripped and v.strip():
                named.append((where, _SCHEME.sub("", v.strip())))
        path = request.path
        if "?" in path:
            for k, v in parse_qsl(path.split("?", 1)[1].split("#", 1)[0], keep_blank_values=True):
                where = f"query:{k[:_MAX_NAME]}"
                gone = k.lower() in self._strip_params
                pairs.append((where, k, v, gone))
                if gone and v:
                    named.append((where, v))
        if body and self.config.max_body > 0 and _structured(ctype):
            content = _content(request, encoded)
            if content is not None and len(content) <= self.config.max_body:
                pairs += [(f"body:{k[:_MAX_NAME]}", k, v, False) for k, v in _body_fields(content, ctype)]
        values += [(where, v, gone) for where, _, v, gone in pairs]

        found: dict[tuple[str, str], Finding] = {}

        def add(location: str, detector: str, secret: str, stripped: bool) -> None:
            fp = fingerprint(secret)
            if (location, fp) not in found and len(found) < _MAX_FINDINGS:
                found[(location, fp)] = Finding(location, detector, fp, stripped)

        hit: set[str] = set()
        # Each distinct value once: JSON arrays repeat their enum strings.
        distinct = list(dict.fromkeys(v for _, v, _ in values if len(v) >= _MIN_VALUE))
        for detector, secret in self._scan(distinct):
            for where, v, stripped in values:
                if secret in v:
                    add(where, detector, secret, stripped)
                    hit.add(where)
        for where, k, v, gone in pairs:
            if where not in hit:
                for detector, secret in self._keywords(k, v):
                    add(where, detector, secret, gone)
                    hit.add(where)
        for where, v in named:
            if where not in hit:
                add(where, STRIP_LIST, v, True)
        return tuple(found.values())

    # --- the parts -------------------------------------------------------------------------------

    def _scan(self, values: Sequence[str]) -> list[tuple[str, str]]:
        """Every detector's matches in ``values``. A client sends the same header values on
        request after request (a fixed user-agent, accept, content-type): a list of values seen
        before gets the answer it got then (``_memo``: the scan is a pure function of the list).
        Not per value: some patterns anchor on the start or end of the joined text."""
        key = tuple(values)
        found = self._memo.get(key)
        if found is None:
            found = list(self._scan_all(values))
            if sum(map(len, values)) <= _MEMO_CHARS:
                if len(self._memo) >= _MEMO_ENTRIES:
                    self._memo.clear()
                self._memo[key] = found
        return found

    def _scan_all(self, values: Sequence[str]) -> Iterator[tuple[str, str]]:
        """Every detector over all values at once, joined by newlines: one pass per pattern
        instead of one per pattern and value (a JSON body has hundreds). No detect-secrets
        pattern matches across a newline, so a match lies within one value; the caller finds
        which by containment, and drops a match that lies in none."""
        if not values:
            return
        text = "\n".join(values)
        h = self._h
        found = [(name, _secret(m)) for name, rx in self._patterns for m in rx.finditer(text)]
        found += [(name, secret) for name, plugin in self._others for secret in _other(plugin, values)]
        for name, secret in found:
            if secret and not h.is_sequential_string(secret) and not h.is_templated_secret(secret):
                yield name, secret

    def _keywords(self, name: str, value: str) -> Iterator[tuple[str, str]]:
        """detect-secrets' keyword detector on ``name = "value"`` (the shape it reads), through
        its own false-positive filters (ids, UUIDs, templates, sequences, no letters)."""
        kw = self._keyword
        if kw is None or not value or '"' in value or "\n" in value or not self._secret_name.search(name.lower()):
            return
        h = self._h
        line = f'{name} = "{value}"'
        for secret in kw.analyze_string(line):
            if (not secret or h.is_templated_secret(secret) or h.is_prefixed_with_dollar_sign(secret)
                    or h.is_sequential_string(secret) or h.is_potential_uuid(secret)
                    or h.is_likely_id_string(secret, line, kw) or h.is_not_alphanumeric_string(secret)):
                continue
            yield KEYWORD, secret


def _secret(m: re.Match[str]) -> str:
    """The secret in a detect-secrets pattern's match, to be fingerprinted.

    Not ``RegexBasedDetector.analyze_string``: it yields a pattern's capture groups, and in
    detect-secrets 1.5 GitHub's and GitLab's groups capture the token's prefix alone (``ghp``),
    so every GitHub token would share one fingerprint. A captured group counts only when it is
    secret-sized (8 characters or more, e.g. the password of BasicAuth, the value of an
    assignment); otherwise the whole match is the secret.
    """
    groups = [g for g in m.groups() if g]
    best = max(groups, key=len) if groups else ""
    return best if len(best) >= _MIN_VALUE else m.group(0)


def _other(plugin: Any, values: Sequence[str]) -> Iterator[str]:
    from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin

    if isinstance(plugin, HighEntropyStringsPlugin):
        # It reads quoted strings only, and leaves the entropy limit to analyze_line.
        quoted = "\n".join(f'"{v}"' for v in values if '"' not in v)
        for secret in plugin.analyze_string(quoted):
            if plugin.calculate_shannon_entropy(secret) > plugin.entropy_limit:
                yield secret
    else:
        yield from plugin.analyze_string("\n".join(values))


def _header_fields(headers: Any) -> list[tuple[str, str]]:
    """Every header field in order, repeated names included. mitmproxy's Headers keep the raw
    fields (one pass; its ``get_all`` per name rescans them all); a plain mapping has items."""
    fields = getattr(headers, "fields", None)
    if fields is None:
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for k, v in fields]


def _structured(ctype: str) -> bool:
    return ctype in JSON_TYPES or (ctype.startswith("application/") and ctype.endswith("+json"))


def _content(request: OutboundRequest, encoded: bool) -> bytes | None:
    """A buffered mitmproxy request's body as sent. A Content-Encoding body is not inspected:
    decoding it (``Request.content``) could inflate a small gzip far past ``max_body``."""
    if encoded:
        return None
    content = getattr(request, "raw_content", None)
    return content if isinstance(content, bytes) else None


def _cookies(header: str) -> list[tuple[str, str]]:
    out = []
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            out.append((name, value.strip().strip('"')))
    return out


def _body_fields(content: bytes, ctype: str) -> list[tuple[str, str]]:
    """A JSON body's string leaves as (``$.a.b[0]``, value); a form body's fields as (``$.name``, value)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return []
    if ctype == "application/x-www-form-urlencoded":
        return [(_member("$", k), v) for k, v in parse_qsl(text, keep_blank_values=True)]
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return []
    out: list[tuple[str, str]] = []
    _walk(doc, "$", out, 0)
    return out


def _walk(node: Any, path: str, out: list[tuple[str, str]], depth: int) -> None:
    if depth > 32 or len(out) > 1000:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            _walk(v, _member(path, str(k)), out, depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, f"{path}[{i}]", out, depth + 1)
    elif isinstance(node, str):
        out.append((path, node))


def _member(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENT.match(key) else f"{path}[{json.dumps(key)}]"


def scrub_query(doc: dict[str, Any], findings: Sequence[Finding]) -> dict[str, Any]:
    """The policy input without the query parameters a finding names (the audit keeps ``doc``
    when ``audit.mask`` does not erase the query): only the dicts on that path are copied."""
    names = {f.location[len("query:"):] for f in findings if f.kind == "query"}
    request = doc.get("request")
    if not names or not isinstance(request, dict) or not isinstance(request.get("query"), dict):
        return doc
    # A finding's location keeps the first _MAX_NAME characters of the name: compare those, so a
    # longer name cannot keep its value (two names sharing that prefix are both scrubbed).
    query = {k: v for k, v in request["query"].items() if k[:_MAX_NAME] not in names}
    return {**doc, "request": {**request, "query": query}}
