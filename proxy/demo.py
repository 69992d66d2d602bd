"""``keyless demo``: the whole request path on one machine, checked step by step.

Starts an HTTPS API that requires a credential, Keyless (a real subprocess) with the quickstart
policy, and a client that holds no secret; exits 0 only if every step behaves as expected.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import secrets
import socket
import ssl
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.assets import POLICY_DIR, QUICKSTART_CONFIG, asset
from proxy.demoapi import pretty, start_demo_api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_tls_files(directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``hosts``: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Keyless demo upstream CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file = directory / "upstream-ca.pem"
    cert_file, key_file = directory / "upstream.pem", directory / "upstream-key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    return ca_file, cert_file, key_file


async def wait_ready(url: str, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as s:
        while asyncio.get_running_loop().time() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"keyless exited with {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("keyless did not become ready")


async def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="keyless-demo-") as tmp:
        return await _run(Path(tmp))


async def _run(tmp: Path) -> int:
    ca_file, cert_file, key_file = make_tls_files(tmp)
    api_key = "demo-" + secrets.token_urlsafe(16)
    (tmp / "api-key").write_text(api_key + "\n")
    api_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    # The shipped quickstart config and policy (the wheel's copies when installed).
    config = yaml.safe_load(asset(QUICKSTART_CONFIG).read_text())
    config["listen"]["port"] = proxy_port
    config["admin"]["port"] = admin_port
    config["tls"] = {"ca_dir": str(tmp / "ca"), "upstream_ca": str(ca_file)}
    config["policy"]["dir"] = str(asset(POLICY_DIR))
    config["credentials"]["demo-api"]["file"] = str(tmp / "api-key")
    config["audit"]["path"] = str(tmp / "audit.log")
    (tmp / "keyless.yaml").write_text(yaml.safe_dump(config))

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    api = await start_demo_api(api_key, f"http://127.0.0.1:{admin_port}/jwks.json", "127.0.0.1", api_port, tls)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "run", "-c", str(tmp / "keyless.yaml"), "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    ok = True
    try:
        await wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc)
        client_tls = ssl.create_default_context(cafile=str(tmp / "ca" / "mitmproxy-ca-cert.pem"))
        proxy = f"http://127.0.0.1:{proxy_port}"
        base = f"https://localhost:{api_port}"
        print(f"Keyless on {proxy}, demo API on {base}; the client holds no secret.\n")
        async with aiohttp.ClientSession() as client:
            async def call(step: str, method: str, path: str, want: int, check: str,
                           headers: dict[str, str] | None = None) -> None:
                nonlocal ok
                async with client.request(method, base + path, proxy=proxy, ssl=client_tls, headers=headers) as r:
                    body = await r.read()
                    good = r.status == want and check in body.decode(errors="replace")
                ok &= good
                print(f"[{'ok' if good else 'FAILED'}] {step}\n    {method} {path} -> {r.status} {pretty(body)}\n")

            await call("allowed call: Keyless injects the API key", "GET", "/v1/invoices", 200,
                       '"authenticated": "api-key"')
            await call("denied call: the policy refuses DELETE", "DELETE", "/v1/invoices", 403, '"forbidden"')
            await call("app-supplied key stripped: the app's own Authorization and X-Api-Key never arrive",
                       "GET", "/v1/invoices", 200, '"app_key_headers": []',
                       headers={"Authorization": "Bearer app-own-token", "X-Api-Key": "app-own-key"})
            await call("minted credential: a JWT for spiffe://demo.local/billing", "POST", "/v1/reports", 200,
                       '"sub": "spiffe://demo.local/billing"')
        await asyncio.sleep(0.2)
        lines = (tmp / "audit.log").read_text().splitlines()
        print("Audit log (one line per request, no credential values):")
        for line in lines:
            rec = json.loads(line)
            cred = rec["credential"]
            print(f"    {rec['request']['method']} {rec['request']['path']} identity={rec['identity']['id']} "
                  f"allow={rec['decision']['allow']} credential={cred and cred['name']} "
                  f"fingerprint={cred and cred['fingerprint']} status={rec['outcome']['status']}")
        leaked = api_key in "\n".join(lines)
        good = len(lines) == 4 and not leaked
        ok &= good
        print(f"\n[{'ok' if good else 'FAILED'}] {len(lines)} audit lines for 4 requests; secret in audit: {leaked}")
    except RuntimeError as e:
        ok = False
        print(f"[FAILED] {e}")
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, err = await proc.communicate()
        if not ok:
            print(err.decode(errors="replace")[-2000:], file=sys.stderr)
        await api.cleanup()
    if api_key in err.decode(errors="replace"):
        print("[FAILED] the secret appeared in Keyless's log")
        ok = False
    print("\ndemo passed" if ok else "\ndemo FAILED")
    return 0 if ok else 1
