"""``keyless learn`` and ``keyless policy replay`` (docs/learning.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _logs(args: argparse.Namespace) -> list[Path] | None:
    if args.logs:
        return [Path(p) for p in args.logs]
    from proxy.config import load_config
    from proxy.errors import ConfigError

    try:
        config = load_config(Path(args.config))
    except ConfigError as e:
        print(f"{args.config}: {e.problems[0]} (or name the audit logs to read)", file=sys.stderr)
        return None
    return [Path(config.audit.path)]


def cmd_learn(args: argparse.Namespace) -> int:
    from proxy.governance.auditlog import AuditLogError, read_entries
    from proxy.governance.learn import as_json, emit, learn, report, summary
    from proxy.governance.templates import Templater

    try:
        templater = Templater.with_patterns(args.id_pattern)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    logs = _logs(args)
    if logs is None:
        return 2
    try:
        learned = learn(read_entries(logs), templater)
    except AuditLogError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(as_json(learned), indent=2))
    else:
        print(report(learned))
    if args.emit:
        try:
            written = emit(learned, Path(args.emit), force=args.force)
        except (ValueError, FileExistsError) as e:
            print(f"keyless learn: {e}", file=sys.stderr)
            return 1
        out = sys.stderr if args.format == "json" else sys.stdout
        print(f"wrote {', '.join(str(p) for p in written)} ({summary(learned)})", file=out)
        print(f"next: review {Path(args.emit) / 'data.json'}, then `keyless policy test {args.emit}`", file=out)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from proxy.governance.auditlog import AuditLogError, read_entries
    from proxy.governance.replay import load_candidate, render, replay
    from proxy.policy.embedded import PolicyLoadError

    try:
        engine = load_candidate(Path(args.policy), args.decision, args.engine)
    except PolicyLoadError as e:
        for p in e.problems:
            print(f"candidate {args.policy}: {p}", file=sys.stderr)
        return 2
    try:
        entries = read_entries([Path(p) for p in args.audit])
    except AuditLogError as e:
        print(str(e), file=sys.stderr)
        return 2
    result = replay(entries, engine, args.policy)
    if args.format == "json":
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(render(result))
    return 1 if result.changes["newly_denied"] else 0


def add_commands(sub: Any, policy: Any, default_config: str) -> None:
    """``learn`` under the top-level commands, ``replay`` under ``policy``."""
    from proxy.policy.engines import NAMES, resolve

    embedded = [n for n in NAMES if resolve(n).compile is not None]
    lp = sub.add_parser("learn", help="least-privilege grants from the audit log (--emit: a policy directory)")
    lp.add_argument("logs", nargs="*", help="audit logs to read (default: audit.path of the config)")
    lp.add_argument("-c", "--config", default=default_config, help="config whose audit.path to read")
    lp.add_argument("--emit", metavar="DIR", help="write data.json, learned.rego and learned_test.rego here")
    lp.add_argument("--force", action="store_true", help="write into a non-empty --emit directory")
    lp.add_argument("--id-pattern", action="append", default=[], metavar="REGEX",
                    help="a path segment matching REGEX (whole segment) is an identifier too (repeatable)")
    lp.add_argument("--format", choices=["text", "json"], default="text")
    lp.set_defaults(func=cmd_learn)
    rp = policy.add_parser("replay", help="decide recorded inputs again with a candidate policy")
    rp.add_argument("--audit", nargs="+", required=True, metavar="LOG", help="audit logs to replay")
    rp.add_argument("--policy", required=True, metavar="DIR", help="candidate policy directory or bundle.tar.gz")
    rp.add_argument("--decision", default="data.keyless.egress.decision")
    rp.add_argument("--engine", default="embedded", choices=embedded)
    rp.add_argument("--format", choices=["text", "json"], default="text")
    rp.set_defaults(func=cmd_replay)
