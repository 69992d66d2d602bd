"""``on_behalf_of``: an RFC 8693 token exchange for "agent A acting for user U".

An AI agent presents its user's token to Keyless in ``mcp.user_token.header`` (verified there,
stripped, never forwarded). For a request whose decision names this credential, Keyless asks the
authorization server for a token with

* ``subject_token``: the user's token (``subject_token_type``: jwt by default);
* ``actor_token``: a short-lived JWT Keyless mints for the attested agent (``sub`` = the agent's
  workload id, ``aud`` = the issuer or ``actor_audience``), verifiable at Keyless's ``/jwks.json``;
* ``resource`` (RFC 8707): the MCP server's URL (``resource``, else the request's origin and path),

so the server receives a token whose subject is the user and whose ``act`` claim names the
agent, and never a shared key. No user token, no attested agent: ``credential_unavailable``.
Tokens are cached per (agent, user's token, audience, resource, scopes): one agent's or one
user's token is never served to another.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.confread import Section
from proxy.credentials import Runtime, header_template, render
from proxy.credentials.cache import Token, TokenCache
from proxy.credentials.oauth2 import ClientOptions, OAuthClient, add_targets, param_scopes, param_text, parse_client
from proxy.credentials.token_exchange import ACCESS_TOKEN_TYPE, GRANT, JWT_TYPE
from proxy.errors import KeylessError
from proxy.model import Grant, GrantContext, OutboundRequest, fingerprint
from proxy.redact import header_forms

# (agent, user's token, audience, resource, scopes)
Key = tuple[str, str, str | None, str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class OnBehalfOfOptions:
    client: ClientOptions
    audience: str | None
    resource: str | None
    scopes: tuple[str, ...]
    subject_token_type: str
    requested_token_type: str
    actor_audience: str | None
    actor_ttl: int
    header: str
    template: str


def parse(s: Section) -> OnBehalfOfOptions:
    header, template = header_template(s)
    kind = s.choice("subject_token_type", ("jwt", "access_token"), "jwt")
    return OnBehalfOfOptions(
        client=parse_client(s),
        audience=s.text("audience", None),
        resource=s.text("resource", None),
        scopes=tuple(sorted(set(s.str_list("scopes", ())))),
        subject_token_type=JWT_TYPE if kind == "jwt" else ACCESS_TOKEN_TYPE,
        requested_token_type=s.text("requested_token_type", ACCESS_TOKEN_TYPE),
        actor_audience=s.text("actor_audience", None),
        actor_ttl=s.integer("actor_ttl", 60, lo=10, hi=600),
        header=header,
        template=template,
    )


class OnBehalfOfCredential:
    type = "on_behalf_of"

    def __init__(self, name: str, options: OnBehalfOfOptions, runtime: Runtime) -> None:
        self.name = name
        self.options = options
        self.label = f"on_behalf_of({name})"
        self.signer = runtime.signer
        self.client = OAuthClient(name, self.label, options.client, runtime)
        self.cache: TokenCache[Key] = TokenCache(self.label, self._fetch, options.client.cache)

    def __repr__(self) -> str:
        return f"OnBehalfOfCredential(name={self.name!r})"

    async def _fetch(self, key: Key) -> Token:
        agent, user_token, audience, resource, scopes = key
        o = self.options
        actor, _ = self.signer.mint(agent, o.actor_audience or self.client.audience_default, o.actor_ttl)
        form = {
            "grant_type": GRANT,
            "subject_token": user_token,
            "subject_token_type": o.subject_token_type,
            "actor_token": actor,
            "actor_token_type": JWT_TYPE,
            "requested_token_type": o.requested_token_type,
        }
        add_targets(form, scopes, audience, resource)
        return await self.client.request_token(form)

    def key_for(self, ctx: GrantContext) -> Key:
        agent = ctx.identity.id
        if agent is None:
            raise KeylessError("credential_unavailable", "no attested agent identity to act as", self.label)
        if ctx.user_token is None:
            raise KeylessError("credential_unavailable", "the agent presented no user token (mcp.user_token)",
                               self.label)
        o = self.options
        resource = param_text(ctx, "resource", o.resource, self.label) or ctx.origin + ctx.path
        return (agent, ctx.user_token, param_text(ctx, "audience", o.audience, self.label), resource,
                param_scopes(ctx, o.scopes, self.label))

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        token = await self.cache.get(self.key_for(ctx))
        header = request.headers[self.options.header] = render(self.options.template, token.value)
        return Grant(self.name, self.type, token.expires_at, fingerprint(token.value),
                     header_forms(header, token.value))
