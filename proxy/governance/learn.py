"""``keyless learn``: least-privilege grants from the calls the audit log recorded.

Every request record the policy allowed contributes one tuple per identity: host, port, method,
path template (``proxy.governance.templates``) and the credential the decision named. The tuple
is the grant; nothing broader is ever emitted (no method, host, port or path the log does not
show for that identity). Denied calls, anonymous callers and requests refused before a decision
are counted, never learned. ``last_new`` says when the newest tuple first appeared: once it
stops moving, learning is complete.

``emit`` writes a policy directory that loads into Keyless unchanged: the grants as
``data.json`` (``data.keyless.learned``), ``learned.rego`` (package ``keyless.egress``, the
default decision rule) that enforces them, and ``learned_test.rego`` that checks every recorded
input is allowed with its credential and a sample of unseen calls is denied.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.governance.auditlog import Entry
from proxy.governance.templates import Templater
from proxy.policy.input import path_template

REGO = "learned.rego"
TESTS = "learned_test.rego"
DATA = "data.json"
# Recorded inputs kept per grant for the emitted tests (distinct paths); the rest are counted.
MAX_EXAMPLES = 50


@dataclass(frozen=True, slots=True, order=True)
class Key:
    identity: str
    host: str
    port: int
    method: str
    path: str  # the template
    credential: str | None

    def grant(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "method": self.method, "path": self.path,
                "credential": self.credential}


@dataclass
class Seen:
    count: int = 0
    first: str = ""
    last: str = ""
    first_index: int = 0
    # Distinct recorded inputs (by path), for the emitted tests.
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)
    more_paths: int = 0


@dataclass
class Learned:
    templater: Templater
    tuples: dict[Key, Seen] = field(default_factory=dict)
    decisions: int = 0
    denied: int = 0
    anonymous: int = 0
    undecided: int = 0
    files: tuple[str, ...] = ()
    first_time: str = ""
    last_time: str = ""

    @property
    def identities(self) -> list[str]:
        return sorted({k.identity for k in self.tuples})

    def last_new(self) -> tuple[Key, Seen] | None:
        """The tuple seen first most recently: when it was, learning had not converged yet."""
        if not self.tuples:
            return None
        return max(self.tuples.items(), key=lambda kv: (kv[1].first, kv[1].first_index))

    def allows(self, identity: str | None, method: str, host: str, port: int, path: str) -> Key | None:
        """The grant the emitted policy would match (the Python twin of learned.rego)."""
        for k in sorted(self.tuples):
            if (k.identity == identity and k.host == host and k.port == port and k.method == method
                    and self.templater.matches(k.path, path)):
                return k
        return None


def learn(entries: Sequence[Entry], templater: Templater | None = None) -> Learned:
    """Aggregate the allowed decisions of ``entries`` (in time order) into grants."""
    out = Learned(templater or Templater(), files=tuple(dict.fromkeys(e.file for e in entries)))
    ordered = sorted(enumerate(entries), key=lambda ie: (str(ie[1].record.get("time", "")), ie[0]))
    for index, (_, entry) in enumerate(ordered):
        doc, res = entry.input, entry.result
        when = str(entry.record.get("time", ""))
        out.first_time = out.first_time or when
        out.last_time = when or out.last_time
        if doc is None or res is None:
            out.undecided += 1
            continue
        out.decisions += 1
        if not res["allow"]:
            out.denied += 1
            continue
        ident = (doc.get("identity") or {}).get("id")
        req = doc.get("request") or {}
        if not isinstance(ident, str):
            out.anonymous += 1
            continue
        path = str(req.get("path", ""))
        credential = res.get("credential")
        key = Key(ident, str(req.get("host", "")), int(req.get("port", 0)), str(req.get("method", "")),
                  out.templater.template(path), credential if isinstance(credential, str) else None)
        seen = out.tuples.get(key)
        if seen is None:
            seen = out.tuples[key] = Seen(first=when, first_index=index)
        seen.count += 1
        seen.last = when
        if path in seen.examples:
            pass
        elif len(seen.examples) < MAX_EXAMPLES:
            seen.examples[path] = doc
        else:
            seen.more_paths += 1
    return out


# --- the report ----------------------------------------------------------------------------------

def report(learned: Learned) -> str:
    lines: list[str] = []
    for ident in learned.identities:
        lines.append(ident)
        for k in sorted(k for k in learned.tuples if k.identity == ident):
            s = learned.tuples[k]
            lines.append(f"  {k.method:<7} {k.host}:{k.port:<6} {k.path:<36} {k.credential or '-':<12} "
                         f"{s.count:>5} call{'s' if s.count != 1 else ' '}  {s.first} .. {s.last}")
    lines.append(summary(learned))
    for route, creds in conflicts(learned).items():
        lines.append(f"warning: {route} was called with {len(creds)} credentials ({', '.join(creds)}): "
                     f"the first, {creds[0]}, is the one the emitted policy names; review it")
    newest = learned.last_new()
    if newest is not None:
        k, s = newest
        lines.append(f"last new grant first seen {s.first} (record {s.first_index + 1} of "
                     f"{learned.decisions + learned.undecided}; log ends {learned.last_time}): "
                     f"{k.method} {k.host}:{k.port}{k.path} for {k.identity}")
    return "\n".join(lines)


def conflicts(learned: Learned) -> dict[str, list[str]]:
    """Routes seen with more than one credential (the policy changed, or the app calls one API
    two ways): the emitted table's first row wins, which a reviewer must confirm."""
    found: dict[str, list[str]] = {}
    for k in sorted(learned.tuples):
        route = f"{k.identity} {k.method} {k.host}:{k.port}{k.path}"
        found.setdefault(route, []).append(k.credential or "none")
    return {r: c for r, c in found.items() if len(c) > 1}


