"""``keyless check -c FILE`` and ``keyless run`` on broken configs: one line per problem, each
naming the key path, a non-zero exit and never a traceback. ``run`` refuses with the same lines.

The real console script runs in a subprocess, exactly as a user would run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.demo import free_port
from tests.harness import REPO

KEYLESS = str(Path(sys.executable).parent / "keyless")


def keyless(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLESS_TEST_")}
    full_env.update(env or {})
    return subprocess.run([KEYLESS, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "secret").write_text("canary-check-secret\n")
    return tmp_path


def good_config(port: int = 0, admin_port: int = 0) -> str:
    return textwrap.dedent(f"""\
        listen:
          address: 127.0.0.1
          port: {port or free_port()}
        admin:
          port: {admin_port or free_port()}
        tls:
          ca_dir: ca
        trust:
          - name: lo
            type: source_ip
            workloads:
              - cidr: 127.0.0.0/8
                id: spiffe://demo.local/billing
        policy:
          dir: policies
        credentials:
          demo-api:
            type: static
            from: file
            file: secret
          workload-jwt:
            type: jwt
        audit:
          path: audit.log
        """)


BROKEN_REGO = 'package keyless.egress\n\ndecision := {"allow": true\n'
TYPO_REGO = ('package keyless.egress\n\ndefault decision := {"allow": false}\n\n'
             'decision := {"allow": strings.lowr(input.request.host) == "x"} if input.request.port == 1\n')

# (case id, config text or a (old, new) edit of the good config, env, expected problem lines)
CASES: list[tuple[str, str | tuple[str, str], dict[str, str], list[str]]] = [
    ("malformed-yaml", "listen: [\n  port: 8080\n", {}, ["malformed YAML"]),
    ("unknown-key", ("  address: 127.0.0.1\n", "  adress: 127.0.0.1\n"), {},
     ["listen.adress: unknown key (did you mean 'address'?)"]),
    ("unknown-top-level-key", ("audit:\n", "audti:\n"), {}, ["audti: unknown key (did you mean 'audit'?)"]),
    ("bad-cidr", ("cidr: 127.0.0.0/8", "cidr: 10.0.0.300/8"), {},
     ["trust[0].workloads[0].cidr: is not a valid CIDR"]),
    ("cidr-host-bits", ("cidr: 127.0.0.0/8", "cidr: 127.0.0.1/8"), {},
     ["trust[0].workloads[0].cidr: is not a valid CIDR"]),
    ("missing-env-secret", ("    from: file\n    file: secret\n", "    from: env\n    env: KEYLESS_TEST_UNSET\n"), {},
     ["credentials.demo-api: environment variable KEYLESS_TEST_UNSET is not set"]),
    ("missing-file-secret", ("file: secret", "file: no-such-secret"), {},
     ["credentials.demo-api: cannot read secret file"]),
    ("secret-with-newline", ("    from: file\n    file: secret\n", "    from: env\n    env: KEYLESS_TEST_CRLF\n"),
     {"KEYLESS_TEST_CRLF": "canary-check-secret\r\nX-Injected: 1"},
     ["credentials.demo-api: secret contains CR, LF or NUL"]),
    ("rego-syntax-error", ("dir: policies", "dir: broken-policies"), {},
     ["policy: ", "broken-policies/egress.rego:4:1: expecting `}`"]),
    # The compiler checks every rule: a misspelt built-in in a branch no request reaches is found.
    ("misspelt-builtin", ("dir: policies", "dir: typo-policy"), {},
     ["policy: typo-policy/egress.rego:5:35: Unknown function: 'strings.lowr'"]),
    ("policy-decision-not-an-object", ("dir: policies", "dir: string-policy"), {},
     ["policy: policy(data.keyless.egress.decision): malformed decision"]),
    ("no-rego-files", ("dir: policies", "dir: empty-policy"), {}, ["policy: ", "no .rego files"]),
    ("verify-upstream-false", ("  ca_dir: ca\n", "  ca_dir: ca\n  verify_upstream: false\n"), {},
     ["tls.verify_upstream: upstream certificates are always verified"]),
    ("unknown-credential-type", ("    type: jwt\n", "    type: jwtt\n"), {},
     ["credentials.workload-jwt.type: must be one of"]),
    ("bad-port", ("  address: 127.0.0.1\n  port: ", "  address: 127.0.0.1\n  port: 9"), {},  # 9 + a port > 65535
     ["listen.port: must be an integer from 0 to 65535"]),
]


def write_case(workdir: Path, spec: str | tuple[str, str]) -> Path:
    if isinstance(spec, tuple):
        text = good_config()
        assert spec[0] in text, spec
        text = text.replace(spec[0], spec[1], 1)
    else:
        text = spec
    (workdir / "broken-policies").mkdir(exist_ok=True)
    (workdir / "broken-policies" / "egress.rego").write_text(BROKEN_REGO)
    (workdir / "string-policy").mkdir(exist_ok=True)
    (workdir / "string-policy" / "egress.rego").write_text('package keyless.egress\n\ndecision := "allow"\n')
    (workdir / "empty-policy").mkdir(exist_ok=True)
    (workdir / "typo-policy").mkdir(exist_ok=True)
    (workdir / "typo-policy" / "egress.rego").write_text(TYPO_REGO)
    cfg = workdir / "keyless.yaml"
    cfg.write_text(text)
    return cfg


def problem_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].endswith("found"), stderr  # "N problem(s) found"
    return lines[:-1]


def assert_problems(out: subprocess.CompletedProcess[str], expected: list[str]) -> list[str]:
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = problem_lines(out.stderr)
    for line in lines:
        assert line.startswith("keyless.yaml"), line  # every line names the file ...
    joined = "\n".join(lines)
    for want in expected:
        assert want in joined, f"{want!r} not in:\n{joined}"
    return lines


@pytest.mark.parametrize(("spec", "env", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_reports_one_line_per_problem(workdir: Path, spec: str | tuple[str, str], env: dict[str, str],
                                            expected: list[str]) -> None:
    write_case(workdir, spec)
    out = keyless("check", "-c", "keyless.yaml", cwd=workdir, env=env)
    lines = assert_problems(out, expected)
    assert len(lines) == 1, lines  # ... and one mistake is one line
    assert "canary-check-secret" not in out.stderr + out.stdout


def test_several_problems_at_once(workdir: Path) -> None:
    text = good_config().replace("  address: 127.0.0.1\n", "  adress: 127.0.0.1\n")
    text = text.replace("cidr: 127.0.0.0/8", "cidr: not-a-cidr")
    text = text.replace("  ca_dir: ca\n", "  ca_dir: ca\n  verify_upstream: false\n")
    text = text.replace("    type: jwt\n", "    type: jwt\n    ttl: 5\n")
    (workdir / "keyless.yaml").write_text(text)
    out = keyless("check", "-c", "keyless.yaml", cwd=workdir)
    lines = assert_problems(out, ["listen.adress: unknown key", "trust[0].workloads[0].cidr:",
                                  "tls.verify_upstream:", "credentials.workload-jwt.ttl:"])
    assert len(lines) == 4, lines
    assert out.stderr.splitlines()[-1] == "4 problems found"


def test_policy_and_secret_problems_together(workdir: Path) -> None:
    write_case(workdir, ("dir: policies", "dir: broken-policies"))
    text = (workdir / "keyless.yaml").read_text().replace("file: secret", "file: gone")
    (workdir / "keyless.yaml").write_text(text)
    out = keyless("check", "-c", "keyless.yaml", cwd=workdir)
    lines = assert_problems(out, ["policy: ", "credentials.demo-api: cannot read secret file"])
    assert len(lines) == 2


@pytest.mark.parametrize("case", ["unknown-key", "missing-env-secret", "rego-syntax-error", "verify-upstream-false",
                                  "policy-decision-not-an-object", "misspelt-builtin"])
def test_run_refuses_with_the_same_messages(workdir: Path, case: str) -> None:
    spec, env = next((c[1], c[2]) for c in CASES if c[0] == case)
    write_case(workdir, spec)
    checked = keyless("check", "-c", "keyless.yaml", cwd=workdir, env=env)
    try:
        ran = keyless("run", "-c", "keyless.yaml", cwd=workdir, env=env, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("keyless run started on a broken config")
    assert ran.returncode != 0
    assert "Traceback" not in ran.stderr
    assert problem_lines(ran.stderr) == problem_lines(checked.stderr)


def test_good_config_passes(workdir: Path) -> None:
    (workdir / "keyless.yaml").write_text(good_config())
    out = keyless("check", "-c", "keyless.yaml", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and out.stderr == ""


def test_quickstart_config_passes(tmp_path: Path) -> None:
    """The shipped keyless.yaml is valid once its demo key exists."""
    shutil.copy(REPO / "keyless.yaml", tmp_path / "keyless.yaml")
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / ".keyless").mkdir()
    (tmp_path / ".keyless" / "demo-api-key").write_text("quickstart-key\n")
    out = keyless("check", "-c", "keyless.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_config_and_secret_problems_in_one_run(workdir: Path) -> None:
    text = good_config().replace("  address: 127.0.0.1\n", "  adress: 127.0.0.1\n")
    (workdir / "keyless.yaml").write_text(text.replace("file: secret", "file: gone"))
    out = keyless("check", "-c", "keyless.yaml", cwd=workdir)
    assert_problems(out, ["listen.adress: unknown key", "credentials.demo-api: cannot read secret file"])
