"""``jwt``: a short-lived JWT that Keyless mints for the caller's workload identity.

``sub`` is the attested workload id, ``aud`` the destination origin (or ``params.audience``
from the decision). The receiving API verifies it with Keyless's ``/jwks.json``. Tokens are
cached per (subject, audience) and re-minted well before expiry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxy.confread import Section
from proxy.credentials import Runtime, header_template, render
from proxy.errors import KeylessError
from proxy.model import Grant, GrantContext, OutboundRequest, fingerprint
from proxy.redact import header_forms


@dataclass(frozen=True, slots=True)
class JwtOptions:
    audience: str | None
    ttl: int
    issuer: str | None
    header: str
    template: str


def parse(s: Section) -> JwtOptions:
    header, template = header_template(s)
    return JwtOptions(
        audience=s.text("audience", None),
        ttl=s.integer("ttl", 300, lo=30, hi=3600),
        issuer=s.text("issuer", None),
        header=header,
        template=template,
    )


class JwtCredential:
    type = "jwt"

    def __init__(self, name: str, options: JwtOptions, runtime: Runtime) -> None:
        self.name = name
        self.options = options
        self.signer = runtime.signer
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"JwtCredential(name={self.name!r})"

    def token_for(self, subject: str, audience: str) -> tuple[str, float]:
        now = time.time()
        key = (subject, audience)
        hit = self._cache.get(key)
        # Re-mint once less than a fifth of the lifetime is left, so a receiver with some
        # clock skew never sees an almost-expired token.
        if hit is not None and hit[1] - now > self.options.ttl / 5:
            return hit
        if len(self._cache) > 10_000:
            self._cache.clear()
        minted = self.signer.mint(subject, audience, self.options.ttl, issuer=self.options.issuer)
        self._cache[key] = minted
        return minted

    async def apply(self, request: OutboundRequest, ctx: GrantContext) -> Grant:
        subject = ctx.identity.id
        if subject is None:
            raise KeylessError("credential_unavailable", "no attested workload identity to mint a token for",
                               f"jwt({self.name})")
        audience = ctx.decision.params.get("audience") or self.options.audience or ctx.origin
        if not isinstance(audience, str):
            raise KeylessError("credential_unavailable", "params.audience must be a string",
                               f"jwt({self.name})")
        token, exp = self.token_for(subject, audience)
        header = request.headers[self.options.header] = render(self.options.template, token)
        return Grant(self.name, self.type, exp, fingerprint(token),
                     header_forms(header, token))
