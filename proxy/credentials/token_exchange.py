"""``token_exchange``: OAuth 2.0 Token Exchange (RFC 8693) for the calling workload.

The subject token is the caller's own verified workload JWT (from a ``jwt`` trust provider) or,
when the caller has none, a short-lived JWT that Keyless mints for the caller's attested identity
(``sub`` = the workload id, ``aud`` = the issuer or ``subject_audience``), verifiable with
Keyless's ``/jwks.json``; ``subject`` (auto, caller, minted) chooses. With ``actor_token: true``
Keyless also presents a JWT for itself as the actor. The exchanged token is cached per
(identity, caller's token, audience, resource, scopes, token type): a token obtained for one
workload is never served to another.

Keyless authenticates to the token endpoint like the ``oauth2`` provider does (same keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.confread import Section
from proxy.credentials import Runtime, header_template, render
from proxy.credentials.cache import Token, TokenCache
from proxy.credentials.oauth2 import (
    ClientOptions,
    OAuthClient,
    add_targets,
    param_scopes,
    param_text,
    parse_client,
)
from proxy.errors import KeylessError
from proxy.model import Grant, GrantContext, OutboundRequest, fingerprint
from proxy.redact import header_forms
from proxy.shared.tokens import shared_tokens

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a type URI

# (identity, caller's token or None, audience, resource, scopes, requested token type)
Key = tuple[str, str | None, str | None, str | None, tuple[str, ...], str]


@dataclass(frozen=True, slots=True)
class TokenExchangeOptions:
    client: ClientOptions
    audience: str | None
    resource: str | None
    scopes: tuple[str, ...]
    requested_token_type: str
    subject_audience: str | None
    subject_ttl: int
    actor_token: bool
    subject: str
    header: str
    template: str


def parse(s: Section) -> TokenExchangeOptions:
    header, template = header_template(s)
    return TokenExchangeOptions(
        client=parse_client(s),
        audience=s.text("audience", None),
        resource=s.text("resource", None),
        scopes=tuple(sorted(set(s.str_list("scopes", ())))),
        requested_token_type=s.text("requested_token_type", ACCESS_TOKEN_TYPE),
        subject_audience=s.text("subject_audience", None),
        subject_ttl=s.integer("subject_ttl", 60, lo=10, hi=600),
        actor_token=s.flag("actor_token", False),
        subject=s.choice("subject", ("auto", "caller", "minted"), "auto"),
        header=header,
        template=template,
    )


class TokenExchangeCredential:
    type = "token_exchange"

    def __init__(self, name: str, options: TokenExchangeOptions, runtime: Runtime) -> None:
        self.name = name
        self.options = options
        self.label = f"token_exchange({name})"
        self.signer = runtime.signer
        self.client = OAuthClient(name, self.label, options.client, runtime)
        self.cache: TokenCache[Key] = TokenCache(self.label, self._fetch, options.client.cache, shared=shared_tokens(
            runtime, self.label, options, identity_of=lambda k: k[0]))

    def __repr__(self) -> str:
        return f"TokenExchangeCredential(name={self.name!r})"

    async def _fetch(self, key: Key) -> Token:
        subject, caller_token, audience, resource, scopes, token_type = key
        o = self.options
        subject_aud = o.subject_audience or self.client.audience_default
        subject_token = caller_token or self.signer.mint(subject, subject_aud, o.subject_ttl)[0]
        form = {
            "grant_type": GRANT,
            "subject_token": subject_token,
            "subject_token_type": JWT_TYPE,
            "requested_token_type": token_type,
        }
        if o.actor_token:
            form["actor_token"], _ = self.signer.mint(self.signer.issuer, subject_aud, o.subject_ttl)
            form["actor_token_type"] = JWT_TYPE
        add_targets(form, scopes, audience, resource)
        return await self.client.request_token(form)

    def key_for(self, ctx: GrantContext) -> Key:
        subject = ctx.identity.id
        if subject is None:
            raise KeylessError("credential_unavailable", "no attested workload identity to exchange", self.label)
        o = self.options
        scopes = param_scopes(ctx, o.scopes, self.label)
        token_type = param_text(ctx, "requested_token_type", o.requested_token_type, self.label)
        if token_type is None:
            raise RuntimeError("invariant broken: token_type is None")
        caller_token = None
        if o.subject != "minted":
            caller_token = next((a.evidence for a in ctx.identity.attestations
                                 if a.type == "jwt" and a.id == subject and a.evidence), None)
            if caller_token is None and o.subject == "caller":
                raise KeylessError("credential_unavailable", "the caller presented no workload token to exchange",
                                   self.label)
        # The identity (and the caller's own token, when it is the subject) is part of the key:
        # that is what keeps one workload's token from ever being served to another.
        return (subject, caller_token, param_text(ctx, "audience", o.audience, self.label),
                param_text(ctx, "resource", o.resource, self.label), scopes, token_type)

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        token = await self.cache.get(self.key_for(ctx))
        header = request.headers[self.options.header] = render(self.options.template, token.value)
        return Grant(self.name, self.type, token.expires_at, fingerprint(token.value),
                     header_forms(header, token.value))
