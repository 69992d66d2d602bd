"""``keyless audit verify LOG --key VKEY``: check an audit log's chains and checkpoints offline.

The first bad line is reported with what is wrong, one distinct message per kind of tampering:

    changed   the record's hash does not match its content (or the line is not JSON)
    deleted   a chain jumps over sequence numbers that appear nowhere in the file
    moved     a chain's next sequence number appears, but later in the file
    inserted  a line with no chain fields, a repeated sequence number, or a prev that does not
              match the previous record
    cut tail  a chain ends without its final (shutdown) checkpoint, or the last line is partial

Checkpoints must verify against one of the given verifier keys (several: key rotation) and
match the chain head they claim. ``allow_open`` accepts chains of a process still running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from proxy.audit.chain import Verifier, open_note, record_hash


@dataclass(slots=True)
class ChainState:
    first_line: int
    seq: int = 0
    head: str = ""
    line: int = 0
    signed: int = 0
    final: bool = False
    seen: dict[int, tuple[str, int]] = field(default_factory=dict)  # seq -> (hash, line)


@dataclass(slots=True)
class Report:
    problem: str | None = None
    line: int | None = None
    records: int = 0
    checkpoints: int = 0
    dropped: int = 0
    chains: dict[str, ChainState] = field(default_factory=dict)
    signers: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(data: bytes, verifiers: list[Verifier], allow_open: bool = False) -> Report:
    rep = Report()
    raw_lines = data.split(b"\n")
    torn = raw_lines[-1] != b""
    if not torn:
        raw_lines.pop()
    parsed: list[dict[str, Any] | None] = []
    for raw in raw_lines:
        try:
            value = json.loads(raw)
            parsed.append(value if isinstance(value, dict) else None)
        except ValueError:
            parsed.append(None)

    def bad(line: int, message: str) -> Report:
        rep.problem, rep.line = message, line
        return rep

    for i, rec in enumerate(parsed):
        n = i + 1
        if torn and n == len(parsed):
            return bad(n, "incomplete last line: the tail was cut in the middle of a record")
        if rec is None:
            return bad(n, "not a JSON object: the line was changed")
        chain, seq, prev, digest = rec.get("chain"), rec.get("seq"), rec.get("prev"), rec.get("hash")
        if not (isinstance(chain, str) and isinstance(seq, int) and isinstance(prev, str) and isinstance(digest, str)):
            return bad(n, "no chain fields (chain, seq, prev, hash): a line was inserted")
        if record_hash(rec) != digest:
            return bad(n, f"hash does not match the record's content: chain {chain} seq {seq} was changed")
        st = rep.chains.get(chain)
        if st is None:
            st = rep.chains[chain] = ChainState(first_line=n)
            if seq != 1:
                return bad(n, f"chain {chain} starts at seq {seq}: {seq - 1} record(s) before it were deleted")
        if st.final:
            return bad(n, f"record after chain {chain}'s final checkpoint (line {st.line}): a line was inserted")
        expected = st.seq + 1
        if seq > expected:
            later = _find(parsed, i + 1, chain, expected)
            if later is not None:
                return bad(n, f"chain {chain} seq {seq} follows seq {st.seq}: seq {expected} was moved "
                              f"(it is at line {later})")
            return bad(n, f"chain {chain} jumps from seq {st.seq} (line {st.line}) to {seq}: "
                          f"{seq - expected} record(s) deleted")
        if seq < expected:
            earlier = st.seen.get(seq)
            if earlier is not None and earlier[0] == digest:
                return bad(n, f"chain {chain} seq {seq} repeats line {earlier[1]}: a copied line was inserted")
            return bad(n, f"chain {chain} seq {seq} again after seq {st.seq}: a line was inserted "
                          "(or moved back)")
        if prev != st.head:
            return bad(n, f"chain {chain} seq {seq}: prev does not match the hash of seq {st.seq} "
                          f"(line {st.line}): a line was inserted or replaced")
        st.seq, st.head, st.line = seq, digest, n
        st.seen[seq] = (digest, n)
        kind = rec.get("type")
        if kind == "checkpoint":
            try:
                cp = open_note(str(rec.get("note", "")), verifiers)
            except ValueError as e:
                return bad(n, f"checkpoint of chain {chain}: {e}")
            if cp.chain != chain or cp.seq != seq - 1 or (seq > 1 and cp.hash != prev):
                return bad(n, f"checkpoint of chain {chain} does not sign the record before it")
            rep.checkpoints += 1
            rep.signers.add(cp.signer)
            st.signed, st.final = seq, cp.final
        elif kind is None:
            rep.records += 1
        elif kind == "gap":
            rep.dropped += int(rec.get("dropped") or 0)
    for chain, st in rep.chains.items():
        if not st.final and not allow_open:
            signed = f"last checkpoint at seq {st.signed}" if st.signed else "no checkpoint at all"
            return bad(st.line, f"chain {chain} ends at seq {st.seq} without its final checkpoint ({signed}): "
                                "the tail was cut (or Keyless is still running or crashed: --open accepts that)")
    return rep


def _find(parsed: list[dict[str, Any] | None], start: int, chain: str, seq: int) -> int | None:
    for j in range(start, len(parsed)):
        r = parsed[j]
        if r is not None and r.get("chain") == chain and r.get("seq") == seq:
            return j + 1
    return None
