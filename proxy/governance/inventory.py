"""``keyless discover``: the discovery findings of audit logs, aggregated per secret fingerprint.

One entry per keyed fingerprint: which identities send it (two or more is an NHI9 reuse), where
(location, host, method, path), how often, first and last seen, whether Keyless stripped or
forwarded it, and a suggested migration: the credential entry for keyless.yaml and the policy
grant (in the shape of policies/egress.rego's table) that would let the app stop holding it.
Nothing here sees a secret value: the records hold fingerprints only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_records(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """The request records of audit logs (chain checkpoints and gap records have a ``type``)."""
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line; `keyless audit verify` is the place to flag it
                if isinstance(rec, dict) and "type" not in rec:
                    yield rec


@dataclass
class SecretSeen:
    fingerprint: str
    detectors: set[str] = field(default_factory=set)
    identities: dict[str, int] = field(default_factory=dict)
    locations: dict[str, int] = field(default_factory=dict)
    hosts: dict[str, int] = field(default_factory=dict)
    methods: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    count: int = 0
    stripped: int = 0
    forwarded: int = 0
    first_seen: str = ""
    last_seen: str = ""

    def add(self, rec: dict[str, Any], finding: dict[str, Any]) -> None:
        ident = _identity(rec)
        req = rec.get("request") or {}
        when = str(rec.get("time") or "")
        self.count += 1
        self.detectors.add(str(finding.get("detector")))
        self.identities[ident] = self.identities.get(ident, 0) + 1
        loc = str(finding.get("location"))
        self.locations[loc] = self.locations.get(loc, 0) + 1
        host = str(req.get("host") or "")
        self.hosts[host] = self.hosts.get(host, 0) + 1
        if req.get("method"):
            self.methods.add(str(req["method"]))
        if req.get("path"):
            self.paths.add(str(req["path"]))
        if finding.get("action") == "stripped":
            self.stripped += 1
        else:
            self.forwarded += 1
        if not self.first_seen or when < self.first_seen:
            self.first_seen = when
        if when > self.last_seen:
            self.last_seen = when

    def as_dict(self) -> dict[str, Any]:
        detector = sorted(self.detectors)
        return {
            "fingerprint": self.fingerprint,
            "detectors": detector,
            "identities": [{"id": k, "count": v} for k, v in sorted(self.identities.items())],
            "reuse": len(self.identities) > 1,
            "locations": [{"location": k, "count": v} for k, v in sorted(self.locations.items())],
            "hosts": sorted(self.hosts),
            "count": self.count,
            "stripped": self.stripped,
            "forwarded": self.forwarded,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "migration": migration(detector, sorted(self.identities), sorted(self.hosts), sorted(self.methods),
                                   sorted(self.paths), sorted(self.locations)),
        }


def aggregate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fingerprint, most widely sent first (reuse, then count)."""
    seen: dict[str, SecretSeen] = {}
    for rec in records:
        for finding in rec.get("found") or ():
            if not isinstance(finding, dict) or not finding.get("fingerprint"):
                continue
            fp = str(finding["fingerprint"])
            seen.setdefault(fp, SecretSeen(fp)).add(rec, finding)
    out = [s.as_dict() for s in seen.values()]
    out.sort(key=lambda s: (-len(s["identities"]), -s["count"], s["fingerprint"]))
    return out


def _identity(rec: dict[str, Any]) -> str:
    ident = rec.get("identity")
    if isinstance(ident, dict) and ident.get("id"):
        return str(ident["id"])
    return "(anonymous)"


# --- the suggested migration --------------------------------------------------------------------

def credential_name(host: str) -> str:
    """``api.github.com`` -> ``github``; ``s3.us-east-1.amazonaws.com`` -> ``amazonaws``."""
    labels = [p for p in host.split(".") if p and not p.isdigit()]
    if len(labels) >= 2:
        return labels[-2]
    return labels[0] if labels else "upstream"


def migration(detectors: list[str], identities: list[str], hosts: list[str], methods: list[str],
              paths: list[str], locations: list[str]) -> dict[str, Any]:
    host = hosts[0] if hosts else "upstream.example"
    name = credential_name(host)
    header = next((loc.split(":", 1)[1] for loc in locations if loc.startswith("header:")), "authorization")
    if "GitHubTokenDetector" in detectors:
        entry: dict[str, Any] = {"type": "github_app", "app_id": "<app id>",
                                 "private_key_file": "/run/secrets/github-app.pem",
                                 "repositories": ["<repository>"], "permissions": {"contents": "read"}}
        why = "a GitHub App installation token per call, narrowed to repositories and permissions"
    elif "AWSKeyDetector" in detectors:
        entry = {"type": "aws_sigv4", "role_arn": "arn:aws:iam::<account>:role/<role>", "region": "<region>"}
        why = "SigV4 with short-lived STS credentials for a role, instead of an access key"
    else:
        entry = {"type": "static", "from": "file", "file": f"/run/secrets/{name}", "header": header.title(),
                 "template": "Bearer {secret}"}
        why = "the same secret, held by Keyless instead of the app (still long-lived: rotate it)"
    grant = {
        "reason": f"{', '.join(identities) or 'the workload'} may call {host} with {name}",
        "workload": identities[0] if len(identities) == 1 else identities,
        "hosts": hosts,
        "methods": methods or ["GET"],
        "path_prefix": _common_prefix(paths),
        "credential": name,
    }
    return {"credential": {name: entry}, "grant": grant, "why": why}


def _common_prefix(paths: list[str]) -> str:
    if not paths:
        return "/"
    prefix = os.path.commonprefix(paths)
    return prefix[: prefix.rfind("/") + 1] or "/"
