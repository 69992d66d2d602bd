"""Keyless benchmark: direct vs bare mitmdump vs Keyless, interleaved, in one run.

    .venv/bin/python bench/run.py                 # full run (make bench)
    .venv/bin/python bench/run.py --smoke         # a few seconds; CI runs this so it cannot rot
    .venv/bin/python bench/run.py --targets direct,mitmdump,keyless-static --scenarios http-c32

Every target in TARGETS is started once (each on its own port), then each round runs every
scenario against every target in turn (rotating the order each round), so machine drift and
neighbours' load fall on all of them alike. Results are medians over rounds; ratios are taken
within a round and then their median reported. Absolute numbers on a shared machine are noise;
the ratios are the result. See docs/benchmarks.md.

To benchmark another configuration (as keyless-oauth2 and keyless-opa do), add one Target to
TARGETS: the Keyless config overrides it needs, and a ``setup`` that starts any stand-in peer.
A target whose config this build of Keyless rejects is skipped with the reason, not failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.ca import ensure_ca  # noqa: E402
from proxy.demo import free_port, make_tls_files  # noqa: E402

BENCH = REPO / "bench"
HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class Env:
    """What every target shares: the upstream's ports and CA, Keyless's CA, a scratch dir."""

    work: Path
    http_port: int
    https_port: int
    upstream_ca: Path
    proxy_ca_dir: Path
    secret_file: Path
    cached_policy: Path  # the default policy wrapped to add cache_ttl (see cached_policy_dir)
    # --compare-tree: the same wrappers around that checkout's own default policy, so a row run
    # from it evaluates the policy (and input) of its own version.
    tree_policies: dict[Path, Path] = field(default_factory=dict)

    @property
    def proxy_ca(self) -> Path:
        return self.proxy_ca_dir / "mitmproxy-ca-cert.pem"


@dataclass(frozen=True)
class Target:
    """One row of the table.

    kind: ``direct`` (no proxy), ``mitmdump`` (bare mitmdump), ``bare`` (bench/bare_master.py:
      Keyless's Master without the Keyless addon) or ``keyless``.
    method/path: the request sent; the default policy (policies/egress.rego) grants
      GET /v1/* with the ``demo-api`` static key and POST /v1/reports* with a minted JWT.
    config: a function of Env returning overrides deep-merged into the base Keyless config.
    setup: optional; starts stand-in peers (an OPA server, a token endpoint) and returns the
      processes to stop at the end.
    """

    name: str
    kind: str
    method: str = "GET"
    path: str = "/v1/bench"
    config: Callable[[Env], dict[str, Any]] = lambda env: {}
    setup: Callable[[Env], list[subprocess.Popen[bytes]]] | None = None
    note: str = ""
    tree: Path | None = None  # run Keyless from another checkout (--compare-tree: before/after)


# Decisions are cached only when the decision carries ``cache_ttl`` or ``cache`` (docs/policy.md).
# The shipped default policy caches for 60 s (its allows with cache.vary); to keep each cost
# visible whatever it sets, the "cached decision" rows wrap it with a rule that forces a strict
# ``cache_ttl``, the uncached rows with one that removes both, so Rego is evaluated on every
# request there, and the keyless-varied-strict row with one that keeps the ttl but drops vary.
# The default policy itself (its vary) is what keyless-varied runs.
CACHED_DECISION = "data.keyless.bench.decision"
UNCACHED_DECISION = "data.keyless.bench_uncached.decision"
STRICT_DECISION = "data.keyless.bench_strict.decision"
WRAPPERS = {
    "bench.rego": """package keyless.bench

import rego.v1

import data.keyless.egress

# The default decision, always cached: the benchmark's cached-decision rows.
decision := object.union(object.remove(egress.decision, {"cache", "cache_ttl"}), {"cache_ttl": 3600})
""",
    "bench_uncached.rego": """package keyless.bench_uncached

import rego.v1

import data.keyless.egress

# The default decision, never cached: Rego runs on every request.
decision := object.remove(egress.decision, {"cache", "cache_ttl"})
""",
    "bench_strict.rego": """package keyless.bench_strict

import rego.v1

import data.keyless.egress

# The default decision cached under the strict key (the path in it): no vary.
decision := object.union(object.remove(egress.decision, {"cache", "cache_ttl"}), {"cache_ttl": 60})
""",
}


def cached_policy_dir(dest: Path, policies: Path = REPO / "policies") -> Path:
    """The default policy plus the wrappers (decision paths above)."""
    shutil.copytree(policies, dest)
    for name, text in WRAPPERS.items():
        (dest / name).write_text(text)
    return dest


def _cached(env: Env) -> dict[str, Any]:
    return {"policy": {"dir": str(env.cached_policy), "decision": CACHED_DECISION}}


def _static_uncached(env: Env) -> dict[str, Any]:
    return {"credentials": {"demo-api": {"type": "static", "from": "file", "file": str(env.secret_file)}},
            "policy": {"dir": str(env.cached_policy), "decision": UNCACHED_DECISION}}


def _static(env: Env) -> dict[str, Any]:
    return {**_static_uncached(env), **_cached(env)}


def _jwt(env: Env) -> dict[str, Any]:
    return {"credentials": {"workload-jwt": {"type": "jwt", "ttl": 300}}, **_cached(env)}


# keyless-varied: "{n}" is replaced per request by the load generators (bench/loadgen.py, wrk_proxy.lua).
VARIED_PATH = "/v1/invoices/{n}"


def _varied(env: Env) -> dict[str, Any]:
    return {**_static_uncached(env), "policy": {"dir": str(env.cached_policy)}}


def _varied_strict(env: Env) -> dict[str, Any]:
    return {**_static_uncached(env), "policy": {"dir": str(env.cached_policy), "decision": STRICT_DECISION}}


def _engine(cfg: dict[str, Any], engine: str) -> dict[str, Any]:
    return {**cfg, "policy": {**cfg.get("policy", {}), "engine": engine}}


def engine_of(env: Env, target: Target) -> str | None:
    """The policy engine a Keyless row runs (its registry name), for the table."""
    if target.kind != "keyless":
        return None
    name = target.config(env).get("policy", {}).get("engine", "embedded")
    if target.tree is not None:
        return f"{name} ({target.tree.name})"
    from proxy.policy.engines import resolve

    return resolve(name).name


def _workers(n: int) -> Callable[[Env], dict[str, Any]]:
    return lambda env: {**_static(env), "listen": {"workers": n}}


def _ready(cmd: list[str], what: str) -> subprocess.Popen[bytes]:
    """Start a stand-in peer that prints ``ready`` once it listens."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        stop(proc)
        raise RuntimeError(f"{what} did not start: {line[:300]!r}")
    return proc


# Ports of the stand-in peers, chosen once per run so that config() and setup() agree.
_PEER_PORTS: dict[str, int] = {}


def _peer_port(name: str) -> int:
    return _PEER_PORTS.setdefault(name, free_port())


def _oauth2(env: Env) -> dict[str, Any]:
    # The default policy grants GET /v1/* the credential named demo-api: here an OAuth2 client.
    return {**_cached(env), "credentials": {"demo-api": {
        "type": "oauth2", "token_url": f"http://127.0.0.1:{_peer_port('token')}/token",
        "client_id": "keyless-bench", "client_secret_file": str(env.secret_file)}}}


def _start_token_endpoint(env: Env) -> list[subprocess.Popen[bytes]]:
    return [_ready([sys.executable, str(BENCH / "token_endpoint.py"), "--port", str(_peer_port("token")),
                    "--client-id", "keyless-bench", "--secret-file", str(env.secret_file)],
                   "bench/token_endpoint.py")]


def _opa(env: Env) -> dict[str, Any]:
    # The default (uncached) decision: every request is one REST call to the stand-in, the cost
    # this row exists to show. 2 s timeout: at c32 the stand-in queues on a shared 2-core box.
    return {**_static_uncached(env), "policy": {
        "engine": "opa", "dir": str(env.cached_policy), "decision": UNCACHED_DECISION, "opa": {
        "url": f"http://127.0.0.1:{_peer_port('opa')}", "timeout_ms": 2000}}}


def _start_opa_standin(env: Env) -> list[subprocess.Popen[bytes]]:
    return [_ready([sys.executable, "-m", "tests.opa_standin", "--policies", str(env.cached_policy),
                    "--port", str(_peer_port("opa"))], "tests/opa_standin.py")]


# The table. Add a row here to benchmark a new configuration; see the module docstring.
TARGETS: list[Target] = [
    Target("direct", "direct", note="load generator straight to the upstream"),
    Target("mitmdump", "mitmdump", note="bare mitmdump, regular mode, Keyless's options, its default addons"),
    Target("mitm-bare", "bare", note="mitmproxy with Keyless's own short addon list and options, no Keyless addon"),
    Target("keyless-static", "keyless", config=_static,
           note="source_ip attestation, embedded Rego (decision cached: cache_ttl), static key from a file, "
                "audit to a file"),
    Target("keyless-uncached", "keyless", config=_static_uncached,
           note="keyless-static with the cache removed from every decision: Rego evaluated every request"),
    Target("keyless-uncached-rvm", "keyless", config=lambda env: _engine(_static_uncached(env), "regorus-rvm"),
           note="keyless-uncached on regorus's RVM (policy.engine: regorus-rvm; not the default: docs/policy.md)"),
    Target("keyless-varied", "keyless", path=VARIED_PATH, config=_varied,
           note="a distinct invoice id per request; the default policy, whose allow varies on "
                "request.path_template: one evaluation serves every id"),
    Target("keyless-varied-strict", "keyless", path=VARIED_PATH, config=_varied_strict,
           note="keyless-varied with vary dropped (cache_ttl, the strict key): every id is a miss"),
    Target("keyless-jwt", "keyless", method="POST", path="/v1/reports/bench", config=_jwt,
           note="as keyless-static, with a minted ES256 JWT (cached per subject and audience)"),
    Target("keyless-oauth2", "keyless", config=_oauth2, setup=_start_token_endpoint,
           note="as keyless-static, with an OAuth2 client-credentials token from bench/token_endpoint.py "
                "(a stand-in), cached"),
    Target("keyless-opa", "keyless", config=_opa, setup=_start_opa_standin,
           note="policy.engine: opa against tests/opa_standin.py (a stand-in for OPA, regopy over REST), "
                "decision not cached: one REST call per request"),
    Target("keyless-static-2w", "keyless", config=_workers(2), note="keyless-static with listen.workers: 2"),
    # A ~4 KiB JSON answer: with the rows above, what scanning a response body for a reflected
    # credential (docs/reflection.md) costs on top of carrying it.
    Target("mitm-bare-4k", "bare", path="/v1/json4k", note="mitm-bare, upstream answers ~4 KiB of JSON"),
    Target("keyless-static-4k", "keyless", path="/v1/json4k", config=_static,
           note="keyless-static, upstream answers ~4 KiB of JSON, scanned for the injected key"),
]


@dataclass(frozen=True)
class Scenario:
    name: str
    tls: bool
    connections: int


SCENARIOS = [Scenario("http-c1", False, 1), Scenario("http-c32", False, 32),
             Scenario("https-c1", True, 1), Scenario("https-c32", True, 32)]
SMOKE_SCENARIOS = [Scenario("http-c4", False, 4), Scenario("https-c4", True, 4)]


# ---------------------------------------------------------------------------------------------
# Processes and /proc


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (Keyless workers are children of the supervisor)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / HZ


def status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Polls the RSS of each process in a tree; reports the largest single process (MB)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.1)

    def sample(self) -> None:
        if self.pid is None:
            return
        tree = proc_tree(self.pid)
        # With workers the supervisor itself is tiny; the figure that matters is per worker.
        workers = tree[1:] or tree
        self.peak_kb = max([self.peak_kb] + [status_kb(p, "VmRSS") for p in workers])

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# Running targets


@dataclass
class Running:
    target: Target
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    skipped: str | None = None


def keyless_config(env: Env, target: Target, port: int) -> dict[str, Any]:
    base: dict[str, Any] = {
        "listen": {"address": "127.0.0.1", "port": port},
        "admin": {"enabled": False},
        "tls": {"ca_dir": str(env.proxy_ca_dir), "upstream_ca": str(env.upstream_ca)},
        "trust": [{"name": "loopback", "type": "source_ip",
                   "workloads": [{"cidr": "127.0.0.0/8", "id": "spiffe://demo.local/billing"}]}],
        "policy": {"dir": str(REPO / "policies")},
        "credentials": {},
        "audit": {"path": str(env.work / f"audit-{target.name}.log")},
    }
    return deep_merge(base, target.config(env))


def start(env: Env, target: Target) -> Running:
    r = Running(target)
    if target.kind == "direct":
        return r
    if target.setup is not None:
        r.extra = target.setup(env)
    r.port = free_port()
    log = env.work / f"{target.name}.log"
    if target.kind == "mitmdump":
        exe = Path(sys.executable).with_name("mitmdump")
        # The same options Keyless sets in proxy/server.py; mitmdump keeps its default addons.
        cmd = [str(exe), "-q", "--mode", "regular", "--listen-host", "127.0.0.1", "--listen-port", str(r.port),
               "--set", f"confdir={env.proxy_ca_dir}", "--set", "connection_strategy=lazy",
               "--set", "upstream_cert=false", "--set", f"ssl_verify_upstream_trusted_ca={env.upstream_ca}"]
    elif target.kind == "bare":
        cmd = [sys.executable, str(BENCH / "bare_master.py"), "--port", str(r.port),
               "--confdir", str(env.proxy_ca_dir), "--upstream-ca", str(env.upstream_ca)]
    else:
        from proxy.config import parse_config
        from proxy.errors import ConfigError

        tree_env = env
        if target.tree is not None and (target.tree / "policies").is_dir():
            if target.tree not in env.tree_policies:
                env.tree_policies[target.tree] = cached_policy_dir(
                    env.work / f"policy-{target.tree.name}", target.tree / "policies")
            tree_env = replace(env, cached_policy=env.tree_policies[target.tree])
        cfg = keyless_config(tree_env, target, r.port)
        cfg_file = env.work / f"{target.name}.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        try:
            parse_config(cfg, cfg_file)
        except ConfigError as e:
            r.skipped = "; ".join(e.problems)
            return r
        cmd = [sys.executable, "-m", "proxy.cli", "run", "-c", str(cfg_file), "--log-level", "warning"]
    with open(log, "wb") as out:
        # ``python -m proxy.cli`` imports the package from the working directory first.
        r.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=target.tree or REPO)
    try:
        wait_port(r.port, r.proc, log)
    except RuntimeError as e:
        if target.tree is None:
            raise
        stop(r.proc)
        r.proc, r.skipped = None, f"does not start from {target.tree}: {str(e).splitlines()[-1][:200]}"
    return r


def measure(env: Env, r: Running, sc: Scenario, duration: float, tool: str) -> dict[str, Any]:
    t = r.target
    proxied = r.port is not None
    upstream_port = env.https_port if sc.tls else env.http_port
    authority = f"127.0.0.1:{upstream_port}"
    body = "{}" if t.method == "POST" else ""
    pids = proc_tree(r.proc.pid) if r.proc is not None else []
    cpu0, wall0 = cpu_seconds(pids), time.perf_counter()
    with RssSampler(r.proc.pid if r.proc else None) as rss:
        if not sc.tls and tool == "wrk":
            url = f"http://127.0.0.1:{r.port if proxied else upstream_port}"
            target = f"http://{authority}{t.path}" if proxied else t.path
            cmd = ["wrk", "-t1", f"-c{sc.connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s",
                   "-s", str(BENCH / "wrk_proxy.lua"), url, "--", t.method, target, authority, body]
        else:
            cmd = [sys.executable, str(BENCH / "loadgen.py"), "--target-host", "127.0.0.1",
                   "--target-port", str(upstream_port), "--connections", str(sc.connections),
                   "--duration", str(duration), "--method", t.method, "--path", t.path, "--body", body]
            if sc.tls:
                cmd += ["--tls", "--cafile", str(env.proxy_ca if proxied else env.upstream_ca)]
            if proxied:
                cmd += ["--proxy", f"127.0.0.1:{r.port}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    wall = time.perf_counter() - wall0
    cpu = cpu_seconds(pids) - cpu0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({out.returncode}): {out.stderr[-1500:]}")
    res: dict[str, Any] = json.loads(lines[-1])
    res["errors"] = res.get("errors", 0) + res.pop("non2xx", 0)
    res["rps"] = round(res["requests"] / res["seconds"], 1) if res["seconds"] else 0.0
    res.pop("statuses", None)
    res["cpu"] = round(cpu / wall, 3) if proxied else None  # cores used by the proxy (1.0 = one core)
    res["rss_mb"] = round(rss.peak_kb / 1024, 1) if proxied else None
    return res


def hold_rss(env: Env, r: Running, n: int) -> dict[str, Any]:
    """RSS of the proxy (largest worker) with ``n`` idle keep-alive TLS connections open."""
    assert r.port is not None and r.proc is not None
    cmd = [sys.executable, str(BENCH / "loadgen.py"), "--target-host", "127.0.0.1", "--target-port",
           str(env.https_port), "--tls", "--cafile", str(env.proxy_ca), "--proxy", f"127.0.0.1:{r.port}",
           "--method", r.target.method, "--path", r.target.path, "--hold", str(n),
           "--body", "{}" if r.target.method == "POST" else ""]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    try:
        line = p.stdout.readline()
        held = json.loads(line)["held"] if line.startswith("{") else 0
        time.sleep(0.5)
        rss = RssSampler(r.proc.pid)
        rss.sample()
        return {"connections": n, "held": held, "rss_mb": round(rss.peak_kb / 1024, 1)}
    finally:
        p.stdin.close()
        p.wait(30)


# ---------------------------------------------------------------------------------------------
# Report


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarise(rounds: list[dict[str, dict[str, dict[str, Any]]]], names: list[str],
              scenarios: list[Scenario]) -> dict[str, dict[str, dict[str, Any]]]:
    """Median per target and scenario; ratios taken within each round, then their median."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in scenarios:
        out[sc.name] = {}
        for name in names:
            cells = [rd[sc.name][name] for rd in rounds if name in rd.get(sc.name, {})]
            if not cells:
                continue
            row: dict[str, Any] = {k: median([c[k] for c in cells])
                                   for k in ("rps", "p50_ms", "p99_ms", "cpu", "rss_mb")}
            row["errors"] = sum(c["errors"] for c in cells)
            row["requests"] = sum(c["requests"] for c in cells)
            # The spread over rounds (min-max), beside the medians.
            row["rps_min"], row["rps_max"] = min(c["rps"] for c in cells), max(c["rps"] for c in cells)
            for base in ("mitmdump", "mitm-bare", "direct", "keyless-static"):
                pairs = [(rd[sc.name][name], rd[sc.name][base]) for rd in rounds
                         if name in rd.get(sc.name, {}) and base in rd.get(sc.name, {})]
                if not pairs or name == base:
                    continue
                ratios = [a["rps"] / b["rps"] for a, b in pairs if b["rps"]]
                row[f"rps_x_{base}"] = median(ratios)
                if ratios:
                    row[f"rps_x_{base}_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
                row[f"p50_plus_{base}_ms"] = median([a["p50_ms"] - b["p50_ms"] for a, b in pairs])
                row[f"p99_plus_{base}_ms"] = median([a["p99_ms"] - b["p99_ms"] for a, b in pairs])
            out[sc.name][name] = row
    return out


def targets_check(summary: dict[str, dict[str, dict[str, Any]]], hold: dict[str, Any],
                  scaling: float | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
    def get(sc: str, name: str, key: str) -> float | None:
        v: float | None = summary.get(sc, {}).get(name, {}).get(key)
        return v

    checks = [
        ("HTTP c32 throughput >= 0.85 x mitmdump", get("http-c32", "keyless-static", "rps_x_mitmdump"), ">=", 0.85),
        ("HTTP c1 added p50 over mitmdump <= 0.3 ms", get("http-c1", "keyless-static", "p50_plus_mitmdump_ms"),
         "<=", 0.3),
        ("HTTP c1 added p99 over mitmdump <= 1 ms", get("http-c1", "keyless-static", "p99_plus_mitmdump_ms"),
         "<=", 1.0),
        ("(stricter) HTTP c32 throughput >= 0.85 x mitm-bare",
         get("http-c32", "keyless-static", "rps_x_mitm-bare"), ">=", 0.85),
        ("(stricter) HTTP c1 added p50 over mitm-bare <= 0.3 ms",
         get("http-c1", "keyless-static", "p50_plus_mitm-bare_ms"), "<=", 0.3),
        ("(stricter) HTTP c1 added p99 over mitm-bare <= 1 ms",
         get("http-c1", "keyless-static", "p99_plus_mitm-bare_ms"), "<=", 1.0),
        ("HTTPS c1 keep-alive added p50 over direct <= 2 ms",
         get("https-c1", "keyless-static", "p50_plus_direct_ms"), "<=", 2.0),
        ("2 workers >= 1.6 x 1 worker (HTTP c32 rps)", scaling, ">=", 1.6),
        *[(f"{row} {sc} throughput >= 0.9 x mitm-bare", get(sc, row, "rps_x_mitm-bare"), ">=", 0.9)
          for row in ("keyless-uncached", "keyless-varied") for sc in ("http-c32", "https-c32")],
        *[(f"{row} {sc} added p50 over mitm-bare <= 0.3 ms", get(sc, row, "p50_plus_mitm-bare_ms"), "<=", 0.3)
          for row in ("keyless-uncached", "keyless-varied") for sc in ("http-c1", "https-c1")],
        ("peak RSS with 1,000 keep-alive connections <= 150 MB per worker",
         hold.get("keyless-static", {}).get("rss_mb") if hold.get("keyless-static", {}).get("connections", 0) >= 1000
         else None, "<=", 150.0),
    ]
    out = []
    for label, value, op, limit in checks:
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append({"target": label, "value": value, "limit": limit, "met": met})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Run {result['started']} on {result['machine']}; {result['rounds']} round(s) of "
             f"{result['duration']} s per cell; medians over rounds, ratios within a round.", ""]
    if result.get("load"):
        lines += ["Load average (1 min) per round: " + ", ".join(
            f"round {x['round']} {x['load_start']} -> {x['load_end']}" for x in result["load"]), ""]
    engines = result.get("engines", {})
    if engines:
        lines += ["Policy engine per row: " + ", ".join(f"{n} {e}" for n, e in engines.items()), ""]
    for sc, rows in result["summary"].items():
        lines += [f"### {sc}", "",
                  "| target | rps | p50 ms | p99 ms | x mitmdump rps | +p50 vs mitmdump ms | x bare rps "
                  "| x bare range | +p50 vs bare ms | x direct rps | +p50 vs direct ms | proxy CPU (cores) "
                  "| peak RSS MB | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            def f(k: str, row: dict[str, Any] = row) -> str:
                v = row.get(k)
                return "" if v is None else f"{v:g}"
            spread = row.get("rps_x_mitm-bare_range")
            spread_text = f"{spread[0]:g}-{spread[1]:g}" if spread else ""
            lines.append(f"| {name} | {f('rps')} | {f('p50_ms')} | {f('p99_ms')} | {f('rps_x_mitmdump')} "
                         f"| {f('p50_plus_mitmdump_ms')} | {f('rps_x_mitm-bare')} | {spread_text} "
                         f"| {f('p50_plus_mitm-bare_ms')} "
                         f"| {f('rps_x_direct')} | {f('p50_plus_direct_ms')} "
                         f"| {f('cpu')} | {f('rss_mb')} | {row['errors']} |")
        lines.append("")
    if result["hold"]:
        lines += ["### idle keep-alive connections", "", "| target | connections held | RSS MB (largest process) |",
                  "|---|---:|---:|"]
        lines += [f"| {n} | {h['held']}/{h['connections']} | {h['rss_mb']} |" for n, h in result["hold"].items()]
        lines.append("")
    if result["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{n} ({why})" for n, why in result["skipped"].items()), ""]
    lines += ["### targets", "", "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for c in result["targets"]:
        met = "n/a" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['target']} | {'' if c['value'] is None else c['value']} | {c['limit']} | {met} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(work: Path) -> Iterator[tuple[Env, subprocess.Popen[bytes]]]:
    tls = work / "upstream"
    tls.mkdir(parents=True)
    ca, cert, key = make_tls_files(tls)
    secret = work / "demo-api-key"
    secret.write_text("bench-static-secret-0123456789\n")
    os.chmod(secret, 0o600)
    env = Env(work, free_port(), free_port(), ca, work / "ca", secret, cached_policy_dir(work / "policy-cached"))
    ensure_ca(env.proxy_ca_dir)  # once, before any proxy starts, so none of them races to create it
    up = subprocess.Popen([sys.executable, str(BENCH / "upstream.py"), "--http-port", str(env.http_port),
                           "--https-port", str(env.https_port), "--cert", str(cert), "--key", str(key)],
                          stdout=subprocess.PIPE)
    try:
        assert up.stdout is not None and up.stdout.readline().strip() == b"ready"
        yield env, up
    finally:
        stop(up)


def main() -> int:
    p = argparse.ArgumentParser(description="Keyless benchmark harness")
    p.add_argument("--smoke", action="store_true", help="one short round of every target: proves the harness works")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    p.add_argument("--targets", help="comma-separated target names (default: all)")
    p.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    p.add_argument("--hold", type=int, default=1000, help="idle keep-alive connections for the RSS check (0: skip)")
    p.add_argument("--compare-tree", type=Path, metavar="DIR",
                   help="also run every Keyless target from this checkout (e.g. `git worktree add /tmp/base main`), "
                        "as NAME@base, interleaved with the rest: before/after in one run")
    p.add_argument("--out", type=Path, help="directory for results.json and results.md (default: bench/results/<time>)")
    args = p.parse_args()

    scenarios = SMOKE_SCENARIOS if args.smoke else SCENARIOS
    if args.scenarios:
        known = {s.name: s for s in SCENARIOS + SMOKE_SCENARIOS}
        scenarios = [known[n] for n in args.scenarios.split(",")]
    if args.smoke:
        args.rounds, args.duration, args.hold = 1, 1.0, min(args.hold, 20)
    targets = TARGETS if not args.targets else [t for t in TARGETS if t.name in args.targets.split(",")]
    if args.compare_tree:
        tree = args.compare_tree.resolve()
        targets = targets + [replace(t, name=f"{t.name}@base", tree=tree, note=f"{t.note} (from {tree})")
                             for t in targets if t.kind == "keyless"]
    tool = "wrk" if shutil.which("wrk") else "loadgen"
    if tool != "wrk":
        print("wrk not found: plain HTTP is driven by bench/loadgen.py instead", file=sys.stderr)
    soft, hard = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
    __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_dir = args.out or BENCH / "results" / started.replace(":", "")
    with tempfile.TemporaryDirectory(prefix="keyless-bench-") as tmp, environment(Path(tmp)) as (env, _up):
        running: list[Running] = []
        try:
            for t in targets:
                running.append(start(env, t))
            live = [r for r in running if r.skipped is None]
            for r in running:
                if r.skipped:
                    print(f"skipped {r.target.name}: {r.skipped}", file=sys.stderr)
            rounds: list[dict[str, dict[str, dict[str, Any]]]] = []
            loads: list[dict[str, float]] = []
            for i in range(args.rounds):
                rd: dict[str, dict[str, dict[str, Any]]] = {}
                load_before = os.getloadavg()[0]
                for sc in scenarios:
                    rd[sc.name] = {}
                    order = live[i % len(live):] + live[:i % len(live)]
                    for r in order:
                        rd[sc.name][r.target.name] = res = measure(env, r, sc, args.duration, tool)
                        print(f"round {i + 1} {sc.name:9} {r.target.name:18} {res['rps']:9.1f} rps "
                              f"p50 {res['p50_ms']:7.3f} p99 {res['p99_ms']:7.3f} errors {res['errors']}",
                              file=sys.stderr)
                rounds.append(rd)
                # The 1-minute load average around each round: on a shared machine, the round
                # whose neighbours were busiest is visible, and the spread below says how much it moved.
                loads.append({"round": i + 1, "load_start": round(load_before, 2),
                              "load_end": round(os.getloadavg()[0], 2)})
                print(f"round {i + 1} load {loads[-1]['load_start']} -> {loads[-1]['load_end']}", file=sys.stderr)
            hold: dict[str, Any] = {}
            if args.hold:
                for r in live:
                    if r.target.name in ("mitmdump", "mitm-bare", "keyless-static", "keyless-static@base"):
                        hold[r.target.name] = hold_rss(env, r, args.hold)
        finally:
            for r in running:
                if r.proc is not None:
                    stop(r.proc)
                for extra in r.extra:
                    stop(extra)
        names = [r.target.name for r in live]
        summary = summarise(rounds, names, scenarios)
        # Per-round ratio of 2 workers to 1, then the median (as for every other ratio).
        scaling = summary.get("http-c32", {}).get("keyless-static-2w", {}).get("rps_x_keyless-static")
        result = {
            "started": started, "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
            "rounds": args.rounds, "duration": args.duration, "http_tool": tool,
            "targets_run": {r.target.name: r.target.note for r in live},
            "skipped": {r.target.name: r.skipped for r in running if r.skipped},
            "summary": summary, "hold": hold, "workers_scaling_http": scaling, "load": loads,
            "engines": {r.target.name: e for r in live if (e := engine_of(env, r.target)) is not None},
            "targets": targets_check(summary, hold, scaling), "raw": rounds,
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / "results.md").write_text(md)
    print(md)
    print(f"results in {out_dir}", file=sys.stderr)
    bad = [f"{sc}/{n}" for sc, rows in summary.items() for n, row in rows.items()
           if row["errors"] or not row["requests"]]
    bad += [f"hold/{n}" for n, h in hold.items() if h["held"] < h["connections"]]
    if bad:
        print(f"errors or no requests in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
