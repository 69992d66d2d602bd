"""``keyless discover LOG...`` and ``keyless report -c CONFIG --audit LOG...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], default_config: str) -> None:
    d = sub.add_parser("discover", help="static secrets apps sent, per keyed fingerprint, from audit logs")
    d.add_argument("logs", nargs="+", metavar="LOG", help="audit log files")
    d.add_argument("--format", choices=["json", "text"], default="text")
    d.set_defaults(func=cmd_discover)
    r = sub.add_parser("report", help="each identity's reach, use and blast radius (docs/governance.md)")
    r.add_argument("-c", "--config", default=default_config)
    r.add_argument("--audit", nargs="+", required=True, metavar="LOG", help="audit log files")
    r.add_argument("--unused-days", type=int, default=30, help="a grant unused this long is a finding (30)")
    r.add_argument("--fail-over", type=int, default=None, metavar="N",
                   help="exit 1 when there are more than N findings (CI); default: exit 0")
    r.add_argument("--format", choices=["json", "html", "md"], default="json")
    r.add_argument("-o", "--output", help="write here instead of standard output")
    r.set_defaults(func=cmd_report)


def _logs(paths: list[str]) -> list[Path] | None:
    missing = [p for p in paths if not Path(p).is_file()]
    for p in missing:
        print(f"{p}: no such audit log", file=sys.stderr)
    return None if missing else [Path(p) for p in paths]


def cmd_discover(args: argparse.Namespace) -> int:
    from proxy.governance.inventory import aggregate, read_records

    logs = _logs(args.logs)
    if logs is None:
        return 2
    secrets = aggregate(read_records(logs))
    if args.format == "json":
        print(json.dumps({"secrets": secrets}, indent=2))
        return 0
    if not secrets:
        print("no static secrets found")
    for s in secrets:
        ids = ", ".join(f"{i['id']} ({i['count']})" for i in s["identities"])
        print(f"{s['fingerprint']}  {', '.join(s['detectors'])}{'  REUSED (NHI9)' if s['reuse'] else ''}")
        print(f"  identities: {ids}")
        print(f"  where: {', '.join(x['location'] for x in s['locations'])} to {', '.join(s['hosts'])}")
        print(f"  seen {s['count']}x ({s['stripped']} stripped, {s['forwarded']} forwarded), "
              f"{s['first_seen']} .. {s['last_seen']}")
        m = s["migration"]
        print(f"  migrate: {json.dumps(m['credential'])}")
        print(f"           grant {json.dumps(m['grant'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from proxy.config import load_config
    from proxy.errors import ConfigError
    from proxy.governance.inventory import read_records
    from proxy.governance.render import to_html, to_json, to_markdown
    from proxy.governance.report import build_report
    from proxy.policy.embedded import PolicyLoadError

    logs = _logs(args.audit)
    if logs is None:
        return 2
    try:
        config = load_config(Path(args.config))
        report = build_report(config, list(read_records(logs)), unused_days=args.unused_days)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 2
    except PolicyLoadError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 2
    text = {"json": to_json, "html": to_html, "md": to_markdown}[args.format](report)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    count = report["summary"]["findings"]
    if args.fail_over is not None and count > args.fail_over:
        print(f"report: {count} findings, over the threshold of {args.fail_over}", file=sys.stderr)
        return 1
    return 0


def live_report(config_path: Path, audit_path: Path, fmt: str, unused_days: int = 30) -> tuple[str, str]:
    """The admin listener's ``/report``: (body, content type) from the config file and the audit
    file as they are now (read afresh each time, so a reloaded policy is the one evaluated)."""
    from proxy.config import load_config
    from proxy.governance.inventory import read_records
    from proxy.governance.render import to_html, to_json, to_markdown
    from proxy.governance.report import build_report

    report = build_report(load_config(config_path), list(read_records([audit_path])) if audit_path.is_file() else [],
                          unused_days=unused_days)
    if fmt == "json":
        return to_json(report), "application/json"
    if fmt == "md":
        return to_markdown(report), "text/markdown"
    return to_html(report), "text/html"
