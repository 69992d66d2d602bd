"""A policy version as read from disk or a bundle: its modules, its data and its revision.

A policy directory is an OPA bundle directory: ``*.rego`` modules, optional ``data.json`` or
``data.yaml`` at its root, and an optional ``.manifest`` with a ``revision``. Test files
(``*_test.rego``) are left out of the engine and run by ``keyless policy test``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml


class PolicyLoadError(Exception):
    """One line per problem, each naming the file and line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class PolicySource:
    modules: tuple[tuple[str, str], ...]  # (path shown in errors, source text)
    data: dict[str, Any]
    revision: str

    def without_tests(self) -> PolicySource:
        """The modules the engine serves: ``*_test.rego`` files run only under ``policy test``."""
        kept = tuple(m for m in self.modules if not m[0].endswith("_test.rego"))
        return replace(self, modules=kept)

    @property
    def has_tests(self) -> bool:
        return any(name.endswith("_test.rego") for name, _ in self.modules)


def read_policy_dir(directory: Path, *, with_tests: bool = False) -> PolicySource:
    if not directory.is_dir():
        raise PolicyLoadError([f"{directory}: policy directory not found"])
    problems: list[str] = []
    modules: list[tuple[str, str]] = []
    digest = hashlib.sha256()
    for file in sorted(directory.rglob("*.rego")):
        text = file.read_text()
        # Test files count in the revision whether or not they are returned: `policy explain`
        # and `policy eval` (no tests) must name the revision `run` and the audit log name.
        digest.update(file.name.encode() + b"\0" + text.encode() + b"\0")
        if file.name.endswith("_test.rego") and not with_tests:
            continue
        modules.append((_show(file), text))
    if not modules:
        problems.append(f"{directory}: no .rego files")
    data: dict[str, Any] = {}
    for name in ("data.json", "data.yaml", "data.yml"):
        file = directory / name
        if not file.is_file():
            continue
        text = file.read_text()
        digest.update(text.encode())
        try:
            loaded = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            problems.append(f"{_show(file)}: malformed data file ({str(e).splitlines()[0]})")
            continue
        if not isinstance(loaded, dict):
            problems.append(f"{_show(file)}: data must be an object at the top level")
            continue
        data.update(loaded)
    revision = "sha256:" + digest.hexdigest()[:12]
    manifest = directory / ".manifest"
    if manifest.is_file():
        try:
            rev = json.loads(manifest.read_text()).get("revision")
        except (json.JSONDecodeError, AttributeError):
            problems.append(f"{_show(manifest)}: malformed manifest (expected a JSON object)")
        else:
            if isinstance(rev, str) and rev:
                revision = rev
    if problems:
        raise PolicyLoadError(problems)
    return PolicySource(tuple(modules), data, revision)


def entrypoint(query: str) -> str:
    """``data.keyless.egress.decision`` -> ``keyless/egress/decision`` (OPA's data API path)."""
    return query.removeprefix("data.").replace(".", "/")


def _show(file: Path) -> str:
    try:
        return str(file.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(file)
