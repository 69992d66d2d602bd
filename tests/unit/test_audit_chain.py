"""The audit chain and its offline verifier, on logs written by the real FileSink.

Each of the five kinds of tampering gets its own message naming the first bad line; key
rotation (two chains signed by two keys) verifies with both keys and fails with one.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from proxy.audit.chain import NoteKey, Verifier, open_note, record_hash
from proxy.audit.file import FileOptions, FileSink
from proxy.audit.mask import mask_input
from proxy.audit.verify import verify

REPO = Path(__file__).resolve().parents[2]


def key(name: str = "keyless-audit") -> NoteKey:
    return NoteKey(name, ed25519.Ed25519PrivateKey.generate())


def write_log(path: Path, keys: list[NoteKey], per_chain: int = 6, every: int = 4) -> None:
    """Two writers (two workers) interleaving records in one file, each with its own chain."""
    sinks = [FileSink(str(path), FileOptions(str(path), checkpoint_records=every), k) for k in keys]
    for i in range(per_chain):
        for n, s in enumerate(sinks):
            s.append({"decision_id": f"w{n}-{i}", "big": 2**60, "outcome": {"status": 200}})
    for s in sinks:
        assert s.close()


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, list[NoteKey]]:
    keys = [key(), key()]
    path = tmp_path / "audit.log"
    write_log(path, [keys[0], keys[0]])
    return path, keys


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def check(data: bytes, keys: list[NoteKey]) -> tuple[int | None, str | None]:
    rep = verify(data, [Verifier.parse(k.vkey()) for k in keys])
    return rep.line, rep.problem


def test_intact_log_verifies(log: tuple[Path, list[NoteKey]]) -> None:
    path, keys = log
    rep = verify(path.read_bytes(), [Verifier.parse(keys[0].vkey())])
    assert rep.ok, rep.problem
    assert rep.records == 12 and len(rep.chains) == 2 and rep.checkpoints == 4  # 1 periodic + 1 final each


def test_changed_byte(log: tuple[Path, list[NoteKey]]) -> None:
    path, keys = log
    ls = lines(path)
    ls[4] = ls[4].replace(b'"status":200', b'"status":201')
    line, problem = check(b"".join(ls), keys)
    assert line == 5 and problem is not None and "was changed" in problem


def test_deleted_line(log: tuple[Path, list[NoteKey]]) -> None:
    path, keys = log
    ls = lines(path)
    del ls[2]  # chain 0 seq 2
    line, problem = check(b"".join(ls), keys)
    assert line == 4 and problem is not None and "deleted" in problem, problem


def test_inserted_line(log: tuple[Path, list[NoteKey]]) -> None:
    path, keys = log
    ls = lines(path)
    # A forged record that a writer without the key could compute: it carries a valid hash.
    forged = json.loads(ls[2])
    forged["decision_id"] = "forged"
    forged["hash"] = record_hash(forged)
    ls.insert(3, (json.dumps(forged) + "\n").encode())
    line, problem = check(b"".join(ls), keys)
    assert line == 4 and problem is not None and "inserted" in problem, problem
    # A copy of a real line, and a line with no chain fields at all.
    ls = lines(path)
    ls.insert(5, ls[1])
    line, problem = check(b"".join(ls), keys)
    assert line == 6 and problem is not None and "copied line was inserted" in problem, problem
    ls = lines(path)
    ls.insert(1, b'{"decision_id": "x"}\n')
    assert check(b"".join(ls), keys) == (2, "no chain fields (chain, seq, prev, hash): a line was inserted")


def test_moved_line(log: tuple[Path, list[NoteKey]]) -> None:
    path, keys = log
    ls = lines(path)
    ls.insert(8, ls.pop(2))  # chain 0 seq 2 moved further down
    line, problem = check(b"".join(ls), keys)
    assert line == 4 and problem is not None and "moved" in problem and "line 9" in problem, problem


def test_cut_tail(log: tuple[Path, list[NoteKey]]) -> None:
    path, keys = log
    ls = lines(path)
    line, problem = check(b"".join(ls[:-3]), keys)
    assert problem is not None and "the tail was cut" in problem and "final checkpoint" in problem, problem
    data = path.read_bytes()
    line, problem = check(data[:-20], keys)
    assert line == len(ls) and problem is not None and "incomplete last line" in problem


def test_key_rotation(tmp_path: Path) -> None:
    old, new = key("keyless-audit"), key("keyless-audit-2027")
    path = tmp_path / "audit.log"
    write_log(path, [old, new])
    assert check(path.read_bytes(), [old, new]) == (None, None)
    line, problem = check(path.read_bytes(), [old])
    assert problem is not None and "signed by no trusted key" in problem and "keyless-audit-2027" in problem


def test_signed_note_format() -> None:
    k = key("example.org/audit")
    note = k.sign("keyless-audit/abc\n3\n" + "A" * 43 + "=\nopen\n")
    text, _, sig = note.partition("\n\n")
    assert sig.startswith("\u2014 example.org/audit ") and sig.endswith("\n")
    cp = open_note(note, [Verifier.parse(k.vkey())])
    assert (cp.chain, cp.seq, cp.final) == ("abc", 3, False)
    with pytest.raises(ValueError, match="bad signature"):
        open_note(note.replace("\n3\n", "\n4\n"), [Verifier.parse(k.vkey())])


def test_failed_write_is_rolled_back(tmp_path: Path) -> None:
    """A write that fails half-way (here: EFBIG at a file size limit) leaves no partial line."""
    path = tmp_path / "a.log"
    path.write_bytes(b'{"x":1}\n')
    code = (
        "import resource, signal, os, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "from proxy.audit.file import write_whole\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\n"
        "try:\n    write_whole(fd, b'y' * 300 + b'\\n', True)\nexcept OSError as e:\n    print(e.errno)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == str(errno.EFBIG)
    assert path.read_bytes() == b'{"x":1}\n'


def test_spool_and_gap_record(tmp_path: Path) -> None:
    """A sink that cannot write spools; past the spool it counts drops and logs them as a gap."""
    path = tmp_path / "b.log"
    k = key()
    sink = FileSink(str(path), FileOptions(str(path), spool_records=2), k)
    sink.append({"n": 1})
    real = sink._fd
    sink._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    sink._regular = False
    for n in range(2, 6):
        sink.append({"n": n})
    assert not sink.accepting() and sink.status()["spooled"] == 2 and sink.dropped == 2
    assert sink.last_error is not None and sink.last_error.startswith("ENOSPC")
    os.close(sink._fd)
    sink._fd, sink._regular = real, True
    sink.tick()
    assert sink.accepting()
    assert sink.close()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r.get("n") for r in recs if "n" in r] == [1, 2, 3]
    gap = [r for r in recs if r.get("type") == "gap"]
    assert gap and gap[0]["dropped"] == 2
    rep = verify(path.read_bytes(), [Verifier.parse(k.vkey())])
    assert rep.ok and rep.dropped == 2


def test_mask_input_never_keeps_header_values() -> None:
    doc = {"request": {"headers": {"x-secret": "v"}, "query": {"q": ["1"]}, "path": "/"}, "context": {}}
    out, erased, masked = mask_input(doc, ("/input/request/query", "/input/nothing"))
    assert out["request"] == {"headers": {"x-secret": "[masked]"}, "path": "/"}
    assert erased == ["/input/request/query"] and masked == ["/input/request/headers"]
    assert doc["request"]["headers"] == {"x-secret": "v"} and "query" in doc["request"]  # input untouched


def test_cli_exit_codes(log: tuple[Path, list[NoteKey]], tmp_path: Path) -> None:
    path, keys = log
    cmd = [sys.executable, "-m", "proxy.cli", "audit", "verify", str(path), "--key", keys[0].vkey()]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and ": ok: 12 record(s) in 2 chain(s)" in ok.stdout
    ls = lines(path)
    del ls[2]
    bad = tmp_path / "bad.log"
    bad.write_bytes(b"".join(ls))
    cmd[5] = str(bad)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and out.stderr.startswith(f"{bad}:4: ") and "deleted" in out.stderr


def test_fast_canonical_form_is_rfc8785() -> None:
    """The orjson fast path writes byte for byte what the rfc8785 package writes."""
    import random

    import orjson
    import rfc8785

    from proxy.audit.chain import _NotPlain, _prep, canonical_bytes

    rng = random.Random(8785)

    def value(depth: int = 0) -> object:
        c = rng.random()
        if depth > 3 or c < 0.3:
            return rng.choice([None, True, False, rng.randint(-2**53 + 1, 2**53 - 1),
                               rng.random() * 10 ** rng.randint(-3, 15), float(rng.randint(-10**6, 10**6)),
                               rng.random() * 10 ** rng.randint(-9, 25),
                               "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF),
                                                       rng.randint(0xE000, 0x10FFFF)])) for _ in range(6))])
        if c < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {"".join(chr(rng.randint(32, 126)) for _ in range(4)): value(depth + 1) for _ in range(3)}

    fast = 0
    for _ in range(3000):
        v = {"v": value()}
        try:
            prepared = _prep(v)
        except _NotPlain:
            continue
        fast += 1
        # What canonical_bytes writes on its fast path, compared without its fallback.
        assert orjson.dumps(prepared, option=orjson.OPT_SORT_KEYS) == rfc8785.dumps(v)
        assert canonical_bytes(v) == rfc8785.dumps(v)
    assert fast > 1500
    assert record_hash({"a": 1e-7}) == record_hash({"a": 1e-7, "hash": "x"})  # the rfc8785 path


def test_credentialed_record_displaces_a_refusal_in_a_full_spool(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    sink = FileSink(str(path), FileOptions(str(path), spool_records=2), key())
    real, sink._fd, sink._regular = sink._fd, os.open("/dev/full", os.O_WRONLY), False
    sink.append({"n": 1, "credential": None})
    sink.append({"n": 2, "credential": None})
    sink.append({"n": 3, "credential": {"name": "key"}})  # forwarded before the sink went down
    assert [r["n"] for r in sink._spool] == [2, 3] and sink.dropped == 1
    os.close(sink._fd)
    sink._fd, sink._regular = real, True
    assert sink.close()
    assert [r.get("n") for r in map(json.loads, path.read_text().splitlines()) if "n" in r] == [2, 3]


def test_time_based_checkpoint(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "d.log"
    k = key()
    sink = FileSink(str(path), FileOptions(str(path), checkpoint_seconds=5), k, clock=lambda: now[0])
    sink.append({"n": 1})
    sink.tick()
    assert sink.checkpoints == 0
    now[0] = 6.0
    sink.tick()
    assert sink.checkpoints == 1
    sink.tick()
    assert sink.checkpoints == 1  # nothing new to sign
    assert sink.close() and verify(path.read_bytes(), [Verifier.parse(k.vkey())]).ok


def test_on_failure_continue_keeps_accepting(tmp_path: Path) -> None:
    path = tmp_path / "e.log"
    sink = FileSink(str(path), FileOptions(str(path), on_failure="continue"), key())
    real, sink._fd, sink._regular = sink._fd, os.open("/dev/full", os.O_WRONLY), False
    sink.append({"n": 1})
    assert not sink.healthy and sink.accepting()
    os.close(sink._fd)
    sink._fd, sink._regular = real, True
    assert sink.close()


def test_dependency_failure_and_recovery_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    from proxy.telemetry import Telemetry

    t = Telemetry()
    with caplog.at_level("WARNING", logger="keyless"):
        for _ in range(3):
            t.health("policy engine", "opa_unreachable: connection refused")
        for _ in range(3):
            t.health("policy engine", None)
    assert [r.getMessage() for r in caplog.records] == [
        "policy engine is failing: opa_unreachable: connection refused", "policy engine recovered"]


def test_plain_members_need_no_check() -> None:
    """What PLAIN_MEMBERS names passes _prep unchanged, on a fully populated event (every
    optional part of the request, decision, outcome and input set), so sparing the walk over it
    writes the same canonical bytes; what it does not name is still walked."""
    from proxy.audit.chain import Plain, _prep, canonical_bytes
    from proxy.audit.event import PLAIN_MEMBERS, AuditEvent, Outcome, RequestRecord
    from proxy.audit.mask import mask_input
    from proxy.model import Attestation, Decision, Grant, Identity, Source
    from proxy.policy.input import build_input

    identity = Identity("spiffe://t/app", (Attestation("ci", "jwt", "spiffe://t/app", {"exp": 1.5e9}),))
    doc = build_input(source=Source("127.0.0.1", 50312), identity=identity, method="GET", scheme="https",
                      host="api.example", port=443, path="/v1/x/42", query=[("page", "2")],
                      headers=[("user-agent", "sdk/1"), ("x-id", "7")], secret_headers=frozenset(),
                      secret_params=frozenset(), time="2026-12-01T08:00:00.000Z", mode="transparent",
                      time_ns=1_796_112_000_000_000_000, posture={"stale": False, "age_seconds": 2.0},
                      destination={"address": "10.0.0.1", "port": 443})
    recorded, erased, masked = mask_input(doc, ())
    request = RequestRecord("GET", "https", "api.example", 443, "/v1/x",
                            destination={"address": "10.0.0.1", "port": 443},
                            upstream="https://api.example:8443", upstream_address="10.0.0.1:8443", self_check=True)
    event = AuditEvent(
        decision_id="d", time="2026-12-01T08:00:00.000Z", source=Source("127.0.0.1", 50312), identity=identity,
        request=request, decision=Decision(True, "ok", "key", revision="r1", engine_decision_id="e1", cached=True),
        policy="data.p", engine_revision="r0", grant=Grant("key", "static", 1.8e9, "hmac-sha256:00"),
        outcome=Outcome(503, "policy_unavailable", "m", "opa_timeout", "e2"), latency_ms=3.0,
        stripped=("authorization",), input=recorded, erased=("/input/request/query",), masked=tuple(masked),
        bundles={"keyless": {"revision": "r1"}}, labels={"zone": "eu"})
    record = event.as_record()
    record.update(chain="c", seq=7, prev="")

    def check(value: dict[str, object], plain: Plain, where: str) -> None:
        for k, sub in plain.items():
            assert k in value, f"{where}{k} is never written: drop it from PLAIN_MEMBERS"
            member = value[k]
            if sub is None:
                assert _prep(member) is member, f"{where}{k} is not plain"
            else:
                assert isinstance(member, dict)
                check(member, sub, f"{where}{k}.")

    check(record, PLAIN_MEMBERS, "")
    assert canonical_bytes(record, PLAIN_MEMBERS) == canonical_bytes(record)
    # What is not named is still walked: integral floats are written as RFC 8785 writes them.
    out = canonical_bytes(record, PLAIN_MEMBERS)
    assert b'"exp":1500000000}' in out and b'"latency_ms":3,' in out and b'"age_seconds":2,' in out


def test_a_lone_surrogate_is_written_as_its_escape(tmp_path: Path) -> None:
    """mitmproxy decodes a non-UTF-8 request target with surrogateescape: the record must still
    be written (RFC 8785 and UTF-8 have no form for a lone surrogate), and verify."""
    path = tmp_path / "s.log"
    sink = FileSink(str(path), FileOptions(str(path)), key())
    sink.append({"request": {"path": "/a\udcffb", "\udc80": 1}})
    [line] = path.read_text().splitlines()
    record = json.loads(line)
    assert record["request"] == {"path": "/a\\udcffb", "\\udc80": 1}
    assert record_hash(record) == record["hash"]
