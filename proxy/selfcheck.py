"""``http(s)://keyless.check/``: a name only Keyless answers, so a client can prove its calls go
through Keyless (``keyless env --check``).

``.check`` is not a delegated top-level domain: a request that bypasses Keyless fails to
resolve instead of reaching anybody. Keyless answers it itself, in explicit-proxy mode, before
attestation and policy (it carries no credential and reaches no upstream), and audits it like
any other request. Over HTTPS the answer also proves the client trusts Keyless's CA, since
Keyless intercepts the tunnel with a certificate for keyless.check.
"""

from __future__ import annotations

import json
import re
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

HOST = "keyless.check"
_NONCE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_self_check(host: str, transparent: bool) -> bool:
    return not transparent and host.lower().rstrip(".") == HOST


def answer(decision_id: str, query: Mapping[str, str], version: str) -> tuple[int, dict[str, str], bytes]:
    """Keyless's reply: status, headers and a JSON body echoing a well-formed ``nonce``."""
    nonce = query.get("nonce", "")
    body = {"keyless": "ok", "version": version, "decision_id": decision_id,
            "nonce": nonce if _NONCE.fullmatch(nonce) else None}
    return 200, {"Content-Type": "application/json", "Cache-Control": "no-store"}, json.dumps(body).encode()


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    message: str


def check(scheme: str, environ: Mapping[str, str], timeout: float = 10.0) -> CheckResult:
    """Call ``scheme://keyless.check/`` the way an ordinary client would: proxy and CA bundle
    from ``environ`` (HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE), and verify Keyless's answer."""
    nonce = secrets.token_urlsafe(12)
    url = f"{scheme}://{HOST}/?nonce={nonce}"
    names = ("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((environ[n] for n in names if environ.get(n)), "")
    if not proxy:
        return CheckResult(False, f"{names[0]} is not set: this shell's clients do not use Keyless "
                                  "(run: eval \"$(keyless env)\")")
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY", "")
    if urllib.request.proxy_bypass_environment(HOST, {"no": no_proxy}):  # type: ignore[attr-defined]
        return CheckResult(False, "NO_PROXY matches every host (or keyless.check): clients bypass Keyless")
    cafile = environ.get("SSL_CERT_FILE") or None
    ctx = ssl.create_default_context(cafile=cafile)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({scheme: proxy}),
                                         urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(url, timeout=timeout) as r:
            status, header, raw = r.status, r.headers.get("Keyless-Decision-Id"), r.read(4096)
    except urllib.error.HTTPError as e:
        return CheckResult(False, f"{url} answered {e.code} through {proxy}: not Keyless's self-check")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        hint = ""
        if isinstance(reason, ssl.SSLCertVerificationError):
            hint = f" (SSL_CERT_FILE={cafile or 'unset'} does not hold Keyless's CA)"
        return CheckResult(False, f"{url} via {proxy}: {reason}{hint}")
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    if status != 200 or not isinstance(doc, dict) or doc.get("keyless") != "ok" or doc.get("nonce") != nonce \
            or not header or doc.get("decision_id") != header:
        return CheckResult(False, f"{url} via {proxy}: the answer is not Keyless's (status {status})")
    trust = f", CA trusted ({cafile})" if scheme == "https" else ""
    return CheckResult(True, f"{scheme}: through Keyless {doc.get('version')} at {proxy}{trust}, "
                             f"decision {header}")
