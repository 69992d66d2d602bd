"""``jwt``: workload tokens (Kubernetes, GitHub Actions, GitLab CI, any OIDC issuer).

The caller presents its token to the proxy in ``Proxy-Authorization``: ``Bearer <jwt>``, or
``Basic`` with the token as the password, so ``HTTPS_PROXY=http://workload:$TOKEN@keyless:8080``
works with unmodified clients. Verification is strict, in this order:

1. the header is well formed and the token is a compact JWS of bounded size;
2. ``alg`` is in the allowlist (asymmetric only: never ``none``, never HMAC, so a public key can
   never be used as an HMAC secret) and there is no ``crit`` header (we implement no extension);
3. ``iss`` equals a configured issuer exactly (no prefix or substring match);
4. the key comes from that issuer's key set (``kid``), never from ``jku``/``x5u``/``jwk``/``x5c``;
5. signature, then ``exp``/``iat``/``nbf`` with bounded skew, ``aud`` one of ours; ``exp``,
   ``iat``, ``iss``, ``sub`` and ``aud`` are required; the preset's claims must be present.

A token whose issuer no provider knows is refused by the broker (evidence present but unverified
is never "no identity").
"""

from __future__ import annotations

import base64
import binascii
import ssl
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt as pyjwt
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    MissingRequiredClaimError,
    PyJWTError,
)

from proxy.confread import Section
from proxy.errors import KeylessError
from proxy.model import Attestation
from proxy.trust import Caller
from proxy.trust.jwks import ALGORITHM_KEYS, CachePolicy, KeySet, KeySetError, KeySource

MAX_TOKEN_BYTES = 16 * 1024
REQUIRED_CLAIMS = ("exp", "iat", "iss", "sub", "aud")


@dataclass(frozen=True, slots=True)
class Preset:
    """Where a workload-identity system puts its facts in the token."""

    issuer: str | None
    # fact name -> path of keys into the claims (Kubernetes nests under "kubernetes.io").
    facts: Mapping[str, tuple[str, ...]]
    required: tuple[str, ...] = ()
    id: str = "{issuer}#{subject}"


PRESETS: Mapping[str, Preset] = {
    "generic": Preset(None, {}),
    "kubernetes": Preset(
        None,
        {
            "namespace": ("kubernetes.io", "namespace"),
            "service_account": ("kubernetes.io", "serviceaccount", "name"),
            "service_account_uid": ("kubernetes.io", "serviceaccount", "uid"),
            "pod": ("kubernetes.io", "pod", "name"),
            "pod_uid": ("kubernetes.io", "pod", "uid"),
            "node": ("kubernetes.io", "node", "name"),
        },
        required=("namespace", "service_account"),
    ),
    "github": Preset(
        "https://token.actions.githubusercontent.com",
        {k: (k,) for k in (
            "repository", "repository_id", "repository_owner", "repository_owner_id", "ref", "ref_type",
            "sha", "workflow", "workflow_ref", "job_workflow_ref", "environment", "event_name", "actor",
            "run_id", "run_attempt", "runner_environment")},
        required=("repository", "repository_id", "ref"),
    ),
    "gitlab": Preset(
        "https://gitlab.com",
        {k: (k,) for k in (
            "project_path", "project_id", "namespace_path", "namespace_id", "ref", "ref_type", "ref_protected",
            "pipeline_source", "pipeline_id", "job_id", "environment", "environment_protected", "user_login",
            "ci_config_ref_uri")},
        required=("project_path", "project_id", "ref"),
    ),
}


@dataclass(frozen=True, slots=True)
class IssuerOptions:
    issuer: str
    preset: str
    audiences: frozenset[str]
    keys: KeySource
    facts: Mapping[str, tuple[str, ...]]
    required: tuple[str, ...]
    id_template: str


@dataclass(frozen=True, slots=True)
class JwtOptions:
    issuers: tuple[IssuerOptions, ...]
    algorithms: frozenset[str]
    clock_skew: float
    cache: CachePolicy = field(default_factory=CachePolicy)


