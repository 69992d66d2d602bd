"""``keyless``: run | check | init | ca | env | iptables | injector | demo | demo-api | learn |
policy test | eval | explain | replay."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import sys
from pathlib import Path

from proxy.config import Config, load_config
from proxy.errors import ConfigError

DEFAULT_CONFIG = "keyless.yaml"


def _load(path: str) -> Config:
    return load_config(Path(path))


def _problems(e: ConfigError, path: str) -> int:
    for p in e.problems:
        print(f"{path}: {p}" if not p.startswith(path) else p, file=sys.stderr)
    print(f"{len(e.problems)} problem{'s' if len(e.problems) != 1 else ''} found", file=sys.stderr)
    if path == DEFAULT_CONFIG and not Path(path).exists():
        # The first thing a new user runs, outside a checkout: say how to get a config.
        print("no keyless.yaml here: `keyless init` writes a starter config and policy to edit "
              "(or pass -c PATH)", file=sys.stderr)
    return 2


def cmd_init(args: argparse.Namespace) -> int:
    from proxy.assets import init_files

    target = Path(args.dir)
    try:
        written = init_files(target, force=args.force)
    except FileExistsError as e:
        print(f"keyless init: not overwriting {e} (--force replaces them)", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")  # a path only: the demo key's value is never printed
    config = shlex.quote(str(target / "keyless.yaml"))
    print(f"next: edit them, then `keyless check -c {config}` and `keyless run -c {config}`")
    return 0


def listen_problems(config: Config) -> list[str]:
    """The proxy and admin ports ``run`` would fail to bind right now (in use, bad address)."""
    from proxy.ports import bind_problem

    checks = [("listen.port", config.listen.address, config.listen.port)]
    if config.admin.enabled:
        checks.append(("admin.port", config.admin.address, config.admin.port))
    reuse = config.listen.workers > 1
    return [p for key, host, port in checks if (p := bind_problem(key, host, port, reuse_port=reuse))]


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.server import load_and_prepare

    try:
        prep = load_and_prepare(Path(args.config))
        ports = listen_problems(prep.config)
        if ports:
            raise ConfigError(ports)
    except ConfigError as e:
        return _problems(e, args.config)
    print(f"{args.config}: ok (policy revision {prep.engine.revision}, "
          f"{len(prep.trust)} trust provider(s), {len(prep.credentials)} credential(s))")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.server import load_and_prepare, serve

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_format == "json":
        from proxy.telemetry import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    logging.getLogger("mitmproxy").setLevel(max(logging.WARNING, logging.getLogger().level))
    # hpack and h2 log every HTTP/2 header they encode or decode at debug level: that would print
    # the app's Authorization and the injected credential into the log.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # botocore logs request and response bodies (secret values) at debug level.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    try:
        prep = load_and_prepare(Path(args.config))
        if prep.config.listen.workers > 1:
            from proxy.workers import run_workers

            return run_workers(prep)
        return asyncio.run(serve(prep))
    except ConfigError as e:
        return _problems(e, args.config)
    except KeyboardInterrupt:
        return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from proxy.ca import ensure_ca

    try:
        config = _load(args.config)
    except ConfigError as e:
        return _problems(e, args.config)
    print(ensure_ca(config.tls.ca_dir))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from proxy import clientenv
    from proxy.ca import ensure_ca

    if args.unset:
        # NO_PROXY stays: it was the user's before `keyless env` kept it, and is theirs after.
        names = clientenv.PROXY_VARS + clientenv.CA_VARS + clientenv.OTHER_VARS
        print(clientenv.render_unset(names, args.shell), end="")
        return 0
    if args.check:
        from proxy.selfcheck import check

        # Checks this shell's environment, as its clients will see it (run after the eval).
        failed = False
        for scheme in ("http", "https"):
            result = check(scheme, os.environ)
            print(f"{'ok' if result.ok else 'FAILED'}: {result.message}", file=sys.stdout if result.ok else sys.stderr)
            failed |= not result.ok
        return 1 if failed else 0
    try:
        config = _load(args.config)
    except ConfigError as e:
        return _problems(e, args.config)
    ca = ensure_ca(config.tls.ca_dir)
    host, port = config.listen.address, config.listen.port
    if args.port is not None:
        port = args.port
    elif port == 0:
        from proxy.ports import STATE_FILE, read_state

        bound = read_state(config.tls.ca_dir)
        if bound is None:
            print(f"{args.config}: listen.port is 0 and no running Keyless recorded its port in "
                  f"{config.tls.ca_dir / STATE_FILE}: start `keyless run` first, or pass --port", file=sys.stderr)
            return 2
        host, port = bound.proxy_host, bound.proxy_port
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard listener is reached on loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    proxy_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    bundle = clientenv.write_bundle(config.tls.ca_dir / clientenv.BUNDLE_NAME, ca, clientenv.system_bundle())
    pairs = clientenv.client_env(proxy_url, bundle, os.environ, args.no_proxy)
    bypass = clientenv.no_proxy(os.environ, args.no_proxy)
    entries = bypass.split(",")
    if "*" in entries:
        print("keyless env: NO_PROXY contains '*': every client will bypass Keyless", file=sys.stderr)
    if loopback := [e for e in entries if e in ("localhost", ".localhost", "127.0.0.1", "127.0.0.0/8", "::1")]:
        print(f"keyless env: NO_PROXY has {','.join(loopback)}: calls to it (the quickstart's demo API) "
              "bypass Keyless; unset NO_PROXY first to proxy them", file=sys.stderr)
    evals = {"sh": 'eval "$(keyless env)"', "fish": "keyless env --shell fish | source",
             "powershell": "keyless env --shell powershell | Invoke-Expression"}
    print("# Route this shell's HTTP(S) clients through Keyless and trust its CA (docs/clients.md).")
    print(f"# {evals[args.shell]}   then: keyless env --check   undo: keyless env --unset")
    print(clientenv.render(pairs, args.shell), end="")
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from proxy.policy.embedded import PolicyLoadError
    from proxy.policy.testing import run_tests

    try:
        results = run_tests(Path(args.dir), args.engine)
    except PolicyLoadError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 2
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'} {r.name}{'' if r.passed else ': ' + r.detail}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_policy_eval(args: argparse.Namespace) -> int:
    from proxy.errors import KeylessError
    from proxy.policy.embedded import EmbeddedEngine, PolicyLoadError
    from proxy.policy.result import decision_document

    try:
        doc = json.loads(Path(args.input).read_text() if args.input != "-" else sys.stdin.read())
    except (OSError, json.JSONDecodeError) as e:
        print(f"{args.input}: cannot read input JSON ({e})", file=sys.stderr)
        return 2
    try:
        engine = EmbeddedEngine.from_dir(Path(args.dir), args.decision, args.engine)
        d = engine.decide_sync(doc)
    except PolicyLoadError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 2
    except KeylessError as e:
        print(json.dumps({"error": e.code, "message": e.message}))
        return 1
    print(json.dumps(decision_document(d), indent=2))
    return 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from proxy.policy.bundle import read_bundle_archive
    from proxy.policy.embedded import PolicyLoadError, read_policy_dir
    from proxy.policy.explain import explain

    try:
        doc = json.loads(Path(args.input).read_text() if args.input != "-" else sys.stdin.read())
    except (OSError, json.JSONDecodeError) as e:
        print(f"{args.input}: cannot read input JSON ({e})", file=sys.stderr)
        return 2
    where = Path(args.dir)
    try:
        source = read_bundle_archive(where.read_bytes(), where.name) if where.is_file() else read_policy_dir(where)
        ex = explain(source, args.decision, doc)
    except (PolicyLoadError, ValueError) as e:
        for p in getattr(e, "problems", [str(e)]):
            print(p, file=sys.stderr)
        return 2
    print(f"{args.decision} (revision {source.revision}):")
    print(json.dumps(ex.decision, indent=2) if ex.defined else "undefined (Keyless denies)")
    if ex.chosen is not None:
        print(f"\nproduced by {ex.chosen.where}: {ex.chosen.head}" + (f" if {{ {_one_line(ex.chosen.body)} }}"
                                                                         if ex.chosen.body else ""))
    print("\ndefinitions, in evaluation order:")
    for b, truth in ex.tried:
        state = ("default" if b.default else "not reached" if truth is None
                 else "applies" if b.body is None else "body true" if truth else "body false")
        mark = "  <- chosen" if b is ex.chosen else ""
        print(f"  {b.where:<28} {state:<12} {_one_line(b.head)[:70]}{mark}")
    if ex.rules:
        print("\nother rules of the package, for this input:")
        for name, value in ex.rules.items():
            print(f"  {name} = {_one_line(json.dumps(value))[:200]}")
    return 0


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def cmd_iptables(args: argparse.Namespace) -> int:
    from proxy import iptables

    try:
        ports = iptables.parse_ports(args.ports)
    except ValueError as e:
        print(f"--ports: {e}", file=sys.stderr)
        return 2
    opts = iptables.RuleOptions(
        proxy_port=args.proxy_port, uid=None if args.uid < 0 else args.uid, gid=args.gid, ports=ports,
        gateway=args.gateway, sources=tuple(args.source), reject_quic=not args.allow_quic)
    ipv6 = {"on": True, "off": False, "auto": iptables.ipv6_enabled()}[args.ipv6]
    if args.ipv6 == "off" and iptables.ipv6_enabled():
        print("IPv6 is enabled in this network namespace: --ipv6 off would leave it unproxied", file=sys.stderr)
        return 1
    if not args.apply:
        print(iptables.script(opts, ipv6), end="")
        return 0
    try:
        done = iptables.apply(opts, ipv6)
    except iptables.ApplyError as e:
        print(f"keyless iptables: {e}", file=sys.stderr)
        return 1
    print(f"keyless iptables: {len(done)} rule(s) installed (IPv6 {'covered' if ipv6 else 'disabled'})")
    return 0


def cmd_injector(args: argparse.Namespace) -> int:
    from proxy.injector import Options, serve

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = Options(image=args.image, config_map=args.config_map, proxy_port=args.proxy_port,
                       admin_port=args.admin_port, ports=args.ports)
    for path in (args.tls_cert, args.tls_key):
        if not Path(path).is_file():
            print(f"keyless injector: file not found: {path}", file=sys.stderr)
            return 2
    try:
        asyncio.run(serve(defaults, args.tls_cert, args.tls_key, args.address, args.port))
    except OSError as e:
        print(f"keyless injector: cannot listen on {args.address}:{args.port} ({e.strerror})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return asyncio.run(run_demo())


def cmd_demo_api(args: argparse.Namespace) -> int:
    from proxy.demoapi import start_demo_api

    key_file = Path(args.key_file)
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(24) + "\n")
        os.chmod(key_file, 0o600)
    key = key_file.read_text().strip()

    tls = None
    if args.tls_dir:
        # A throwaway CA and certificate for --tls-host, made once; Keyless trusts the CA
        # (tls.upstream_ca), so the client can call the API over HTTPS through Keyless.
        import ssl

        from proxy.demo import make_tls_files

        tls_dir = Path(args.tls_dir)
        cert, tls_key = tls_dir / "upstream.pem", tls_dir / "upstream-key.pem"
        if not cert.exists():
            tls_dir.mkdir(parents=True, exist_ok=True)
            make_tls_files(tls_dir, (args.tls_host,))
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, tls_key)

    async def main() -> None:
        # With --tls-port, HTTP stays on --port and HTTPS is added; else --port speaks TLS if asked.
        both = tls is not None and args.tls_port is not None
        await start_demo_api(key, args.jwks, args.address, args.port, None if both else tls)
        urls = [f"{'https' if tls and not both else 'http'}://{args.address}:{args.port}"]
        if both:
            await start_demo_api(key, args.jwks, args.address, args.tls_port, tls)
            urls.append(f"https://{args.address}:{args.tls_port}")
        print(f"demo API on {' and '.join(urls)} (needs the key in {key_file} or a Keyless JWT)")
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def parser() -> argparse.ArgumentParser:
    from proxy.assets import version

    p = argparse.ArgumentParser(prog="keyless", description="Egress credential broker.")
    p.add_argument("--version", action="version", version=f"keyless {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: keyless.yaml)")
        return sp

    r = with_config(sub.add_parser("run", help="start the proxy"))
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.add_argument("--log-format", default="text", choices=["text", "json"])
    r.set_defaults(func=cmd_run)
    with_config(sub.add_parser("check", help="validate config and policies")).set_defaults(func=cmd_check)
    i = sub.add_parser("init", help="write a starter keyless.yaml and policies/ to edit")
    i.add_argument("dir", nargs="?", default=".", help="where to write them (default: here)")
    i.add_argument("--force", action="store_true", help="overwrite existing files")
    i.set_defaults(func=cmd_init)
    with_config(sub.add_parser("ca", help="print the CA certificate's path")).set_defaults(func=cmd_ca)
    env = with_config(sub.add_parser("env", help="print shell lines to use Keyless (docs/clients.md)"))
    env.add_argument("--shell", choices=["sh", "fish", "powershell"], default="sh",
                     help="syntax of the lines (sh: bash, zsh, dash)")
    env.add_argument("--unset", action="store_true", help="print the lines that undo it")
    env.add_argument("--check", action="store_true",
                     help="prove this shell's clients go through Keyless (a request only Keyless answers)")
    env.add_argument("--port", type=int, help="the proxy port, when listen.port is 0 (default: the running one's)")
    env.add_argument("--no-proxy", action="append", default=[], metavar="HOST",
                     help="add HOST to NO_PROXY (repeatable; the current NO_PROXY is kept)")
    env.set_defaults(func=cmd_env)
    sub.add_parser("demo", help="run a self-contained demonstration").set_defaults(func=cmd_demo)
    inj = sub.add_parser("injector", help="serve the Kubernetes sidecar-injection webhook (docs/deployment.md)")
    inj.add_argument("--tls-cert", default="/etc/keyless-injector/tls/tls.crt", help="serving certificate (PEM)")
    inj.add_argument("--tls-key", default="/etc/keyless-injector/tls/tls.key", help="its private key (PEM)")
    inj.add_argument("--address", default="0.0.0.0", help="listen address (0.0.0.0)")  # noqa: S104
    inj.add_argument("--port", type=int, default=8443, help="listen port (8443)")
    inj.add_argument("--image", default="keyless:0.1.0", help="Keyless image injected (keyless.dev/image overrides)")
    inj.add_argument("--config-map", default="keyless", help="ConfigMap with keyless.yaml and egress.rego")
    inj.add_argument("--proxy-port", type=int, default=15001, help="sidecar's transparent listener (15001)")
    inj.add_argument("--admin-port", type=int, default=15021, help="sidecar's admin listener (15021)")
    inj.add_argument("--ports", default="80,443", help="outbound TCP ports redirected (80,443)")
    inj.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    inj.set_defaults(func=cmd_injector)
    ipt = sub.add_parser("iptables", help="print (or --apply) the netfilter rules for a sidecar or gateway")
    ipt.add_argument("--apply", action="store_true", help="install the rules instead of printing them")
    ipt.add_argument("--gateway", action="store_true", help="rules for a gateway that receives other hosts' traffic")
    ipt.add_argument("--proxy-port", type=int, default=15001, help="Keyless's transparent listener (15001)")
    ipt.add_argument("--uid", type=int, default=10001, help="Keyless's uid, never redirected (-1: none)")
    ipt.add_argument("--gid", type=int, default=None, help="also exclude this gid")
    ipt.add_argument("--ports", default="80,443", help="TCP ports to redirect, or 'all' (80,443)")
    ipt.add_argument("--source", action="append", default=[], help="gateway: client CIDR to redirect (repeatable)")
    ipt.add_argument("--ipv6", choices=["auto", "on", "off"], default="auto",
                     help="cover IPv6 (auto: when enabled in this network namespace)")
    ipt.add_argument("--allow-quic", action="store_true", help="do not reject UDP 443")
    ipt.set_defaults(func=cmd_iptables)
    d = sub.add_parser("demo-api", help="run the quickstart's API that requires a credential")
    d.add_argument("--address", default="127.0.0.1")
    d.add_argument("--port", type=int, default=9000)
    d.add_argument("--key-file", default=".keyless/demo-api-key")
    d.add_argument("--jwks", default="http://127.0.0.1:8081/jwks.json")
    d.add_argument("--tls-dir", help="serve HTTPS with a CA and certificate made (once) in this directory")
    d.add_argument("--tls-host", default="localhost", help="the name the certificate is for (with --tls-dir)")
    d.add_argument("--tls-port", type=int, help="with --tls-dir: HTTPS on this port, plain HTTP stays on --port")
    d.set_defaults(func=cmd_demo_api)

    pol = sub.add_parser("policy", help="policy authoring tools").add_subparsers(dest="policy_command", required=True)
    t = pol.add_parser("test", help="run test_ rules in *_test.rego files")
    t.add_argument("dir", nargs="?", default="policies")
    t.add_argument("--engine", default="embedded", choices=_embedded_engines(),
                   help="the engine whose decisions vary_samples are checked on (tests run on its test engine)")
    t.set_defaults(func=cmd_policy_test)
    e = pol.add_parser("eval", help="print the decision for an input document")
    e.add_argument("-i", "--input", required=True, help="input JSON file, or - for stdin")
    e.add_argument("-d", "--dir", default="policies")
    e.add_argument("--decision", default="data.keyless.egress.decision")
    e.add_argument("--engine", default="embedded", choices=_embedded_engines())
    e.set_defaults(func=cmd_policy_eval)
    x = pol.add_parser("explain", help="show which rule definition produced the decision for an input")
    x.add_argument("-i", "--input", required=True, help="input JSON file, or - for stdin")
    x.add_argument("-d", "--dir", default="policies", help="policy directory or bundle.tar.gz")
    x.add_argument("--decision", default="data.keyless.egress.decision")
    x.set_defaults(func=cmd_policy_explain)
    from proxy.audit.cli import add_commands

    add_commands(sub, DEFAULT_CONFIG)
    # keyless learn, keyless policy replay (docs/learning.md); keyless discover, keyless report
    # (docs/governance.md)
    from proxy.governance.cli import add_commands as add_governance
    from proxy.governance.report_cli import add_commands as add_report

    add_governance(sub, pol, DEFAULT_CONFIG)
    add_report(sub, DEFAULT_CONFIG)
    from proxy.shared.cli import add_commands as add_shared_commands

    add_shared_commands(sub, DEFAULT_CONFIG)
    return p


def _embedded_engines() -> list[str]:
    from proxy.policy.engines import NAMES, resolve

    return [n for n in NAMES if resolve(n).compile is not None]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
