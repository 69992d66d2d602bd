"""Credential providers: each injects one kind of credential into an outgoing request.

``apply`` is called after the app's own credentials were stripped and the policy named this
credential. It sets headers (or signs the request) and returns a Grant describing what it
injected without its value. Any failure raises ``KeylessError("credential_unavailable", ...)``:
a request never leaves with no credential or a stale one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from proxy.confread import Section
from proxy.credentials.http import HttpClients
from proxy.model import Grant, GrantContext, OutboundRequest
from proxy.plugins import PluginSpec
from proxy.signing import Signer

if TYPE_CHECKING:
    from proxy.shared.store import SharedStore


@dataclass(frozen=True, slots=True)
class Runtime:
    """Shared services a credential provider may use.

    ``http`` hands out aiohttp sessions created lazily on the running loop, shared by every
    provider that talks to a token endpoint. ``shared`` is the Redis store behind every token
    cache when ``cache.redis`` is configured (proxy/shared/tokens.py ``shared_tokens``).
    """

    signer: Signer
    http: HttpClients = field(default_factory=HttpClients)
    shared: SharedStore | None = None


class CredentialProvider(Protocol):
    name: str
    type: str

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        """Inject the credential into ``request`` for the caller and call in ``ctx``."""
        ...


CredentialSpec = PluginSpec[CredentialProvider]


def _registry() -> dict[str, CredentialSpec]:
    from proxy.credentials import aws_sigv4, github_app, jwt, oauth2, on_behalf_of, static, token_exchange

    return {
        "static": PluginSpec(static.parse, static.StaticCredential),
        "jwt": PluginSpec(jwt.parse, jwt.JwtCredential),
        "oauth2": PluginSpec(oauth2.parse, oauth2.OAuth2Credential),
        "token_exchange": PluginSpec(token_exchange.parse, token_exchange.TokenExchangeCredential),
        "aws_sigv4": PluginSpec(aws_sigv4.parse, aws_sigv4.AwsSigV4Credential, requires_request_body=True),
        "github_app": PluginSpec(github_app.parse, github_app.GitHubAppCredential),
        "on_behalf_of": PluginSpec(on_behalf_of.parse, on_behalf_of.OnBehalfOfCredential),
    }


def header_template(s: Section, default_header: str = "Authorization",
                    default_template: str = "Bearer {secret}") -> tuple[str, str]:
    """Read ``header`` and ``template`` (with exactly one ``{secret}``) from a credential."""
    header = s.text("header", default_header)
    template = s.text("template", default_template)
    if template and template.count("{secret}") != 1:
        s.error("must contain {secret} exactly once, e.g. 'Bearer {secret}'", "template")
    if template and any(c in template for c in "\r\n\0"):
        s.error("must not contain CR, LF or NUL", "template")
    if header and (not header.isascii() or any(c in header for c in " :\r\n\0")):
        s.error(f"is not a valid header name: {header!r}", "header")
    return header, template


def render(template: str, secret: str) -> str:
    # str.replace, not str.format: a secret containing braces must not be interpreted.
    return template.replace("{secret}", secret)


CREDENTIALS: dict[str, CredentialSpec] = _registry()
