"""``oauth2``: access tokens from the client credentials grant (RFC 6749 section 4.4).

Keyless is the OAuth client. It authenticates to the token endpoint with
``client_secret_basic``, ``client_secret_post`` or ``private_key_jwt`` (RFC 7523: a client
assertion signed with Keyless's own signing key, so no client secret exists anywhere), asks for
the configured scopes, ``audience`` and ``resource`` (RFC 8707), and injects the token as a
bearer token. The decision's ``params`` may override ``scopes``, ``audience`` and ``resource``.
Tokens are cached per (scopes, audience, resource) in a ``TokenCache``.

``grant: refresh_token`` uses the refresh token grant (RFC 6749 section 6) instead: the first
refresh token comes from ``refresh_token_env``/``refresh_token_file``; an issuer that rotates
refresh tokens answers each refresh with a new one and rejects the old, so the new one is kept
(sealed in Redis with ``cache.redis``, where every replica finds it) and the fetch takes the
cross-replica lock exclusively: two replicas never spend the same refresh token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from proxy.confread import Section
from proxy.credentials import Runtime, header_template, render
from proxy.credentials.cache import CachePolicy, FetchError, Token, TokenCache
from proxy.credentials.http import endpoint_url, request_json
from proxy.credentials.static import SecretError, check_secret, env_missing
from proxy.errors import ConfigError, KeylessError
from proxy.model import Grant, GrantContext, OutboundRequest, fingerprint
from proxy.redact import header_forms
from proxy.shared.config import SecretSource
from proxy.shared.store import StoreDown
from proxy.shared.tokens import SharedTokens, shared_tokens

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
GRANTS = ("client_credentials", "refresh_token")
REFRESH_STATE = "refresh_token"  # noqa: S105 - the name of a sealed value, not a secret
OAuthKey = tuple[tuple[str, ...], str | None, str | None]
log = logging.getLogger("keyless.credentials")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How Keyless reaches and authenticates to a token endpoint (shared with token_exchange)."""

    token_url: str | None
    issuer: str | None
    client_id: str
    client_auth: str
    secret_env: str | None
    secret_file: Path | None
    ca_file: Path | None
    cache: CachePolicy


def parse_client(s: Section) -> ClientOptions:
    token_url = endpoint_url(s, "token_url")
    issuer = endpoint_url(s, "issuer")
    if not s.has("token_url") and not s.has("issuer"):
        s.error("is required (or set issuer for OIDC discovery)", "token_url")
    auth = s.choice("client_auth", AUTH_METHODS, "client_secret_basic")
    secret_env = s.text("client_secret_env", None)
    secret_file = s.path_value("client_secret_file", None)
    if auth == "private_key_jwt":
        for key in ("client_secret_env", "client_secret_file"):
            if s.has(key):
                s.error("not used with client_auth: private_key_jwt (Keyless signs with its own key)", key)
    elif (secret_env is None) == (secret_file is None):
        s.error(f"set exactly one of client_secret_env or client_secret_file for {auth}", "client_secret_env")
    cache = CachePolicy(
        timeout=s.number("timeout", 5.0, lo=0.1),
        retries=s.integer("retries", 2, lo=0, hi=10),
        backoff=s.number("backoff", 0.2, lo=0.0),
        refresh_at=s.number("refresh_at", 0.75, lo=0.1),
    )
    if cache.refresh_at >= 1:
        s.error("must be below 1 (a fraction of the token lifetime)", "refresh_at")
    return ClientOptions(
        token_url=token_url, issuer=issuer, client_id=s.text("client_id"), client_auth=auth,
        secret_env=secret_env, secret_file=secret_file, ca_file=s.path_value("ca_file", None), cache=cache,
    )


def scopes_value(value: Any) -> tuple[str, ...] | None:
    """Scopes as a list of strings or one space-separated string; None if malformed."""
    if isinstance(value, str):
        return tuple(sorted(set(value.split())))
    if isinstance(value, list | tuple) and all(isinstance(v, str) and v and " " not in v for v in value):
        return tuple(sorted(set(value)))
    return None


def param_scopes(ctx: GrantContext, default: tuple[str, ...], provider: str) -> tuple[str, ...]:
    """``params.scopes`` from the decision, else the configured scopes."""
    if "scopes" not in ctx.decision.params:
        return default
    parsed = scopes_value(ctx.decision.params["scopes"])
    if parsed is None:
        raise KeylessError("credential_unavailable", "params.scopes must be a list of strings", provider)
    return parsed


def add_targets(form: dict[str, str], scopes: tuple[str, ...], audience: str | None, resource: str | None) -> None:
    """The optional scope, audience and resource (RFC 8707) fields of a token request."""
    if scopes:
        form["scope"] = " ".join(scopes)
    if audience:
        form["audience"] = audience
    if resource:
        form["resource"] = resource