def parse(s: Section) -> JwtOptions:
    algorithms = s.str_list("algorithms", ("RS256", "ES256"))
    for alg in algorithms:
        if alg not in ALGORITHM_KEYS:
            s.error(f"{alg!r} is not allowed; choose from {', '.join(ALGORITHM_KEYS)} "
                    "(asymmetric algorithms only)", "algorithms")
    cache = CachePolicy(
        refresh_interval=s.number("refresh_interval", 300.0, lo=1.0),
        kid_miss_cooldown=s.number("kid_miss_cooldown", 30.0, lo=0.0),
        max_stale=s.number("max_stale", 3600.0, lo=0.0),
        fetch_timeout=s.number("fetch_timeout", 5.0, lo=0.1),
    )
    if cache.max_stale < cache.refresh_interval:
        s.error("must be at least refresh_interval: keys go stale only after a refresh could run",
                "max_stale")
    skew = s.number("clock_skew", 60.0, lo=0.0)
    if skew > 300:
        s.error("must be at most 300 seconds", "clock_skew")
    issuers: list[IssuerOptions] = []
    raw = s.raw.get("issuers")
    s.has("issuers")
    if not isinstance(raw, list) or not raw:
        s.error("is required: a list of issuers ({issuer, audiences, preset, keys})", "issuers")
        raw = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        parsed = _parse_issuer(Section(item, s.key_path(f"issuers[{i}]"), s.problems, s.base_dir))
        if parsed is None:
            continue
        if parsed.issuer in seen:
            s.error(f"issuer {parsed.issuer!r} is listed twice", f"issuers[{i}].issuer")
        seen.add(parsed.issuer)
        issuers.append(parsed)
    return JwtOptions(tuple(issuers), frozenset(algorithms), skew, cache)


def _parse_issuer(s: Section) -> IssuerOptions | None:
    preset_name = s.choice("preset", tuple(PRESETS), "generic")
    preset = PRESETS.get(preset_name or "generic", PRESETS["generic"])
    issuer = s.text("issuer", preset.issuer) if preset.issuer else s.text("issuer")
    if issuer and not issuer.startswith("https://"):
        s.error("must be an https:// URL, exactly as the tokens' iss claim spells it", "issuer")
    audiences = s.str_list("audiences")
    ca_file = s.path_value("ca_file", None)
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as e:
            s.error(f"cannot load CA certificates from {ca_file} ({getattr(e, 'strerror', None) or e})", "ca_file")
            ca_file = None
    chosen = [k for k in ("discovery", "jwks_url", "jwks_file") if s.has(k)]
    discovery = s.flag("discovery", False)
    jwks_url = s.text("jwks_url", None)
    jwks_file = s.path_value("jwks_file", None)
    if len(chosen) > 1:
        s.error("set only one of discovery, jwks_url, jwks_file")
    if jwks_url is not None and not jwks_url.startswith("https://"):
        s.error("must be an https:// URL", "jwks_url")
    if jwks_file is not None and not jwks_file.is_file():
        s.error(f"file not found: {jwks_file}", "jwks_file")
    if not chosen:
        discovery = True  # the usual case: the issuer publishes OIDC discovery
    elif "discovery" in chosen and not discovery:
        s.error("set jwks_url or jwks_file instead of discovery: false", "discovery")
    facts = dict(preset.facts)
    extra = s.section("claims")
    for fact_name in extra.raw:
        claim = extra.text(str(fact_name))
        if claim:
            facts[str(fact_name)] = (claim,)
    extra.done()
    id_template = s.text("id", preset.id)
    if id_template:
        allowed = {"issuer", "subject", *facts}
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(id_template) if f is not None}
        except ValueError:
            names = {"{"}
        bad = sorted(n for n in names if n not in allowed)
        if bad:
            s.error(f"unknown placeholder {bad[0]!r}; use {{issuer}}, {{subject}} or a fact name "
                    f"({', '.join(sorted(facts)) or 'none configured'})", "id")
    s.done()
    if not (issuer and audiences and id_template):
        return None
    source = KeySource(discovery=issuer if discovery else None, jwks_url=jwks_url,
                       jwks_file=jwks_file, ca_file=ca_file)
    return IssuerOptions(issuer, preset_name or "generic", frozenset(audiences), source, facts,
                         preset.required, id_template)


