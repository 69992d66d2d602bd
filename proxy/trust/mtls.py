"""``mtls``: SPIFFE X.509-SVIDs presented as TLS client certificates.

Keyless asks for a client certificate on its listener (``request_client_cert``), but mitmproxy
accepts any certificate at all, so this provider verifies the chain itself with cryptography's
RFC 5280 path builder (``cryptography.x509.verification``): signatures up to a configured trust
bundle, validity period, basic constraints, key usage, extended key usage (clientAuth). On top of
that, the X509-SVID rules: the leaf is not a CA, may sign (digitalSignature) but not certify,
carries exactly one URI SAN and that URI is a well-formed ``spiffe://`` ID whose trust domain is
the one of the bundle that verified it. The identity comes from that URI SAN only, never from the
subject CN.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509 import verification

from proxy.confread import Section
from proxy.errors import KeylessError
from proxy.model import Attestation
from proxy.trust import Caller

# SPIFFE-ID spec section 2: lower-case trust domain, path segments of [A-Za-z0-9._-], no
# empty, "." or ".." segment, no port, user info, query or fragment.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_ID_LENGTH = 2048


def parse_spiffe_id(uri: str) -> tuple[str, str] | None:
    """(trust domain, path) of a valid SPIFFE ID, else None."""
    if len(uri) > MAX_ID_LENGTH or not uri.startswith("spiffe://"):
        return None
    rest = uri[len("spiffe://"):]
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        return None
    if slash:
        for seg in path.split("/"):
            if not _SEGMENT.fullmatch(seg) or seg in (".", ".."):
                return None
    return domain, ("/" + path if slash else "")


@dataclass(frozen=True, slots=True)
class Bundle:
    trust_domain: str
    file: Path
    roots: tuple[x509.Certificate, ...]


@dataclass(frozen=True, slots=True)
class MtlsOptions:
    bundles: tuple[Bundle, ...]
    max_chain_depth: int


def parse(s: Section) -> MtlsOptions:
    bundles: list[Bundle] = []
    raw = s.raw.get("bundles")
    s.has("bundles")
    if not isinstance(raw, list) or not raw:
        s.error("is required: a list of {trust_domain, file}", "bundles")
        raw = []
    for i, item in enumerate(raw):
        b = Section(item, s.key_path(f"bundles[{i}]"), s.problems, s.base_dir)
        domain = b.text("trust_domain")
        path = b.path_value("file")
        b.done()
        if domain and not _TRUST_DOMAIN.fullmatch(domain):
            b.error("must be a SPIFFE trust domain such as prod or example.org (lower case, no scheme)",
                    "trust_domain")
            continue
        if path is None or not domain:
            continue
        try:
            roots = tuple(x509.load_pem_x509_certificates(path.read_bytes()))
        except (OSError, ValueError) as e:
            b.error(f"cannot read PEM certificates from {path} ({getattr(e, 'strerror', None) or e})", "file")
            continue
        bundles.append(Bundle(domain, path, roots))
    depth = s.integer("max_chain_depth", 4, lo=1, hi=16)
    return MtlsOptions(tuple(bundles), depth)


class MtlsProvider:
    type = "mtls"

    def __init__(self, name: str, options: MtlsOptions) -> None:
        self.name = name
        self.options = options
        self.stores = [(b, verification.Store(list(b.roots))) for b in options.bundles]

    def _fail(self, message: str) -> KeylessError:
        return KeylessError("attestation_failed", message, f"mtls({self.name})")

    async def attest(self, caller: Caller) -> Attestation | None:
        if not caller.client_certs:
            return None
        try:
            chain = [x509.load_der_x509_certificate(der) for der in caller.client_certs]
        except ValueError:
            raise self._fail("client certificate is malformed") from None
        leaf, intermediates = chain[0], chain[1:]
        spiffe_id, domain = self._svid_id(leaf)
        now = datetime.datetime.now(datetime.UTC)
        for bundle, store in self.stores:
            builder = (verification.PolicyBuilder().store(store).time(now)
                       .max_chain_depth(self.options.max_chain_depth))
            try:
                verified = builder.build_client_verifier().verify(leaf, intermediates)
            except verification.VerificationError:
                continue
            if bundle.trust_domain != domain:
                raise self._fail(f"SPIFFE ID {spiffe_id} is not in trust domain {bundle.trust_domain}, "
                                 "whose bundle signed it")
            root = verified.chain[-1]
            return Attestation(self.name, self.type, spiffe_id, {
                "spiffe_id": spiffe_id, "trust_domain": domain,
                "serial": format(leaf.serial_number, "x"),
                "not_after": leaf.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
                "root": root.subject.rfc4514_string(),
            })
        raise self._fail("client certificate is not signed by a trusted bundle, or is expired or unfit "
                         "for client authentication")

    def _svid_id(self, leaf: x509.Certificate) -> tuple[str, str]:
        """The leaf's SPIFFE ID and trust domain, checking the X509-SVID leaf profile."""
        try:
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise self._fail("client certificate has no URI SAN (an X509-SVID has exactly one)") from None
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise self._fail(f"client certificate has {len(uris)} URI SANs (an X509-SVID has exactly one)")
        parsed = parse_spiffe_id(uris[0])
        if parsed is None:
            raise self._fail("client certificate's URI SAN is not a valid SPIFFE ID")
        try:
            bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
            if bc.ca:
                raise self._fail("client certificate is a CA certificate")
        except x509.ExtensionNotFound:
            pass
        try:
            ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise self._fail("client certificate has no key usage (an X509-SVID must)") from None
        if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
            raise self._fail("client certificate's key usage is not that of an X509-SVID leaf")
        return uris[0], parsed[0]
