"""``keyless revoke``: revoke (or ``--lift``, or ``--list``) an identity on every replica, through
the Redis named by the config's ``cache.redis``."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys

from proxy.errors import ConfigError

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd]?)$")


def parse_ttl(text: str) -> float:
    """``90``, ``30s``, ``15m``, ``12h``, ``7d`` -> seconds."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError("must be a duration such as 90s, 15m, 12h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def cmd_revoke(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    # The store's log lines are written for a running replica; this command says it in one line.
    logging.getLogger("keyless.shared").setLevel(logging.ERROR)

    from proxy.config import load_config
    from proxy.shared import revocation
    from proxy.shared.store import StoreDown, store_for

    try:
        config = load_config(Path(args.config))
        store = store_for(config.cache)
    except ConfigError as e:
        for p in e.problems:
            print(f"keyless revoke: {p}", file=sys.stderr)
        return 2
    if store is None:
        print("keyless revoke: the config has no cache.redis: revocations are shared through Redis", file=sys.stderr)
        return 2
    if not args.list and not args.identity:
        print("keyless revoke: --identity is required (or --list)", file=sys.stderr)
        return 2

    async def main() -> int:
        try:
            if args.list:
                for e in await revocation.listing(store):
                    print(json.dumps(e.as_json()))
                return 0
            if args.lift:
                found, gen = await revocation.lift(store, args.identity)
                print(f"{'lifted' if found else 'not revoked'}: {args.identity} (generation {gen})")
                return 0
            entry, gen = await revocation.revoke(store, args.identity, args.reason, args.ttl)
            print(f"revoked: {entry.identity} until {revocation.iso(entry.until)} (generation {gen})")
            return 0
        except StoreDown:
            print(f"keyless revoke: cannot reach Redis at {store.options.url}", file=sys.stderr)
            return 1
        except ValueError as e:
            print(f"keyless revoke: {e}", file=sys.stderr)
            return 2
        finally:
            await store.aclose()

    return asyncio.run(main())


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], default_config: str) -> None:
    r = sub.add_parser("revoke", help="deny an identity on every replica (cache.redis), or --lift it")
    r.add_argument("-c", "--config", default=default_config, help="config file (default: keyless.yaml)")
    r.add_argument("--identity", help="the workload id, e.g. spiffe://example.org/ns/ci/sa/builder")
    r.add_argument("--reason", default="", help="shown in refusals, logs and the audit trail")
    r.add_argument("--ttl", type=parse_ttl, default=86400.0, help="how long it lasts (default 24h; e.g. 15m, 7d)")
    r.add_argument("--lift", action="store_true", help="end the identity's revocation now")
    r.add_argument("--list", action="store_true", help="print the revocations in force, one JSON object a line")
    r.set_defaults(func=cmd_revoke)
