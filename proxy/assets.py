"""The files Keyless ships besides its code: the quickstart config and the default policy.

One copy lives at the repository root (``keyless.yaml``, ``policies/``), where ``make run``
uses it; the wheel carries the same files as ``proxy/_data/`` (hatch ``force-include`` in
pyproject.toml), so an installed Keyless finds them without a source tree. Nothing is
duplicated in the repository, so the two cannot drift; tests/test_package.py checks that the
wheel's copies are byte-identical to the repository's.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_data"
_SOURCE = Path(__file__).resolve().parent.parent

QUICKSTART_CONFIG = "keyless.yaml"
POLICY_DIR = "policies"
DEMO_KEY = ".keyless/demo-api-key"  # keyless.yaml's credentials.demo-api.file


def asset(name: str) -> Path:
    """The shipped file or directory ``name``: the wheel's copy, else the source tree's."""
    packaged = _PACKAGED / name
    if packaged.exists():
        return packaged
    source = _SOURCE / name
    if not source.exists():
        raise FileNotFoundError(f"Keyless's {name} is missing from this installation ({packaged})")
    return source


@functools.cache
def version() -> str:
    """The installed distribution's version (pyproject.toml), or the package's own."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("keyless")
    except PackageNotFoundError:
        from proxy import __version__

        return __version__


def init_files(target: Path, force: bool = False) -> list[Path]:
    """``keyless init``: copy the quickstart config and the default policy into ``target``.

    Refuses (FileExistsError naming the files) to overwrite anything unless ``force``: a user's
    edited policy must never be replaced by a starter one.
    """
    plan: list[tuple[Path, Path]] = [(asset(QUICKSTART_CONFIG), target / QUICKSTART_CONFIG)]
    policies = asset(POLICY_DIR)
    plan += [(src, target / POLICY_DIR / src.name) for src in sorted(policies.glob("*.rego"))]
    existing = [dest for _, dest in plan if dest.exists()]
    if existing and not force:
        raise FileExistsError(", ".join(str(p) for p in existing))
    for src, dest in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    written = [dest for _, dest in plan]
    # The quickstart's static credential reads this file (`keyless demo-api` serves the API that
    # expects it): made here too, so the starter config passes `keyless check` as written.
    key = target / DEMO_KEY
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
        written.append(key)
    return written
