"""``github_app``: GitHub App installation tokens, scoped per request by the decision.

Keyless signs the App JWT (RS256, ``iss`` = App id, nine minutes) with the App's private key and
asks ``POST {base_url}/app/installations/{id}/access_tokens`` for a token limited to the
``repositories`` and ``permissions`` in the decision's ``params`` (or the config defaults).
Tokens are cached per (installation, repositories, permissions) until near their expiry. For
GitHub Enterprise Server set ``base_url`` to ``https://HOST/api/v3``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.confread import Section
from proxy.credentials import Runtime, header_template, render
from proxy.credentials.cache import CachePolicy, FetchError, Token, TokenCache
from proxy.credentials.http import endpoint_url, request_json
from proxy.credentials.static import SecretError, check_secret
from proxy.errors import ConfigError, KeylessError
from proxy.model import Grant, GrantContext, OutboundRequest, fingerprint
from proxy.redact import header_forms
from proxy.shared.tokens import shared_tokens

PERMISSION_LEVELS = ("read", "write", "admin")
Key = tuple[int, tuple[str, ...], tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class GitHubAppOptions:
    app_id: str
    private_key_file: Path
    installation_id: int | None
    base_url: str
    repositories: tuple[str, ...]
    permissions: MappingProxyType[str, str]
    ca_file: Path | None
    header: str
    template: str
    cache: CachePolicy


def parse(s: Section) -> GitHubAppOptions:
    header, template = header_template(s)
    perms = s.raw.get("permissions") or {}
    s.has("permissions")
    if not isinstance(perms, dict) or not all(isinstance(v, str) and v in PERMISSION_LEVELS for v in perms.values()):
        s.error("must map permission names to read, write or admin", "permissions")
        perms = {}
    app_id = s.raw.get("app_id")
    s.has("app_id")
    if not isinstance(app_id, int | str) or isinstance(app_id, bool) or not str(app_id):
        s.error("is required (the GitHub App id or client id)", "app_id")
        app_id = ""
    return GitHubAppOptions(
        app_id=str(app_id), private_key_file=s.path_value("private_key_file"),
        installation_id=s.integer("installation_id", None, lo=1, hi=2**53),
        base_url=(endpoint_url(s, "base_url", "https://api.github.com") or "").rstrip("/"),
        repositories=tuple(sorted(set(s.str_list("repositories", ())))),
        permissions=MappingProxyType(dict(perms)), ca_file=s.path_value("ca_file", None),
        header=header, template=template,
        cache=CachePolicy(timeout=s.number("timeout", 10.0, lo=0.1), retries=s.integer("retries", 2, lo=0, hi=10),
                          refresh_at=0.75, min_remaining=60.0),
    )


class GitHubAppCredential:
    type = "github_app"

    def __init__(self, name: str, options: GitHubAppOptions, runtime: Runtime) -> None:
        self.name = name
        self.options = options
        self.label = f"github_app({name})"
        self.runtime = runtime
        try:
            key = serialization.load_pem_private_key(options.private_key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            why = getattr(e, "strerror", None) or type(e).__name__
            raise ConfigError([f"credentials.{name}.private_key_file: cannot load the App's RSA key ({why})"]) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError([f"credentials.{name}.private_key_file: GitHub Apps use RSA keys"])
        self._key = key
        self.cache: TokenCache[Key] = TokenCache(self.label, self._fetch, options.cache,
                                                 shared=shared_tokens(runtime, self.label, options))

    def __repr__(self) -> str:
        return f"GitHubAppCredential(name={self.name!r}, app_id={self.options.app_id!r})"

    def app_jwt(self) -> str:
        now = int(time.time())
        # GitHub allows at most ten minutes; iat is backdated for clock drift, as GitHub advises.
        claims = {"iat": now - 60, "exp": now + 540, "iss": self.options.app_id}
        return jwt.encode(claims, self._key, algorithm="RS256")

    async def _fetch(self, key: Key) -> Token:
        installation, repos, perms = key
        body: dict[str, Any] = {}
        if repos:
            body["repositories"] = list(repos)
        if perms:
            body["permissions"] = dict(perms)
        started = time.time()
        doc = await request_json(
            self.runtime.http.session(self.options.ca_file), "POST",
            f"{self.options.base_url}/app/installations/{installation}/access_tokens",
            what="GitHub installation token endpoint", ok=(201, 200), json=body,
            headers={"Authorization": f"Bearer {self.app_jwt()}", "Accept": "application/vnd.github+json",
                     "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "keyless"})
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise FetchError("GitHub answer has no token")
        try:
            check_secret(token)
            expires = datetime.fromisoformat(str(doc.get("expires_at")).replace("Z", "+00:00")).timestamp()
        except (SecretError, ValueError):
            raise FetchError("GitHub answer has a malformed token or expires_at") from None
        return Token(token, expires, obtained_at=started)

    def key_for(self, ctx: GrantContext) -> Key:
        o, params = self.options, ctx.decision.params
        installation = params.get("installation_id", o.installation_id)
        if not isinstance(installation, int) or isinstance(installation, bool) or installation <= 0:
            raise KeylessError("credential_unavailable", "no installation_id in config or params", self.label)
        repos = params.get("repositories", list(o.repositories))
        if not isinstance(repos, list) or not all(isinstance(r, str) and r and "/" not in r for r in repos):
            raise KeylessError("credential_unavailable", "params.repositories must be a list of repository names",
                               self.label)
        perms = params.get("permissions", dict(o.permissions))
        if not isinstance(perms, dict) or not all(
                isinstance(k, str) and v in PERMISSION_LEVELS for k, v in perms.items()):
            raise KeylessError("credential_unavailable", "params.permissions must map names to read/write/admin",
                               self.label)
        return installation, tuple(sorted(set(repos))), tuple(sorted(perms.items()))

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        token = await self.cache.get(self.key_for(ctx))
        header = request.headers[self.options.header] = render(self.options.template, token.value)
        return Grant(self.name, self.type, token.expires_at, fingerprint(token.value),
                     header_forms(header, token.value))