def token_from_header(value: str) -> str:
    """The JWT in a ``Proxy-Authorization`` value; raises ValueError (without the value) if malformed."""
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer":
        token = rest
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("malformed Basic credentials") from None
        _, sep, token = decoded.partition(":")
        if not sep:
            raise ValueError("malformed Basic credentials")
    else:
        raise ValueError("unsupported Proxy-Authorization scheme (use Bearer or Basic)")
    if not token or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise ValueError("the credential is not a compact JWT")
    return token


class JwtProvider:
    type = "jwt"

    def __init__(self, name: str, options: JwtOptions) -> None:
        self.name = name
        self.options = options
        self.issuers: dict[str, tuple[IssuerOptions, KeySet]] = {
            o.issuer: (o, KeySet(f"{name}: {o.issuer}", o.keys, options.cache)) for o in options.issuers
        }

    def _fail(self, message: str) -> KeylessError:
        return KeylessError("attestation_failed", message, f"jwt({self.name})")

    async def attest(self, caller: Caller) -> Attestation | None:
        if caller.proxy_authorization is None:
            return None
        try:
            token = token_from_header(caller.proxy_authorization)
            header = pyjwt.get_unverified_header(token)
            unverified = pyjwt.decode(token, options={"verify_signature": False})
        except (ValueError, PyJWTError) as e:
            raise self._fail(str(e) if isinstance(e, ValueError) else "malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.options.algorithms:
            raise self._fail(f"algorithm {str(alg)[:20]!r} is not allowed")
        if "crit" in header:
            raise self._fail("token has critical header extensions Keyless does not implement")
        iss = unverified.get("iss")
        found = self.issuers.get(iss) if isinstance(iss, str) else None
        if found is None:
            return None  # another provider may know this issuer; the broker refuses if none does
        opts, keys = found
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise self._fail("malformed kid")
        try:
            key = await keys.key_for(kid, alg)
        except KeySetError as e:
            raise self._fail(f"issuer {opts.issuer}: {e}") from None
        claims = self._verify(token, key, alg, opts)
        facts = self._facts(claims, opts)
        try:
            wid = opts.id_template.format_map(facts)
        except (KeyError, ValueError, IndexError):
            raise self._fail("token lacks a claim the id template needs") from None
        return Attestation(self.name, self.type, wid, facts, evidence=token)

    def _verify(self, token: str, key: Any, alg: str, opts: IssuerOptions) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = pyjwt.decode(
                token, key, algorithms=[alg], audience=sorted(opts.audiences), issuer=opts.issuer,
                leeway=self.options.clock_skew,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True, "verify_exp": True,
                         "verify_iat": True, "verify_nbf": True, "verify_aud": True, "verify_iss": True},
            )
        except ExpiredSignatureError:
            raise self._fail("token has expired") from None
        except ImmatureSignatureError:
            # nbf, or iat in the future: both beyond the allowed skew.
            raise self._fail("token is not yet valid") from None
        except MissingRequiredClaimError as e:
            raise self._fail(f"token lacks the required {e.claim!r} claim") from None
        except InvalidAudienceError:
            raise self._fail("token audience is not one Keyless accepts") from None
        except InvalidIssuerError:
            raise self._fail("token issuer does not match") from None
        except InvalidIssuedAtError:
            raise self._fail("token has a malformed iat claim") from None
        except PyJWTError:
            raise self._fail("token signature or format is invalid") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise self._fail("token has an empty sub claim")
        return claims

    def _facts(self, claims: Mapping[str, Any], opts: IssuerOptions) -> dict[str, Any]:
        aud = claims["aud"]
        facts: dict[str, Any] = {
            "issuer": opts.issuer, "subject": claims["sub"], "preset": opts.preset,
            "audience": next(a for a in ([aud] if isinstance(aud, str) else aud) if a in opts.audiences),
            "expires_at": claims["exp"],
        }
        for fact, path in opts.facts.items():
            value: Any = claims
            for part in path:
                value = value.get(part) if isinstance(value, Mapping) else None
            if isinstance(value, str | int | float | bool):
                facts[fact] = value
        missing = [f for f in opts.required if f not in facts]
        if missing:
            raise self._fail(f"{opts.preset} token lacks {missing[0]!r}")
        return facts