def summary(learned: Learned) -> str:
    skipped = [f"{n} {what}" for n, what in ((learned.denied, "denied"), (learned.anonymous, "anonymous"),
                                              (learned.undecided, "without a decision")) if n]
    return (f"learned {len(learned.tuples)} grant(s) for {len(learned.identities)} identit"
            f"{'y' if len(learned.identities) == 1 else 'ies'} from {learned.decisions} decision(s) in "
            f"{len(learned.files)} log(s)" + (f"; skipped {', '.join(skipped)}" if skipped else ""))


def as_json(learned: Learned) -> dict[str, Any]:
    newest = learned.last_new()
    return {
        "grants": grants_data(learned)["keyless"]["learned"]["grants"],
        "decisions": learned.decisions, "denied": learned.denied, "anonymous": learned.anonymous,
        "undecided": learned.undecided, "files": list(learned.files),
        "first_time": learned.first_time, "last_time": learned.last_time,
        "last_new": None if newest is None else {**newest[0].grant(), "identity": newest[0].identity,
                                                 "first_seen": newest[1].first},
    }


# --- emit ------------------------------------------------------------------------------------------

def grants_data(learned: Learned) -> dict[str, Any]:
    """``data.json``: ``data.keyless.learned`` = the id rules and the grants per identity."""
    grants: dict[str, list[dict[str, Any]]] = {}
    for k in sorted(learned.tuples):
        s = learned.tuples[k]
        grants.setdefault(k.identity, []).append(
            {**k.grant(), "seen": {"count": s.count, "first": s.first, "last": s.last}})
    return {"keyless": {"learned": {"id_rules": [list(r) for r in learned.templater.rules], "grants": grants}}}


REGO_MODULE = '''\
# Generated by `keyless learn` from {decisions} decision(s) in {files}
# ({first} .. {last}).
# Review the grants in data.json (data.keyless.learned.grants): one row per identity, host,
# port, method, path and credential that was seen, and nothing broader. Widen a grant by
# editing data.json (another row, or "{{id}}" in place of a literal segment); this module only
# enforces the table.
#
# A path segment "{{id}}" matches one segment that data.keyless.learned.id_rules calls an
# identifier (every regular expression of some rule matches it); any other segment must be
# equal. No grant matches a longer or shorter path.
package keyless.egress

import rego.v1

learned := data.keyless.learned

# The caller's grants (none for an identity the log did not show).
grants := object.get(learned.grants, input.identity.id, [])

granted := [g | some g in grants; matches(g)]

default decision := {{"allow": false, "reason": "no learned grant allows this call", "cache_ttl": 60}}

decision := {{"allow": false, "reason": "caller has no attested workload identity", "cache_ttl": 60}} if {{
	input.identity.id == null
}} else := {{
	"allow": true,
	"reason": sprintf("learned grant %s %s:%d%s", [g.method, g.host, g.port, g.path]),
	"credential": g.credential,
	"cache_ttl": 60,
}} if {{
	# The count first: regorus's RVM (0.13) skips the remaining else branches when an undefined
	# index is the branch's first expression, where the interpreter and OPA go on to the next.
	count(granted) > 0
	g := granted[0]
}} else := {{"allow": false, "reason": sprintf("no learned grant allows %s to %s %s:%d%s", [
	input.identity.id,
	input.request.method,
	input.request.host,
	input.request.port,
	input.request.path,
]), "cache_ttl": 60}}

matches(g) if {{
	input.request.host == g.host
	input.request.port == g.port
	input.request.method == g.method
	path_matches(g.path)
}}

path_matches(pattern) if {{
	want := split(pattern, "/")
	have := split(input.request.path, "/")
	count(want) == count(have)
	every i, w in want {{
		segment(w, have[i])
	}}
}}

segment(w, s) if w == s

segment("{{id}}", s) if {{
	s != ""
	some rule in learned.id_rules
	every p in rule {{
		regex.match(p, s)
	}}
}}
'''


def rego_module(learned: Learned) -> str:
    files = ", ".join(Path(f).name for f in learned.files)
    return REGO_MODULE.format(decisions=learned.decisions, files=files or "no log",
                              first=learned.first_time, last=learned.last_time)


def _literal(value: Any) -> str:
    # JSON is Rego's literal syntax for objects, arrays, strings, numbers, booleans and null.
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


