"""Keyless as a package: build the wheel, install it into a clean venv outside the checkout with
the pinned dependencies (requirements.lock, what the image installs), and use it there.

This is the path of a user who ran ``pip install keyless``: no source tree, no PYTHONPATH, a
working directory with nothing in it. The shipped files (quickstart config, default policy)
must come from the wheel, and be the repository's files byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO


def _run(cmd: list[str], cwd: Path, timeout: float,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # pip builds with hatchling in an isolated build environment: the same wheel `pip install .` makes.
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
                 cwd=out, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheels = list(out.glob("keyless-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    home = tmp_path_factory.mktemp("installed")
    assert REPO not in home.parents
    venv = home / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=home, timeout=120)
    assert made.returncode == 0, made.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    deps = _run([*pip, "--require-hashes", "-r", str(REPO / "requirements.lock")], cwd=home, timeout=600)
    assert deps.returncode == 0, deps.stderr[-3000:]
    inst = _run([*pip, "--no-deps", str(wheel)], cwd=home, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    # Nothing of the checkout may leak in: no PYTHONPATH, no KEYLESS_* settings.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("KEYLESS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = home / "work"
    work.mkdir()
    yield work, env


def test_wheel_ships_the_repositorys_config_and_policy(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "proxy/_data/keyless.yaml" in names
        assert z.read("proxy/_data/keyless.yaml") == (REPO / "keyless.yaml").read_bytes()
        for rego in sorted((REPO / "policies").glob("*.rego")):
            assert z.read(f"proxy/_data/policies/{rego.name}") == rego.read_bytes(), rego.name
        shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("proxy/_data/policies/")}
        assert shipped == {p.name for p in (REPO / "policies").iterdir() if p.is_file()}
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert "License-Expression: Apache-2.0" in meta and any(n.endswith("licenses/LICENSE") for n in names)
        assert "Project-URL: Documentation" in meta and "Classifier: Topic :: Security" in meta


def test_installed_keyless_reports_its_version(installed: tuple[Path, dict[str, str]]) -> None:
    work, env = installed
    out = _run(["keyless", "--version"], cwd=work, timeout=60, env=env)
    from proxy import __version__

    assert out.returncode == 0 and out.stdout.strip() == f"keyless {__version__}", out.stdout + out.stderr
    where = _run(["python", "-c", "import proxy; print(proxy.__file__)"], cwd=work, timeout=60, env=env)
    assert "site-packages" in where.stdout and str(REPO) not in where.stdout


def test_installed_demo_passes(installed: tuple[Path, dict[str, str]]) -> None:
    work, env = installed
    out = _run(["keyless", "demo"], cwd=work, timeout=120, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stdout.rstrip().endswith("demo passed")


def test_installed_init_then_check(installed: tuple[Path, dict[str, str]]) -> None:
    work, env = installed
    out = _run(["keyless", "check"], cwd=work, timeout=60, env=env)
    assert out.returncode == 2 and "keyless init" in out.stderr, out.stderr
    init = _run(["keyless", "init", "starter"], cwd=work, timeout=60, env=env)
    assert init.returncode == 0, init.stderr
    starter = work / "starter" / "policies" / "egress.rego"
    assert starter.read_bytes() == (REPO / "policies" / "egress.rego").read_bytes()
    check = _run(["keyless", "check", "-c", "starter/keyless.yaml"], cwd=work, timeout=60, env=env)
    assert check.returncode == 0 and ": ok (policy revision" in check.stdout, check.stdout + check.stderr
    again = _run(["keyless", "init", "starter"], cwd=work, timeout=60, env=env)
    assert again.returncode == 1 and "not overwriting" in again.stderr
    tests = _run(["keyless", "policy", "test", "starter/policies"], cwd=work, timeout=60, env=env)
    assert tests.returncode == 0 and " 0 failed" in tests.stdout, tests.stdout + tests.stderr


def test_dockerfile_copies_what_the_wheel_force_includes() -> None:
    import re
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = meta["tool"]["hatch"]["build"]["targets"]["wheel"]
    sources = set(wheel["force-include"]) | set(meta["project"]["license-files"])
    docker = (REPO / "Dockerfile").read_text()
    install = docker.index("pip install --no-cache-dir --no-deps .")
    copied = {name for line in re.findall(r"^COPY (.+) \S+$", docker[:install], re.M) for name in line.split()}
    assert sources <= copied, sources - copied
