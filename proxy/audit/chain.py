"""Tamper evidence: a hash chain per writer and signed checkpoints over its head.

Every record a Keyless process writes carries ``chain`` (an id random per process, so each
``listen.workers`` worker keeps its own chain in the shared file), ``seq`` (1, 2, ...), ``prev``
(the previous record's ``hash``; ``""`` for seq 1) and ``hash``: the SHA-256 of the record's RFC
8785 canonical JSON without its ``hash`` member. Editing a byte breaks that record's hash;
deleting, inserting or moving a line breaks ``seq``/``prev``.

A hash chain alone proves nothing to someone who can rewrite the whole file. Every N records,
every T seconds and at shutdown the chain gets a checkpoint record whose ``note`` is a C2SP
signed note (https://github.com/C2SP/C2SP/blob/main/signed-note.md) signed with an Ed25519 key
the log's writer does not share with its readers:

    keyless-audit/<chain>          origin
    <seq>                          the checkpointed record's seq
    <base64 hash>                  that record's hash
    final | open                   whether the chain ends here (written at shutdown)

    — <key name> <base64(key id || signature)>

The verifier (``proxy.audit.verify``) trusts only the verifier keys it is given on the command
line; rotating the key means starting to sign with a new one and giving the verifier both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ORIGIN_PREFIX = "keyless-audit/"
_ED25519 = b"\x01"
_DASH = "\u2014 "


def canonical(body: dict[str, Any]) -> str:
    """``body`` as RFC 8785 canonical JSON text.

    Fast path: for values made of ASCII keys, strings, safe integers, booleans, null and finite
    floats (``_prep`` turns an integral float such as ``3600.0`` into the integer RFC 8785
    writes, and refuses a float whose shortest form has an exponent), orjson with sorted keys
    writes exactly what RFC 8785 writes (same escapes, same member order, same number forms:
    tests/unit/test_audit_chain.py checks it against the ``rfc8785`` package), at a fraction of
    the cost of that pure-Python package (and a twentieth of the standard library's encoder). Anything else goes
    to ``rfc8785`` itself, which refuses integers beyond 2**53 and what JSON cannot hold: such a
    record goes through its JSON text, big integers written as decimal strings.
    """
    return canonical_bytes(body).decode()


# Which members of a record hold only what ``_prep`` passes unchanged (strings, safe integers,
# booleans, null, ASCII keys), as its writer knows from how it built them: a member mapped to
# None is not walked, one mapped to a Plain is walked only outside what that names.
Plain = Mapping[str, "Plain | None"]
NOTHING_PLAIN: Plain = {}


def canonical_bytes(body: dict[str, Any], plain: Plain = NOTHING_PLAIN) -> bytes:
    """``canonical(body)`` as the UTF-8 bytes that are hashed and written; ``plain`` (above)
    spares the walk over what is known to need no change."""
    try:
        return orjson.dumps(_prep_members(body, plain) if plain else _prep(body), option=orjson.OPT_SORT_KEYS)
    except (_NotPlain, orjson.JSONEncodeError):  # orjson refuses a lone surrogate
        pass
    try:
        return rfc8785.dumps(body)
    except (rfc8785.CanonicalizationError, TypeError, UnicodeError):
        return rfc8785.dumps(_normal(json.loads(json.dumps(body, default=str))))


def record_hash(record: dict[str, Any]) -> str:
    """The hex SHA-256 of ``record``'s canonical JSON, ``hash`` member excluded."""
    return hashlib.sha256(canonical_bytes({k: v for k, v in record.items() if k != "hash"})).hexdigest()

_SAFE = 2**53 - 1


class _NotPlain(Exception):
    pass


def _prep(value: Any) -> Any:
    """``value`` if the C encoder writes it as RFC 8785 does, a copy with integral floats as
    integers if that is all it takes, else raise _NotPlain. Unchanged containers are not copied.
    Scalars are checked inline (a call per scalar would cost more than the encoding)."""
    t = type(value)
    if t is dict:
        try:
            if not "".join(value).isascii():  # also raises TypeError on a non-string key
                raise _NotPlain
        except TypeError:
            raise _NotPlain from None
        pairs: Any = value.items()
    elif t is list:
        pairs = enumerate(value)
    else:
        return _scalar(value)
    copy: Any = None
    for k, v in pairs:
        vt = type(v)
        if vt is str or v is None or vt is bool:
            continue
        if vt is int:
            if -_SAFE <= v <= _SAFE:
                continue
            raise _NotPlain
        p = _prep(v) if vt is dict or vt is list else _scalar(v)
        if p is not v:
            if copy is None:
                copy = dict(value) if t is dict else list(value)
            copy[k] = p
    return value if copy is None else copy


def _prep_members(body: dict[str, Any], plain: Plain) -> dict[str, Any]:
    """``_prep(body)`` where ``plain`` says which parts need no walk."""
    copy: dict[str, Any] | None = None
    for k, v in body.items():
        if k in plain:
            sub = plain[k]
            if sub is None:
                continue
            p = _prep_members(v, sub) if type(v) is dict else _prep(v)
        else:
            if type(k) is not str or not k.isascii():
                raise _NotPlain
            vt = type(v)
            p = _prep(v) if vt is dict or vt is list else _scalar(v)
        if p is not v:
            if copy is None:
                copy = dict(body)
            copy[k] = p
    return body if copy is None else copy


def _scalar(value: Any) -> Any:
    t = type(value)
    if t is str or t is bool or value is None:
        return value
    if t is int:
        if -_SAFE <= value <= _SAFE:
            return value
        raise _NotPlain
    if t is float and math.isfinite(value):
        if value.is_integer():
            if -_SAFE <= value <= _SAFE:
                return int(value)  # RFC 8785 (ES6 Number::toString) writes 3600.0 as 3600
            raise _NotPlain
        # ES6 and repr() agree on finite, non-integral values in fixed notation.
        if "e" not in repr(value):
            return value
    raise _NotPlain


def _normal(value: Any) -> Any:
    if isinstance(value, str):
        # A lone surrogate (mitmproxy decodes a non-UTF-8 request target with surrogateescape)
        # has no UTF-8 form and RFC 8785 refuses it: written as its escape, ``\udcff``, as text.
        return value.encode("utf-8", "backslashreplace").decode() if not value.isascii() else value
    if isinstance(value, dict):
        return {_normal(k): _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53 - 1:
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):  # NaN and infinities cannot be
        return repr(value)
    return value


@dataclass(frozen=True, slots=True)
class NoteKey:
    """An Ed25519 signing key with a C2SP key name (``keyless-audit`` unless configured)."""

    name: str
    private: ed25519.Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_raw)

    def vkey(self) -> str:
        """The verifier key string, ``name+hexid+base64(0x01||pub)``, as Go's ``note`` package prints it."""
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(_ED25519 + self.public_raw).decode()}"

    def sign(self, text: str) -> str:
        """``text`` (ending in a newline) as a signed note."""
        if not text.endswith("\n"):
            raise ValueError("note text must end with a newline")
        sig = self.private.sign(text.encode())
        return f"{text}\n{_DASH}{self.name} {base64.b64encode(self.key_id + sig).decode()}\n"

    def __repr__(self) -> str:
        return f"NoteKey({self.name!r}, id={self.key_id.hex()})"