def param_text(ctx: GrantContext, name: str, default: str | None, provider: str) -> str | None:
    value = ctx.decision.params.get(name, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise KeylessError("credential_unavailable", f"params.{name} must be a non-empty string", provider)
    return value


class OAuthClient:
    """Discovery, client authentication and the token request, without any caching."""

    def __init__(self, name: str, label: str, options: ClientOptions, runtime: Runtime) -> None:
        self.label = label
        self.options = options
        self.runtime = runtime
        self._token_url = options.token_url
        if options.client_auth != "private_key_jwt":
            try:
                self._secret()
            except SecretError as e:
                raise ConfigError([f"credentials.{name}: client secret: {e}"]) from None

    def __repr__(self) -> str:
        return f"OAuthClient({self.label!r}, client_auth={self.options.client_auth!r})"

    def _secret(self) -> str:
        # Read at every fetch, not once: rotating the secret file needs no restart.
        o = self.options
        if o.secret_env is not None:
            raw = os.environ.get(o.secret_env)
            if raw is None:
                raise env_missing(o.secret_env)
            return check_secret(raw)
        if o.secret_file is None:
            raise RuntimeError("invariant broken: o.secret_file is None")
        try:
            return check_secret(o.secret_file.read_text())
        except OSError as e:
            raise SecretError(f"cannot read {o.secret_file} ({e.strerror})") from None

    @property
    def audience_default(self) -> str:
        """Who a token minted for this issuer is for: the issuer, else the token endpoint."""
        return self.options.issuer or self.options.token_url or ""

    async def token_url(self) -> str:
        if self._token_url is not None:
            return self._token_url
        issuer = self.options.issuer
        if issuer is None:
            raise RuntimeError("invariant broken: issuer is None")
        session = self.runtime.http.session(self.options.ca_file)
        doc = await request_json(session, "GET", issuer.rstrip("/") + "/.well-known/openid-configuration",
                                 what="OIDC discovery")
        url = doc.get("token_endpoint")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("https", "http") or (
                parts.scheme == "http" and urlsplit(issuer).scheme != "http"):
            raise FetchError("OIDC discovery has no usable token_endpoint", retryable=False)
        self._token_url = str(url)
        return self._token_url

    async def request_token(self, form: dict[str, str]) -> Token:
        """POST ``form`` to the token endpoint with client authentication; parse the answer."""
        doc, started = await self.request_document(form)
        return parse_token_response(doc, started)

    async def request_document(self, form: dict[str, str]) -> tuple[dict[str, Any], float]:
        """The token endpoint's JSON answer to ``form`` and when the request was sent."""
        o = self.options
        url = await self.token_url()
        data = dict(form)
        headers = {"Accept": "application/json"}
        try:
            if o.client_auth == "client_secret_basic":
                # RFC 6749 section 2.3.1: both parts are form-urlencoded before base64.
                pair = f"{quote(o.client_id, safe='')}:{quote(self._secret(), safe='')}"
                headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            elif o.client_auth == "client_secret_post":
                data["client_id"] = o.client_id
                data["client_secret"] = self._secret()
            else:
                assertion, _ = self.runtime.signer.mint(o.client_id, url, 60, issuer=o.client_id)
                data["client_id"] = o.client_id
                data["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                data["client_assertion"] = assertion
        except SecretError as e:
            raise FetchError(f"client secret: {e}", retryable=False) from None
        session = self.runtime.http.session(o.ca_file)
        started = time.time()
        doc = await request_json(session, "POST", url, data=data, headers=headers)
        return doc, started


def _chain(raw: str | None) -> tuple[str, str] | None:
    """A kept refresh token: (token, origin), from its sealed JSON."""
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("rt"), str) and isinstance(doc.get("origin"), str):
        return doc["rt"], doc["origin"]
    return None


def parse_token_response(doc: dict[str, Any], started: float) -> Token:
    token = doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise FetchError("token response has no access_token")
    try:
        check_secret(token)
    except SecretError:
        raise FetchError("token response has a malformed access_token", retryable=False) from None
    kind = doc.get("token_type", "Bearer")
    if not isinstance(kind, str) or kind.lower() not in ("bearer", "n_a"):
        raise FetchError(f"token response has unsupported token_type {str(kind)[:20]!r}", retryable=False)
    expires_in = doc.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        # RFC 6749 makes expires_in optional; without it Keyless assumes a short life rather
        # than risk serving a token the issuer has already expired.
        expires_in = 60
    # Measured from when the request was sent: the issuer's clock started before our answer came.
    return Token(token, started + float(expires_in), obtained_at=started)


@dataclass(frozen=True, slots=True)
class OAuth2Options:
    client: ClientOptions
    scopes: tuple[str, ...]
    audience: str | None
    resource: str | None
    header: str
    template: str
    grant: str = "client_credentials"
    refresh_token: SecretSource = SecretSource()


def parse(s: Section) -> OAuth2Options:
    header, template = header_template(s)
    scopes = s.str_list("scopes", ())
    grant = s.choice("grant", GRANTS, "client_credentials")
    refresh = SecretSource(s.text("refresh_token_env", None), s.path_value("refresh_token_file", None))
    if grant == "refresh_token" and (refresh.env is None) == (refresh.file is None):
        s.error("set exactly one of refresh_token_env or refresh_token_file for grant: refresh_token",
                "refresh_token_env")
    elif grant != "refresh_token" and refresh.configured:
        s.error("is used with grant: refresh_token only", "refresh_token_env" if refresh.env else "refresh_token_file")
    return OAuth2Options(parse_client(s), tuple(sorted(set(scopes))), s.text("audience", None),
                         s.text("resource", None), header, template, grant, refresh)


class OAuth2Credential:
    type = "oauth2"

    def __init__(self, name: str, options: OAuth2Options, runtime: Runtime) -> None:
        self.name = name
        self.options = options
        self.label = f"oauth2({name})"
        self.client = OAuthClient(name, self.label, options.client, runtime)
        self.refreshing = options.grant == "refresh_token"
        self.shared: SharedTokens[OAuthKey] | None = shared_tokens(runtime, self.label, options,
                                                                 exclusive=self.refreshing)
        self.cache: TokenCache[OAuthKey] = TokenCache(self.label, self._fetch, options.client.cache, shared=self.shared)
        # The newest refresh token this replica knows, with the origin of its rotation chain
        # (a digest of the configured token it descends from), and the configured token last
        # read: a changed secret is a new token the operator issued, and it wins.
        self._refresh: tuple[str, str] | None = None
        self._configured: str | None = None
        if self.refreshing:
            try:
                self._configured = options.refresh_token.read()
            except SecretError as e:
                raise ConfigError([f"credentials.{name}: refresh token: {e}"]) from None

    def __repr__(self) -> str:
        return f"OAuth2Credential(name={self.name!r})"

    async def _fetch(self, key: OAuthKey) -> Token:
        scopes, audience, resource = key
        if self.refreshing:
            return await self._refresh_grant(key)
        form = {"grant_type": "client_credentials"}
        add_targets(form, scopes, audience, resource)
        return await self.client.request_token(form)

    async def _current_refresh_token(self) -> tuple[str, str]:
        """(the refresh token to spend, the origin of its chain)."""
        try:
            configured = self.options.refresh_token.read()
        except SecretError as e:
            raise FetchError(f"refresh token: {e}", retryable=False) from None
        origin = hashlib.sha256(configured.encode()).hexdigest()[:32]
        changed = configured != self._configured
        self._configured = configured
        kept: tuple[str, str] | None = None
        if self.shared is not None:
            try:
                kept = _chain(await self.shared.get_state(REFRESH_STATE))
            except StoreDown:
                kept = None  # Redis is down: our own newest one is the best there is
        if kept is not None and kept[1] == origin:
            return kept[0], origin          # the fleet's newest token of this chain
        if changed:
            return configured, origin       # the operator issued a new one: start a new chain
        if kept is not None:
            return kept                     # another replica already started from a newer one
        if self._refresh is not None and self._refresh[1] == origin:
            return self._refresh
        return configured, origin

    async def _refresh_grant(self, key: OAuthKey) -> Token:
        # Runs under the cross-replica lock (exclusive): no other replica spends this token now.
        scopes, audience, resource = key
        current, origin = await self._current_refresh_token()
        form = {"grant_type": "refresh_token", "refresh_token": current}
        add_targets(form, scopes, audience, resource)
        doc, started = await self.client.request_document(form)
        token = parse_token_response(doc, started)
        rotated = doc.get("refresh_token")
        if rotated is not None:
            try:
                rotated = check_secret(rotated) if isinstance(rotated, str) else None
            except SecretError:
                rotated = None
            if rotated is None:
                raise FetchError("token response has a malformed refresh_token", retryable=False)
            self._refresh = (rotated, origin)
            if self.shared is not None:
                try:
                    await self.shared.put_state(REFRESH_STATE, json.dumps({"rt": rotated, "origin": origin}))
                except StoreDown:
                    log.warning("%s: the rotated refresh token could not be stored in Redis; "
                                "only this replica holds it", self.label)
        return token

    def key_for(self, ctx: GrantContext) -> OAuthKey:
        o = self.options
        return (param_scopes(ctx, o.scopes, self.label), param_text(ctx, "audience", o.audience, self.label),
                param_text(ctx, "resource", o.resource, self.label))

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        token = await self.cache.get(self.key_for(ctx))
        header = request.headers[self.options.header] = render(self.options.template, token.value)
        return Grant(self.name, self.type, token.expires_at, fingerprint(token.value),
                     header_forms(header, token.value))
