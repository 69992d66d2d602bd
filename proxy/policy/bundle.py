"""OPA bundles for the embedded engine: ``bundle.tar.gz`` from a file or a bundle server.

The archive layout is OPA's: ``*.rego`` modules anywhere, ``data.json``/``data.yaml`` files whose
directory names the place in ``data`` they are loaded at, and an optional ``.manifest`` with a
``revision``. A bundle server is polled with ``If-None-Match`` as OPA's bundle plugin does, so
the same server can feed OPA replicas and embedded Keyless replicas alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml

from proxy.policy.embedded import PolicyLoadError, PolicySource

# A policy bundle is text; anything this large is a mistake or an attack on the proxy's memory.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024


def read_bundle_archive(blob: bytes, name: str) -> PolicySource:
    """Parse a gzipped tar bundle held in memory; nothing is written to disk."""
    if len(blob) > MAX_BUNDLE_BYTES:
        raise PolicyLoadError([f"{name}: bundle larger than {MAX_BUNDLE_BYTES} bytes"])
    problems: list[str] = []
    modules: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    revision = "sha256:" + hashlib.sha256(blob).hexdigest()[:12]
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            regular = [m for m in tar.getmembers() if m.isfile()]
            # A few KB of gzip can claim gigabytes: check the sizes before reading anything.
            if sum(m.size for m in regular) > MAX_BUNDLE_BYTES:
                raise PolicyLoadError([f"{name}: bundle unpacks to more than {MAX_BUNDLE_BYTES} bytes"])
            members = [(m, tar.extractfile(m)) for m in regular]
            files = {_clean(m.name): f.read() for m, f in members if f is not None}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PolicyLoadError([f"{name}: not a gzipped tar bundle ({e})"]) from None
    for path in sorted(files):
        where = f"{name}:{path}"
        raw = files[path]
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            problems.append(f"{where}: not UTF-8")
            continue
        leaf = PurePosixPath(path)
        if leaf.suffix == ".rego":
            modules.append((where, text))
        elif leaf.name in ("data.json", "data.yaml", "data.yml"):
            try:
                loaded = json.loads(text) if leaf.name.endswith(".json") else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as e:
                problems.append(f"{where}: malformed data file ({str(e).splitlines()[0]})")
                continue
            _merge_at(data, list(leaf.parent.parts), loaded, where, problems)
        elif leaf.name == ".manifest":
            try:
                rev = json.loads(text).get("revision")
            except (json.JSONDecodeError, AttributeError):
                problems.append(f"{where}: malformed manifest (expected a JSON object)")
            else:
                if isinstance(rev, str) and rev:
                    revision = rev
    if not modules:
        problems.append(f"{name}: no .rego files in the bundle")
    if problems:
        raise PolicyLoadError(problems)
    return PolicySource(tuple(modules), data, revision)


def _clean(name: str) -> str:
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".", "/")]
    if ".." in parts:
        raise PolicyLoadError([f"bundle member {name!r} escapes the bundle root"])
    return "/".join(parts)


def _merge_at(data: dict[str, Any], keys: list[str], value: Any, where: str, problems: list[str]) -> None:
    if not keys:
        if not isinstance(value, dict):
            problems.append(f"{where}: data must be an object at the top level")
            return
        data.update(value)
        return
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            problems.append(f"{where}: conflicts with data at {key!r}")
            return
    node[keys[-1]] = value


@dataclass(frozen=True, slots=True)
class Fetched:
    """One answer of a bundle server: new bytes and their ETag, or ``changed=False`` on 304."""

    changed: bool
    body: bytes = b""
    etag: str | None = None


def fetch_bundle_sync(url: str, etag: str | None, timeout: float) -> Fetched:
    """Blocking fetch, used once at start (``keyless check`` and ``keyless run`` load the bundle
    before serving) and from a worker thread when polling."""
    req = urllib.request.Request(url, headers={"Accept": "application/gzip"})  # noqa: S310 - http(s) only, checked in config
    if etag:
        req.add_header("If-None-Match", etag)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            body = resp.read(MAX_BUNDLE_BYTES + 1)
            return Fetched(True, body, resp.headers.get("ETag"))
    except urllib.error.HTTPError as e:
        if e.code == 304:
            return Fetched(False, etag=etag)
        raise PolicyLoadError([f"{url}: bundle server answered HTTP {e.code}"]) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise PolicyLoadError([f"{url}: cannot fetch bundle ({reason})"]) from None
