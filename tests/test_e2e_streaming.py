"""Request bodies stream to the upstream after the decision, unless a credential needs them.

Only a credential whose registry entry says ``requires_request_body`` (SigV4) makes Keyless
buffer a body; for every other request the decision, strip and inject happen on the head and
the body goes straight through. A real Keyless, a real upstream, real clients (requests with a
generator body, i.e. chunked; curl with a Content-Length), and the Keyless process's peak RSS
from /proc: a 40 MB upload must not be held in Keyless's memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from tests.clients import curl, req
from tests.harness import Keyless, Upstream, base_config, wait_for_audit

SIZE = 40 * 1024 * 1024
CHUNK = b"0123456789abcdef" * 4096  # 64 KiB


def peak_rss_kb(k: Keyless) -> int:
    assert k.proc is not None
    for line in Path(f"/proc/{k.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def keyless(tmp_path: Path, upstream: Upstream) -> Iterator[Keyless]:
    cfg = base_config(tmp_path, upstream, credentials={"workload-jwt": {"type": "jwt", "ttl": 60},
                                                        "demo-api": {"type": "jwt", "ttl": 60}})
    k = Keyless(tmp_path, cfg).start(log_level="info")
    yield k
    k.stop()


def body() -> Iterator[bytes]:
    for _ in range(SIZE // len(CHUNK)):
        yield CHUNK


def expected_digest() -> str:
    h = hashlib.sha256()
    for c in body():
        h.update(c)
    return h.hexdigest()


def test_chunked_upload_streams_through_with_the_credential(keyless: Keyless, upstream: Upstream) -> None:
    # Warm up (TLS, first request) so the peak afterwards is the upload's own.
    assert req(keyless, "POST", upstream.url("/v1/reports/warm"), data=b"x").status == 200
    before = peak_rss_kb(keyless)
    reply = req(keyless, "POST", upstream.url("/v1/reports/big"), data=body())
    assert reply.status == 200, reply.body
    got = upstream.received[-1]
    assert len(got.body) == SIZE and hashlib.sha256(got.body).hexdigest() == expected_digest()
    claims = jwt.decode(got.headers["authorization"].removeprefix("Bearer "), options={"verify_signature": False})
    assert claims["sub"] == "spiffe://demo.local/billing"
    grown_mb = (peak_rss_kb(keyless) - before) / 1024
    assert grown_mb < 20, f"Keyless's peak RSS grew {grown_mb:.0f} MB for a {SIZE >> 20} MB upload: it buffered"
    records = wait_for_audit(keyless, 2)
    assert records[-1]["outcome"]["status"] == 200 and records[-1]["credential"]["type"] == "jwt"


def test_upload_with_content_length_streams_through(keyless: Keyless, upstream: Upstream, tmp_path: Path) -> None:
    data = tmp_path / "upload.bin"
    with data.open("wb") as f:
        for c in body():
            f.write(c)
    assert req(keyless, "POST", upstream.url("/v1/reports/warm"), data=b"x").status == 200
    before = peak_rss_kb(keyless)
    reply = curl(keyless, upstream.url("/v1/reports/file"), "--data-binary", f"@{data}", "-H", "Expect:")
    assert reply.status == 200, reply.body
    assert len(upstream.received[-1].body) == SIZE
    assert (peak_rss_kb(keyless) - before) / 1024 < 20
