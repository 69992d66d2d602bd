"""``keyless env``: the environment that routes a shell's clients through Keyless.

What each runtime reads (docs/clients.md has the tested table):

- the proxy: ``HTTP_PROXY``/``HTTPS_PROXY`` and their lower-case forms (curl and wget read only
  the lower-case ``http_proxy``; Python, Go and most others read both). ``NODE_USE_ENV_PROXY=1``
  makes Node >= 24.5 and >= 22.21 honour them in fetch, http and https; older Node ignores all
  of them (and the variable): see docs/clients.md for what works there.
- the CA: one combined bundle, the system's roots plus Keyless's CA, written by Keyless. Every
  CA variable names it, so a host reached directly (a ``NO_PROXY`` entry) still verifies
  against the system roots, and a tool whose own CA setting replaces Node's list (npm's
  ``cafile``, which many hosts set in /etc/npmrc) still trusts Keyless's CA.
- ``NO_PROXY``: the user's entries are kept (from either spelling), ``--no-proxy`` adds more;
  it is never blanked.
"""

from __future__ import annotations

import os
import re
import shlex
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
# npm_config_cafile: npm hands its cafile to Node as the whole CA list (NODE_EXTRA_CA_CERTS is
# then ignored), which is how `npm install` failed with UNABLE_TO_VERIFY_LEAF_SIGNATURE.
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE",
           "GIT_SSL_CAINFO", "npm_config_cafile")
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
OTHER_VARS = ("NODE_USE_ENV_PROXY",)
ALL_VARS = PROXY_VARS + CA_VARS + NO_PROXY_VARS + OTHER_VARS
SHELLS = ("sh", "fish", "powershell")
BUNDLE_NAME = "client-ca-bundle.pem"

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.S)


def system_bundle() -> Path | None:
    """The system's CA bundle as OpenSSL was built to find it (not $SSL_CERT_FILE, which may be
    a bundle from an earlier ``keyless env``), else certifi's."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                      "/etc/ssl/cert.pem"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    try:
        import certifi
    except ImportError:
        return None
    return Path(certifi.where())


def write_bundle(dest: Path, keyless_ca: Path, system: Path | None) -> Path:
    """``dest`` := the system's certificates plus Keyless's CA (deduplicated), written atomically."""
    blocks: list[bytes] = []
    for source in (system, keyless_ca):
        if source is not None and source.resolve() != dest.resolve():
            blocks += [b for b in _PEM.findall(source.read_bytes()) if b not in blocks]
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(b"\n".join(blocks) + b"\n")
    os.chmod(tmp, 0o644)  # public certificates only
    os.replace(tmp, dest)
    return dest


def no_proxy(environ: Mapping[str, str], extra: Iterable[str] = ()) -> str:
    """The user's NO_PROXY and no_proxy entries, in order, deduplicated, plus ``extra``."""
    seen: list[str] = []
    for raw in (environ.get("NO_PROXY", ""), environ.get("no_proxy", ""), ",".join(extra)):
        for entry in raw.split(","):
            if entry.strip() and entry.strip() not in seen:
                seen.append(entry.strip())
    return ",".join(seen)


def client_env(proxy_url: str, bundle: Path, environ: Mapping[str, str],
               extra_no_proxy: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The (name, value) pairs to export; NO_PROXY only when there is something to keep."""
    pairs = [(name, proxy_url) for name in PROXY_VARS]
    bypass = no_proxy(environ, extra_no_proxy)
    if bypass:
        pairs += [(name, bypass) for name in NO_PROXY_VARS]
    pairs += [(name, str(bundle)) for name in CA_VARS]
    pairs.append(("NODE_USE_ENV_PROXY", "1"))
    return pairs


def render(pairs: list[tuple[str, str]], shell: str) -> str:
    """``export`` lines for ``shell`` (sh covers bash, zsh, dash, ksh)."""
    if shell == "fish":
        return "".join(f"set -gx {n} {_fish_quote(v)};\n" for n, v in pairs)
    if shell == "powershell":
        return "".join(f"$Env:{n} = {_ps_quote(v)}\n" for n, v in pairs)
    return "".join(f"export {n}={shlex.quote(v)}\n" for n, v in pairs)


def render_unset(names: Iterable[str], shell: str) -> str:
    names = list(names)
    if shell == "fish":
        return "".join(f"set -e {n};\n" for n in names)
    if shell == "powershell":
        return "".join(f"Remove-Item Env:{n} -ErrorAction SilentlyContinue\n" for n in names)
    return f"unset {' '.join(names)}\n"


def _fish_quote(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ps_quote(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"
