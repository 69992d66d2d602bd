"""``keyless report``: each identity's blast radius, from the config, the policy and the audit logs.

For every identity (configured ``source_ip`` workloads, and every identity seen in traffic):

reach        the grants the policy allows, found by asking the real engine about every entry of
             a catalog of destinations (those seen in traffic, and those named in policy data:
             any object with ``hosts``, ``methods`` and ``path_prefix``, as policies/egress.rego's
             grant table has). A grant is the decision's (credential, reason) pair.
credentials  what those grants let it obtain, with the upstream scope keyless.yaml configures
             (GitHub App permissions and repositories, AWS role and region, OAuth scopes and
             audience, static secrets flagged long-lived) and the narrowing each grant's params ask.
used         the grants its forwarded requests were decided by, with count and last_used.
unused       grants allowed but unused for ``unused_days`` (NHI5).
shared       credentials other identities can obtain too (NHI9), and static secrets it sends
             itself (discovery: NHI2, NHI7; the same fingerprint from two identities: NHI9).
compromise   the answer to "if this identity is compromised, what does the attacker get".

Findings are listed with the OWASP NHI Top 10 item they belong to (docs/governance.md); the CLI
exits non-zero when there are more than ``--fail-over`` of them.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.config import Config, PluginConfig
from proxy.governance.inventory import aggregate
from proxy.model import Attestation, Identity, Source
from proxy.policy import PolicyUnavailable
from proxy.policy.embedded import EmbeddedEngine, compile_modules, read_policy_dir
from proxy.policy.input import build_input, path_template
from proxy.trust import Caller

NHI = {
    "NHI1": "Improper Offboarding",
    "NHI2": "Secret Leakage",
    "NHI5": "Overprivileged NHI",
    "NHI7": "Long-Lived Secrets",
    "NHI9": "NHI Reuse",
}
# Credential types whose secret is not minted per call: the value itself lives on.
LONG_LIVED = frozenset({"static"})


@dataclass(frozen=True, slots=True)
class Destination:
    scheme: str
    host: str
    port: int
    method: str
    path: str
    origin: str  # "traffic" or "policy"

    def key(self) -> tuple[str, str, int, str, str]:
        return (self.scheme, self.host, self.port, self.method, path_template(self.path))

    def as_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "host": self.host, "port": self.port, "method": self.method,
                "path": self.path}


def build_report(config: Config, records: Sequence[dict[str, Any]], *, unused_days: int = 30,
                 now: datetime | None = None, engine: EmbeddedEngine | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    records = [r for r in records if isinstance(r, dict)]
    policy_dir = config.policy.dir
    if engine is None:
        kind = config.policy.engine if config.policy.engine != "opa" else "embedded"
        engine = EmbeddedEngine(read_policy_dir(policy_dir), config.policy.decision, kind)
    catalog = build_catalog(records, policy_catalog(policy_dir, config.policy.decision))
    identities = collect_identities(config, records)
    cutoff = now - timedelta(days=unused_days)
    discovery = aggregate(records)
    used = _usage(records)
    per: list[dict[str, Any]] = []
    obtainable: dict[str, set[str]] = {}
    for ident_id, (identity, address) in sorted(identities.items()):
        reach = _reach(engine, config, identity, address, catalog, now)
        for g in reach:
            if g["credential"]:
                obtainable.setdefault(g["credential"], set()).add(ident_id)
        per.append({"id": ident_id, "reach": reach, "_used": used.get(ident_id, {})})
    out_ids: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    for item in per:
        ident_id = item["id"]
        reach = item["reach"]
        usage: dict[tuple[str | None, str], dict[str, Any]] = item["_used"]
        used_list = [{"credential": c, "reason": r, "count": u["count"], "last_used": u["last_used"],
                      "destinations": sorted(u["destinations"])}
                     for (c, r), u in sorted(usage.items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))]
        unused = []
        for g in reach:
            u = usage.get((g["credential"], g["reason"]))
            g["last_used"] = u["last_used"] if u else None
            g["count"] = u["count"] if u else 0
            if u is None or _parse(u["last_used"]) < cutoff:
                unused.append(g)
                findings.append(_finding("NHI5", "unused_grant", ident_id,
                                         f"grant {g['reason']!r} ({g['credential'] or 'no credential'}) "
                                         f"unused for {unused_days} days"))
        creds = sorted({g["credential"] for g in reach if g["credential"]})
        cred_info = [credential_scope(c, config.credentials.get(c)) for c in creds]
        for c in cred_info:
            c["params"] = [g["params"] for g in reach if g["credential"] == c["name"] and g["params"]]
        shared = [{"credential": c, "with": sorted(obtainable[c] - {ident_id})}
                  for c in creds if len(obtainable.get(c, ())) > 1]
        sent = [s for s in discovery if any(i["id"] == ident_id for i in s["identities"])]
        out_ids.append({
            "id": ident_id,
            "reach": reach,
            "credentials": cred_info,
            "used": used_list,
            "unused_grants": unused,
            "shared_credentials": shared,
            "secrets_sent": [{"fingerprint": s["fingerprint"], "detectors": s["detectors"],
                              "locations": [loc["location"] for loc in s["locations"]], "hosts": s["hosts"],
                              "shared_with": sorted(i["id"] for i in s["identities"] if i["id"] != ident_id)}
                             for s in sent],
            "if_compromised": _compromise(reach, cred_info, sent),
        })
    for name, who in sorted(obtainable.items()):
        if len(who) > 1:
            findings.append(_finding("NHI9", "shared_credential", None, f"credential {name} is obtainable by "
                                     f"{len(who)} identities: {', '.join(sorted(who))}"))
        p = config.credentials.get(name)
        if p is not None and p.type in LONG_LIVED:
            findings.append(_finding("NHI7", "long_lived_credential", None,
                                     f"credential {name} is a static secret (long-lived): {', '.join(sorted(who))}"))
    for s in discovery:
        ids = [i["id"] for i in s["identities"]]
        where = ", ".join(loc["location"] for loc in s["locations"])
        if s["reuse"]:
            findings.append(_finding("NHI9", "secret_reuse", None,
                                     f"secret {s['fingerprint']} ({', '.join(s['detectors'])}) is sent by "
                                     f"{len(ids)} identities: {', '.join(ids)}"))
        for ident_id in ids:
            findings.append(_finding("NHI7", "static_secret_sent", ident_id,
                                     f"sends static secret {s['fingerprint']} ({', '.join(s['detectors'])}) "
                                     f"at {where} to {', '.join(s['hosts'])}"))
        if s["forwarded"]:
            findings.append(_finding("NHI2", "secret_forwarded", None,
                                     f"secret {s['fingerprint']} at {where} was forwarded {s['forwarded']} "
                                     "times (not in the strip list)"))
    for ident in out_ids:
        if ident["reach"] and not ident["used"]:
            findings.append(_finding("NHI1", "idle_identity", ident["id"],
                                     "has grants and made no forwarded request in the logs"))
    cells: dict[str, dict[str, str]] = {}
    all_creds = sorted(obtainable)
    for entry in out_ids:
        row: dict[str, str] = {}
        used_creds = {u["credential"] for u in entry["used"] if u["credential"]}
        for cname in all_creds:
            if cname in used_creds:
                row[cname] = "used"
            elif any(g["credential"] == cname for g in entry["reach"]):
                row[cname] = "allowed"
        cells[entry["id"]] = row
    times = sorted(str(r.get("time")) for r in records if r.get("time"))
    by_nhi: dict[str, int] = {}
    for f in findings:
        by_nhi[f["nhi"]] = by_nhi.get(f["nhi"], 0) + 1
    return {
        "generated": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "policy": {"decision": config.policy.decision, "revision": engine.revision},
        "window": {"records": len(records), "first": times[0] if times else None,
                   "last": times[-1] if times else None},
        "unused_days": unused_days,
        "catalog": [d.as_dict() | {"origin": d.origin} for d in catalog],
        "identities": out_ids,
        "credentials": [credential_scope(c, config.credentials.get(c)) | {"identities": sorted(obtainable[c])}
                        for c in all_creds],
        "matrix": {"identities": [i["id"] for i in out_ids], "credentials": all_creds, "cells": cells},
        "discovery": discovery,
        "findings": findings,
        "summary": {"identities": len(out_ids), "credentials": len(all_creds), "secrets": len(discovery),
                    "reused_secrets": sum(1 for s in discovery if s["reuse"]),
                    "unused_grants": sum(len(i["unused_grants"]) for i in out_ids),
                    "findings": len(findings), "by_nhi": dict(sorted(by_nhi.items()))},
    }


# --- the catalog ---------------------------------------------------------------------------------

def policy_catalog(policy_dir: Path, decision: str) -> list[Destination]:
    """Destinations named in policy data: the decision package's ``grants`` rule and the data
    documents, walked for objects with ``hosts`` (and ``methods``, ``path_prefix``)."""
    source = read_policy_dir(policy_dir).without_tests()
    docs: list[Any] = [source.data]
    rule = decision.rpartition(".")[0] + ".grants"
    try:
        # The interpreter: it evaluates any rule without compiling the program for it first.
        defined, value = compile_modules(source, [rule], "regorus").evaluate(rule, {})
    except Exception:  # noqa: BLE001 - no grants table: the catalog is traffic and data only
        defined, value = False, None
    if defined:
        docs.append(value)
    out: list[Destination] = []
    for doc in docs:
        _walk_grants(doc, out, 0)
    return out


def _walk_grants(node: Any, out: list[Destination], depth: int) -> None:
    if depth > 16:
        return
    if isinstance(node, dict):
        hosts = node.get("hosts")
        if isinstance(hosts, list) and all(isinstance(h, str) for h in hosts):
            raw_methods = node.get("methods")
            methods: list[Any] = raw_methods if isinstance(raw_methods, list) else ["GET"]
            raw_prefix = node.get("path_prefix")
            prefix = raw_prefix if isinstance(raw_prefix, str) else "/"
            for h in hosts:
                for m in methods:
                    out.append(Destination("https", h, 443, str(m), prefix, "policy"))
        for v in node.values():
            _walk_grants(v, out, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _walk_grants(v, out, depth + 1)


def build_catalog(records: Iterable[dict[str, Any]], from_policy: Iterable[Destination]) -> list[Destination]:
    seen: dict[tuple[str, str, int, str, str], Destination] = {}
    for rec in records:
        req = rec.get("request") or {}
        if not req.get("host") or not req.get("method") or req.get("method") == "CONNECT" or req.get("self_check"):
            continue
        d = Destination(str(req.get("scheme") or "https"), str(req["host"]), int(req.get("port") or 443),
                        str(req["method"]), str(req.get("path") or "/"), "traffic")
        seen.setdefault(d.key(), d)
    for d in from_policy:
        seen.setdefault(d.key(), d)
    return sorted(seen.values(), key=lambda d: d.key())


# --- identities ----------------------------------------------------------------------------------

def collect_identities(config: Config, records: Iterable[dict[str, Any]]) -> dict[str, tuple[Identity, str]]:
    """Every identity, with an address it calls from: configured source_ip workloads (attested by
    the provider itself), then the identities in traffic as their records show them."""
    from proxy.trust import TRUST_PROVIDERS

    out: dict[str, tuple[Identity, str]] = {}
    for p in config.trust:
        if p.type != "source_ip":
            continue
        provider = TRUST_PROVIDERS[p.type].create(p.name, p.options)
        for net, wid in p.options.workloads:
            address = str(net.network_address if net.num_addresses == 1 else next(iter(net.hosts()),
                                                                                   net.network_address))
            att = asyncio.run(provider.attest(Caller(address=address, port=0)))
            if att is not None and att.id == wid:
                out[wid] = (Identity(wid, (att,)), address)
    for rec in records:
        ident = rec.get("identity")
        if not isinstance(ident, dict) or not ident.get("id"):
            continue
        atts = tuple(Attestation(str(a.get("provider")), str(a.get("type")), a.get("id"), dict(a.get("facts") or {}))
                     for a in ident.get("attestations") or () if isinstance(a, dict))
        address = str((rec.get("source") or {}).get("address") or "")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            address = "0.0.0.0"  # noqa: S104 - only an input field for the policy
        out[str(ident["id"])] = (Identity(str(ident["id"]), atts), address)
    return out


def _reach(engine: EmbeddedEngine, config: Config, identity: Identity, address: str,
           catalog: Sequence[Destination], now: datetime) -> list[dict[str, Any]]:
    grants: dict[tuple[str | None, str], dict[str, Any]] = {}
    when = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    for d in catalog:
        doc = build_input(source=Source(address, 0), identity=identity, method=d.method, scheme=d.scheme,
                          host=d.host, port=d.port, path=d.path, query=(), headers=(),
                          secret_headers=frozenset(config.strip.headers),
                          secret_params=frozenset(config.strip.query_params), time=when,
                          mode=config.listen.mode, time_ns=int(now.timestamp()) * 1_000_000_000)
        try:
            decision = engine.decide_sync(doc)
        except PolicyUnavailable:
            continue
        if not decision.allow:
            continue
        key = (decision.credential, decision.reason or "")
        g = grants.setdefault(key, {"credential": decision.credential, "reason": decision.reason or "",
                                    "params": dict(decision.params) if decision.params else {},
                                    "destinations": []})
        g["destinations"].append(f"{d.method} {d.scheme}://{d.host}:{d.port}{path_template(d.path)}")
    return sorted(grants.values(), key=lambda g: (g["credential"] or "", g["reason"]))


def _usage(records: Iterable[dict[str, Any]]) -> dict[str, dict[tuple[str | None, str], dict[str, Any]]]:
    out: dict[str, dict[tuple[str | None, str], dict[str, Any]]] = {}
    for rec in records:
        d = rec.get("decision")
        ident = rec.get("identity") or {}
        outcome = rec.get("outcome") or {}
        if not isinstance(d, dict) or not d.get("allow") or not ident.get("id") or outcome.get("error"):
            continue
        req = rec.get("request") or {}
        key = (d.get("credential"), str(d.get("reason") or ""))
        u = out.setdefault(str(ident["id"]), {}).setdefault(key, {"count": 0, "last_used": "", "destinations": set()})
        u["count"] += 1
        u["last_used"] = max(u["last_used"], str(rec.get("time") or ""))
        u["destinations"].add(f"{req.get('method')} {req.get('host')}{path_template(str(req.get('path') or '/'))}")
    return out


# --- credentials' configured scope ---------------------------------------------------------------

def credential_scope(name: str, p: PluginConfig | None) -> dict[str, Any]:
    """What a credential grants upstream, as configured (never a secret: names, ids, scopes)."""
    if p is None:
        return {"name": name, "type": None, "scope": {}, "long_lived": False, "summary": "not configured"}
    o = p.options
    scope: dict[str, Any]
    if p.type == "github_app":
        scope = {"app_id": o.app_id, "installation_id": o.installation_id,
                 "repositories": list(o.repositories) or "all the installation's",
                 "permissions": dict(o.permissions) or "all the app's"}
        summary = (f"GitHub App {o.app_id} token: repositories {scope['repositories']}, "
                   f"permissions {scope['permissions']}")
    elif p.type == "aws_sigv4":
        scope = {"role_arn": o.role_arn, "region": o.region, "duration": o.duration,
                 "endpoints": [f"{e.service} {e.host}:{e.port} ({e.region})" for e in o.endpoints]}
        summary = f"AWS role {o.role_arn or '(the ambient credentials)'} in {o.region}, {o.duration}s sessions"
    elif p.type in ("oauth2", "token_exchange"):
        scope = {"scopes": list(o.scopes), "audience": o.audience, "resource": o.resource,
                 "client_id": o.client.client_id}
        summary = f"OAuth token for {o.client.client_id}: scopes {list(o.scopes)}, audience {o.audience or o.resource}"
    elif p.type == "jwt":
        scope = {"audience": o.audience, "ttl": o.ttl}
        summary = f"Keyless-signed JWT, {o.ttl}s, audience {o.audience or 'the destination'}"
    elif p.type == "static":
        where = {"env": o.env, "file": str(o.file) if o.file else None}.get(o.source, o.source)
        scope = {"source": o.source, "from": where, "header": o.header}
        summary = f"static secret from {o.source} {where}: whatever the upstream lets that key do, until rotated"
    else:
        scope, summary = {}, p.type
    return {"name": name, "type": p.type, "scope": scope, "long_lived": p.type in LONG_LIVED, "summary": summary}


def _compromise(reach: Sequence[dict[str, Any]], creds: Sequence[dict[str, Any]],
                sent: Sequence[dict[str, Any]]) -> list[str]:
    """One line per thing an attacker holding this identity could use, broadest first."""
    lines = []
    by_name = {c["name"]: c for c in creds}
    for g in reach:
        c = by_name.get(g["credential"]) if g["credential"] else None
        what = f"{g['credential']}: {c['summary']}" if c else "calls with no credential"
        hosts = sorted({d.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0] for d in g["destinations"]})
        methods = sorted({d.split(" ", 1)[0] for d in g["destinations"]})
        narrowed = f", narrowed by the grant to {g['params']}" if g["params"] else ""
        n = len(g["destinations"])
        lines.append(f"{what} ({'/'.join(methods)} on {', '.join(hosts)}, {n} "
                     f"destination{'s' if n != 1 else ''} in the catalog{narrowed})")
    for s in sent:
        lines.append(f"the static secret {s['fingerprint']} it holds itself ({', '.join(s['detectors'])}), "
                     f"usable outside Keyless against {', '.join(s['hosts'])}")
    return lines or ["nothing: no grant allows it anything"]


def _finding(nhi: str, kind: str, identity: str | None, detail: str) -> dict[str, Any]:
    return {"nhi": nhi, "title": NHI[nhi], "kind": kind, "identity": identity, "detail": detail}


def _parse(iso: str) -> datetime:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
