"""Keyless's own CA, generated on first start, used by mitmproxy to intercept TLS."""

from __future__ import annotations

import os
from pathlib import Path

from mitmproxy.certs import CertStore

# mitmproxy looks for "<basename>-ca.pem" in its confdir; we keep its file layout so the
# directory works with plain mitmproxy tools too, but the CA itself is named Keyless.
BASENAME = "mitmproxy"


def ca_cert_path(ca_dir: Path) -> Path:
    return ca_dir / f"{BASENAME}-ca-cert.pem"


def publish_ca(cert: Path, dest: Path) -> None:
    """Copy the public CA certificate to ``dest`` (world-readable), atomically.

    A sidecar's app container mounts ``dest``'s directory; the key stays in ``ca_dir``, which
    only Keyless mounts.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Per-process name: with listen.workers every worker publishes at start, at the same time.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(cert.read_bytes())
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def ensure_ca(ca_dir: Path) -> Path:
    """Create the CA in ``ca_dir`` unless it exists; return the public certificate's path.

    The directory is 0700 and the key file 0600: whoever reads the key can impersonate every
    HTTPS site to every workload that trusts this CA.
    """
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(ca_dir, 0o700)
    key_file = ca_dir / f"{BASENAME}-ca.pem"
    if not key_file.exists():
        CertStore.create_store(ca_dir, BASENAME, 2048, organization="Keyless", cn="Keyless CA")
    for secret in (key_file, ca_dir / f"{BASENAME}-ca.p12"):
        if secret.exists():
            os.chmod(secret, 0o600)
    return ca_cert_path(ca_dir)