def unseen_samples(learned: Learned) -> list[tuple[str, dict[str, Any]]]:
    """Calls the log never showed, each built from a recorded input: (why, input). Every one is
    checked here to be outside every grant, so the emitted test may assert a deny."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen_why: set[str] = set()
    keys = sorted(learned.tuples)

    def add(why: str, base: dict[str, Any], identity: str | None, method: str, host: str, port: int,
            path: str) -> None:
        if why in seen_why or learned.allows(identity, method, host, port, path) is not None:
            return
        doc = copy.deepcopy(base)
        doc.setdefault("identity", {})["id"] = identity
        if identity is None:
            doc["identity"]["attestations"] = []
        req = doc.setdefault("request", {})
        req.update({"method": method, "host": host, "port": port, "path": path, "path_template": path_template(path)})
        seen_why.add(why)
        out.append((why, doc))

    for ident in learned.identities:
        mine = [k for k in keys if k.identity == ident]
        k = mine[0]
        path, base = next(iter(learned.tuples[k].examples.items()))
        for m in ("DELETE", "PATCH", "PUT", "POST", "GET"):
            if learned.allows(ident, m, k.host, k.port, path) is None:
                add(f"{ident} {m} {k.host}:{k.port}{path} (method not seen)", base, ident, m, k.host, k.port, path)
                break
        add(f"{ident} {k.method} unseen.invalid:{k.port}{path} (host not seen)", base, ident, k.method,
            "unseen.invalid", k.port, path)
        add(f"{ident} {k.method} {k.host}:{k.port + 1}{path} (port not seen)", base, ident, k.method, k.host,
            k.port + 1, path)
        add(f"{ident} {k.method} {k.host}:{k.port}{path.rstrip('/')}/unseen (longer path)", base, ident,
            k.method, k.host, k.port, path.rstrip("/") + "/unseen")
        for other in keys:
            if other.identity == ident:
                continue
            opath, obase = next(iter(learned.tuples[other].examples.items()))
            if learned.allows(ident, other.method, other.host, other.port, opath) is None:
                add(f"{ident} {other.method} {other.host}:{other.port}{opath} (another identity's route)", obase,
                    ident, other.method, other.host, other.port, opath)
                break
    if keys:
        k = keys[0]
        path, base = next(iter(learned.tuples[k].examples.items()))
        add(f"anonymous {k.method} {k.host}:{k.port}{path}", base, None, k.method, k.host, k.port, path)
        add(f"spiffe://unseen.invalid/workload {k.method} {k.host}:{k.port}{path} (identity not seen)", base,
            "spiffe://unseen.invalid/workload", k.method, k.host, k.port, path)
    return out


def tests_module(learned: Learned) -> str:
    lines = [
        "# Generated by `keyless learn`: every recorded input is allowed with the credential it used,",
        "# and calls the log never showed are denied. Run: keyless policy test DIR",
        "package keyless.learned_test",
        "",
        "import rego.v1",
        "",
        "import data.keyless.egress",
        "",
    ]
    samples: list[dict[str, Any]] = []
    n = 0
    for k in sorted(learned.tuples):
        for path, doc in learned.tuples[k].examples.items():
            n += 1
            # The credential the table gives: the first matching row's (see conflicts()).
            chosen = learned.allows(k.identity, k.method, k.host, k.port, path)
            credential = chosen.credential if chosen is not None else k.credential
            lines += [f"# {k.identity} {k.method} {k.host}:{k.port}{path} -> {credential or 'no credential'}"
                      + (f" (recorded with {k.credential})" if credential != k.credential else ""),
                      f"test_recorded_{n:04d}_allowed if {{",
                      f"\td := egress.decision with input as {_literal(doc)}",
                      "\td.allow == true",
                      f"\td.credential == {_literal(credential)}",
                      "}", ""]
            if len(samples) < 8:
                samples.append(doc)
    for i, (why, doc) in enumerate(unseen_samples(learned), 1):
        lines += [f"# {why}",
                  f"test_unseen_{i:04d}_denied if {{",
                  f"\td := egress.decision with input as {_literal(doc)}",
                  "\td.allow == false",
                  "}", ""]
        if i <= 4:
            samples.append(doc)
    # `keyless policy test` re-evaluates these with every uncached field changed (the cache
    # promise), and on the serving engine against the test engine.
    lines += ["vary_samples := {\"data.keyless.egress.decision\": [",
              *[f"\t{_literal(s)}," for s in samples], "]}", ""]
    return "\n".join(lines)


def emit(learned: Learned, directory: Path, force: bool = False) -> list[Path]:
    """Write data.json, learned.rego and learned_test.rego; refuse a non-empty directory
    (another module there would be loaded beside them) unless ``force``."""
    if not learned.tuples:
        raise ValueError("nothing to emit: no allowed call with an attested identity in the log")
    if directory.exists() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory} is not empty (--force writes into it anyway)")
    directory.mkdir(parents=True, exist_ok=True)
    files = {DATA: json.dumps(grants_data(learned), indent=2, sort_keys=True) + "\n",
             REGO: rego_module(learned), TESTS: tests_module(learned)}
    written = []
    for name, text in files.items():
        (directory / name).write_text(text)
        written.append(directory / name)
    return written