def key_id(name: str, public_raw: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public_raw).digest()[:4]


def load_note_key(path: Path, name: str) -> NoteKey:
    """A PEM (PKCS#8) Ed25519 private key; created 0600 when the file does not exist."""
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return NoteKey(name, key)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return NoteKey(name, loaded)


@dataclass(frozen=True, slots=True)
class Verifier:
    name: str
    id: bytes
    public: ed25519.Ed25519PublicKey

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        try:
            name, hex_id, b64 = vkey.strip().split("+", 2)
            raw = base64.b64decode(b64, validate=True)
        except ValueError:
            raise ValueError("a verifier key looks like name+hexid+base64key") from None
        if not raw.startswith(_ED25519) or len(raw) != 33:
            raise ValueError("only Ed25519 verifier keys (type 0x01) are supported")
        if key_id(name, raw[1:]) != bytes.fromhex(hex_id):
            raise ValueError("verifier key id does not match its name and key")
        return cls(name, bytes.fromhex(hex_id), ed25519.Ed25519PublicKey.from_public_bytes(raw[1:]))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    chain: str
    seq: int
    hash: str
    final: bool
    signer: str  # the key name that verified


def open_note(note: str, verifiers: list[Verifier]) -> Checkpoint:
    """Verify a signed checkpoint note; raise ValueError saying why it is not acceptable."""
    text, sep, sigs = note.partition("\n\n")
    if not sep or not sigs:
        raise ValueError("malformed signed note")
    text += "\n"
    signer: str | None = None
    names = []
    for line in sigs.splitlines():
        if not line.startswith(_DASH):
            raise ValueError("malformed signature line")
        name, _, b64 = line[len(_DASH):].rpartition(" ")
        names.append(name)
        try:
            blob = base64.b64decode(b64, validate=True)
        except ValueError:
            raise ValueError("malformed signature") from None
        for v in verifiers:
            if v.name == name and v.id == blob[:4]:
                try:
                    v.public.verify(blob[4:], text.encode())
                except InvalidSignature:
                    raise ValueError(f"bad signature by {name}") from None
                signer = name
    if signer is None:
        raise ValueError(f"signed by no trusted key (signers: {', '.join(names) or 'none'})")
    lines = text.splitlines()
    if len(lines) != 4 or not lines[0].startswith(ORIGIN_PREFIX) or lines[3] not in ("final", "open"):
        raise ValueError("not a keyless checkpoint")
    try:
        seq = int(lines[1])
        head = base64.b64decode(lines[2], validate=True).hex()
    except ValueError:
        raise ValueError("not a keyless checkpoint") from None
    return Checkpoint(lines[0][len(ORIGIN_PREFIX):], seq, head, lines[3] == "final", signer)


class Chain:
    """One writer's chain: seals records in order. Not thread-safe (one event loop per process)."""

    def __init__(self, chain_id: str | None = None) -> None:
        self.id = chain_id or os.urandom(8).hex()
        self.seq = 0
        self.head = ""

    def seal(self, record: dict[str, Any], plain: Plain = NOTHING_PLAIN) -> str:
        """Set ``chain``, ``seq``, ``prev`` and ``hash`` on ``record``; return its line (no newline).

        The line is the canonical text the hash covers, with ``hash`` appended as the last
        member: it is computed once and written as it was hashed.
        """
        self.seq += 1
        record["chain"] = self.id
        record["seq"] = self.seq
        record["prev"] = self.head
        record.pop("hash", None)
        data = canonical_bytes(record, plain)
        record["hash"] = self.head = hashlib.sha256(data).hexdigest()
        return f'{data[:-1].decode()},"hash":"{self.head}"}}'

    def checkpoint(self, key: NoteKey, time: str, final: bool) -> tuple[dict[str, Any], str]:
        """A checkpoint record over the current head, sealed into the chain itself, and its line."""
        text = (f"{ORIGIN_PREFIX}{self.id}\n{self.seq}\n"
                f"{base64.b64encode(bytes.fromhex(self.head or '00' * 32)).decode()}\n"
                f"{'final' if final else 'open'}\n")
        record = {"type": "checkpoint", "time": time, "note": key.sign(text)}
        return record, self.seal(record)
