"""``keyless``: run | check | ca | env | demo | demo-api | policy test | policy eval."""

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
    return 2


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.server import prepare

    try:
        prep = prepare(_load(args.config))
    except ConfigError as e:
        return _problems(e, args.config)
    print(f"{args.config}: ok (policy revision {prep.engine.revision}, "
          f"{len(prep.trust)} trust provider(s), {len(prep.credentials)} credential(s))")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.server import prepare, serve

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mitmproxy").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        prep = prepare(_load(args.config))
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
    from proxy.ca import ensure_ca

    try:
        config = _load(args.config)
    except ConfigError as e:
        return _problems(e, args.config)
    ca = str(ensure_ca(config.tls.ca_dir))
    host = config.listen.address
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard listener is reached on loopback
        host = "127.0.0.1"
    proxy_url = f"http://{host}:{config.listen.port}"
    print("# Route this shell's HTTP(S) clients through Keyless and trust its CA.")
    print("# eval \"$(keyless env)\"")
    pairs = [("HTTP_PROXY", proxy_url), ("HTTPS_PROXY", proxy_url), ("http_proxy", proxy_url),
             ("https_proxy", proxy_url), ("NO_PROXY", ""), ("no_proxy", "")]
    pairs += [(name, ca) for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                                      "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE", "GIT_SSL_CAINFO")]
    for name, value in pairs:
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from proxy.policy.embedded import PolicyLoadError
    from proxy.policy.testing import run_tests

    try:
        results = run_tests(Path(args.dir))
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

    try:
        doc = json.loads(Path(args.input).read_text() if args.input != "-" else sys.stdin.read())
    except (OSError, json.JSONDecodeError) as e:
        print(f"{args.input}: cannot read input JSON ({e})", file=sys.stderr)
        return 2
    try:
        engine = EmbeddedEngine.from_dir(Path(args.dir), args.decision)
        d = engine.decide_sync(doc)
    except PolicyLoadError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 2
    except KeylessError as e:
        print(json.dumps({"error": e.code, "message": e.message}))
        return 1
    print(json.dumps({"allow": d.allow, "reason": d.reason, "credential": d.credential,
                      "params": dict(d.params)}, indent=2))
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

    async def main() -> None:
        await start_demo_api(key, args.jwks, args.address, args.port)
        print(f"demo API on http://{args.address}:{args.port} (needs the key in {key_file} or a Keyless JWT)")
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keyless", description="Egress credential broker.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: keyless.yaml)")
        return sp

    r = with_config(sub.add_parser("run", help="start the proxy"))
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_run)
    with_config(sub.add_parser("check", help="validate config and policies")).set_defaults(func=cmd_check)
    with_config(sub.add_parser("ca", help="print the CA certificate's path")).set_defaults(func=cmd_ca)
    with_config(sub.add_parser("env", help="print shell lines to use Keyless")).set_defaults(func=cmd_env)
    sub.add_parser("demo", help="run a self-contained demonstration").set_defaults(func=cmd_demo)
    d = sub.add_parser("demo-api", help="run the quickstart's API that requires a credential")
    d.add_argument("--address", default="127.0.0.1")
    d.add_argument("--port", type=int, default=9000)
    d.add_argument("--key-file", default=".keyless/demo-api-key")
    d.add_argument("--jwks", default="http://127.0.0.1:8081/jwks.json")
    d.set_defaults(func=cmd_demo_api)

    pol = sub.add_parser("policy", help="policy authoring tools").add_subparsers(dest="policy_command", required=True)
    t = pol.add_parser("test", help="run test_ rules in *_test.rego files")
    t.add_argument("dir", nargs="?", default="policies")
    t.set_defaults(func=cmd_policy_test)
    e = pol.add_parser("eval", help="print the decision for an input document")
    e.add_argument("-i", "--input", required=True, help="input JSON file, or - for stdin")
    e.add_argument("-d", "--dir", default="policies")
    e.add_argument("--decision", default="data.keyless.egress.decision")
    e.set_defaults(func=cmd_policy_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
