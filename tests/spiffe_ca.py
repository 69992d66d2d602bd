"""A test SPIFFE certificate authority: real X.509-SVIDs, as SPIRE would issue them.

Stands in for a SPIRE server (which cannot run here): the CA and leaf profiles follow the
X509-SVID specification (CA: basicConstraints CA, keyCertSign; leaf: not a CA, digitalSignature,
clientAuth, exactly one ``spiffe://`` URI SAN).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class SpiffeCA:
    trust_domain: str
    key: Any
    cert: x509.Certificate

    @classmethod
    def create(cls, trust_domain: str) -> SpiffeCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} test CA")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                    f"spiffe://{trust_domain}")]), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(trust_domain, key, cert)

    def bundle(self, directory: Path) -> Path:
        path = directory / f"{self.trust_domain}-bundle.pem"
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, directory: Path, name: str, uris: list[str], *, cn: str = "workload",
              not_before: datetime.timedelta = datetime.timedelta(minutes=-5),
              lifetime: datetime.timedelta = datetime.timedelta(hours=1),
              key_usage_sign: bool = True, ca: bool = False) -> tuple[Path, Path]:
        """An SVID for ``uris`` (normally exactly one); returns (cert.pem, key.pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = _now() + not_before
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + lifetime)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(key_usage_sign, False, not key_usage_sign, False, False, ca, ca,
                                                False, False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                                         ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file
