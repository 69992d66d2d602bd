"""``keyless audit verify LOG`` and ``keyless audit key``: the offline side of the audit chain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_verify(args: argparse.Namespace) -> int:
    from proxy.audit.chain import Verifier
    from proxy.audit.verify import verify

    keys = list(args.key)
    for f in args.key_file:
        try:
            keys += [line for line in Path(f).read_text().splitlines() if line.strip()]
        except OSError as e:
            print(f"{f}: cannot read verifier keys ({e.strerror})", file=sys.stderr)
            return 2
    if not keys:
        print("keyless audit verify: give the verifier key with --key (see keyless audit key)", file=sys.stderr)
        return 2
    try:
        verifiers = [Verifier.parse(k) for k in keys]
    except ValueError as e:
        print(f"--key: {e}", file=sys.stderr)
        return 2
    try:
        data = Path(args.log).read_bytes()
    except OSError as e:
        print(f"{args.log}: cannot read ({e.strerror})", file=sys.stderr)
        return 2
    rep = verify(data, verifiers, allow_open=args.open)
    if not rep.ok:
        print(f"{args.log}:{rep.line}: {rep.problem}", file=sys.stderr)
        return 1
    dropped = f"; {rep.dropped} record(s) dropped while the sink was down (gap records)" if rep.dropped else ""
    print(f"{args.log}: ok: {rep.records} record(s) in {len(rep.chains)} chain(s), {rep.checkpoints} checkpoint(s) "
          f"signed by {', '.join(sorted(rep.signers)) or 'nobody'}{dropped}")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    from proxy.audit import note_key
    from proxy.config import load_config
    from proxy.errors import ConfigError
    from proxy.signing import Signer

    try:
        config = load_config(Path(args.config))
        s = config.signing
        signer = Signer.create(s.algorithm, s.key_file, s.issuer)
        key = note_key(config.audit.checkpoint, signer)
    except ConfigError as e:
        for p in e.problems:
            print(f"{args.config}: {p}", file=sys.stderr)
        return 2
    if config.audit.checkpoint.key_file is None and config.signing.key_file is None:
        print("warning: no signing.key_file nor audit.checkpoint.key_file: the checkpoint key changes at "
              "every start, and this is not the running one's", file=sys.stderr)
    print(key.vkey())
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], default_config: str) -> None:
    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(dest="audit_command", required=True)
    v = audit.add_parser("verify", help="check an audit log's hash chains and signed checkpoints")
    v.add_argument("log")
    v.add_argument("--key", action="append", default=[], help="a verifier key (repeat for rotated keys)")
    v.add_argument("--key-file", action="append", default=[], help="a file of verifier keys, one a line")
    v.add_argument("--open", action="store_true", help="accept chains without a final checkpoint (still running)")
    v.set_defaults(func=cmd_verify)
    k = audit.add_parser("key", help="print the checkpoint verifier key of a config")
    k.add_argument("-c", "--config", default=default_config)
    k.set_defaults(func=cmd_key)
