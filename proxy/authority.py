"""The one parser for hosts and authorities: every spelling of a destination has one canonical form.

The policy, the egress checks, credential minting and the upstream connection must all see the
same name, or a rule on ``denied.example`` is bypassed with ``DENIED.EXAMPLE``, and a rule on
``127.0.0.1`` with ``2130706433`` (which the system resolver happily dials). So every host a
client names (absolute-form URL, Host header, ``:authority``, CONNECT authority, TLS SNI) and
every host in the config goes through ``canonical_host`` exactly once, and everything after
works on the resulting ``Target``.

The canonical form, following the WHATWG URL host parser where it is stricter than DNS:

* names: UTS-46 mapping (lower case, full-width forms, ideographic full stops), then IDNA 2008
  A-labels (punycode); one trailing dot removed; labels of letters, digits, ``-`` and ``_``
  (``_`` is not IDNA but real: compose service names, SRV owners), 1-63 octets, 253 in all;
* IPv4 in every numeric form WHATWG accepts (decimal, ``0x`` hex, ``0`` octal, 1 to 4 parts:
  ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``) as the dotted quad; a name whose
  last label is numeric but that is not a valid IPv4 address is refused, never looked up;
* IPv6, bracketed or not, compressed (``::1``), without a zone id;
* IPv4-mapped IPv6 (``::ffff:127.0.0.1``) is the IPv4 address it carries: a dual-stack socket
  connecting to it reaches exactly that IPv4 address.

NAT64 (``64:ff9b::/96``), 6to4 (``2002::/16``) and IPv4-compatible (``::a.b.c.d``) addresses
stay IPv6: they are routed through a translator or relay, not to the IPv4 address itself, so
rewriting them would change where Keyless dials, and the policy sees them as written. The egress
checks that refuse destinations still check the IPv4 address they embed (``checked_ips``),
so ``64:ff9b::a9fe:a9fe`` cannot reach a 169.254.0.0/16 rule's blind side; checks that *allow*
something (loopback for cleartext) use the address itself only.

Percent-escapes, userinfo, zone ids, whitespace and control characters are refused outright
rather than decoded: a proxy that decodes what its upstream may not is how parsers disagree.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

import idna

from proxy.confread import Section
from proxy.errors import KeylessError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Input longer than this is refused before any parsing: a Unicode name this long cannot encode
# to 253 octets, and it bounds the work an attacker can ask of the IDNA code.
_MAX_INPUT: Final = 1024
_MAX_NAME: Final = 253
_MAX_LABEL: Final = 63
_SHOWN: Final = 64

_ASCII_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(r"0x[0-9a-f]*")
_PORT = re.compile(r"[0-9]{1,5}")
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")


def cut(text: str) -> str:
    """``text`` cut short: what an audit record keeps of a host that did not parse."""
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def shown(text: str) -> str:
    """``text`` quoted (control characters escaped) and cut short, for error messages."""
    return repr(cut(text))


def _bad(text: str, why: str) -> KeylessError:
    return KeylessError("bad_request", f"host {shown(text)}: {why}")


def canonical_host(text: str) -> str:
    """The canonical spelling of a host (name or address literal); ``bad_request`` if invalid."""
    return _canonical(text)[0]


# A request canonicalises its host several times (hooks, egress, minting); the same few hosts
# recur. Bounded, and only successes are kept (an exception is never cached), so junk input
# costs a parse each time but cannot grow the cache past its size (~4 MiB at worst).
@functools.lru_cache(maxsize=4096)
def _canonical(text: str) -> tuple[str, IPAddress | None]:
    if len(text) > _MAX_INPUT:
        raise _bad(text, f"longer than {_MAX_INPUT} characters")
    if not text:
        raise _bad(text, "empty")
    if "%" in text:
        raise _bad(text, "percent-escapes and IPv6 zone ids are not allowed")
    if "@" in text:
        raise _bad(text, "userinfo is not allowed")
    if text.startswith("["):
        if not text.endswith("]"):
            raise _bad(text, "unterminated [")
        return _ipv6(text, text[1:-1])
    if ":" in text:
        return _ipv6(text, text)
    name = _name(text)
    last = name.rsplit(".", 1)[-1]
    if _DIGITS.fullmatch(last) or _HEX.fullmatch(last):
        # WHATWG "ends in a number": the host is an IPv4 address or it is nothing.
        v4 = _ipv4(name)
        if v4 is None:
            raise _bad(text, "ends in a number but is not a valid IPv4 address")
        return str(v4), v4
    return name, None


def _ipv6(text: str, inner: str) -> tuple[str, IPAddress]:
    try:
        ip = ipaddress.IPv6Address(inner)
    except ValueError:
        raise _bad(text, "not a valid IPv6 address") from None
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return str(mapped), mapped
    return str(ip), ip


def _name(text: str) -> str:
    """A DNS name in A-label form, lower case, without its trailing dot."""
    if text.isascii():
        name = text.lower()
    else:
        try:
            # UTS-46 mapping, non-transitional (IDNA 2008: "ß" stays "ß"), as browsers do.
            name = idna.uts46_remap(text, std3_rules=False, transitional=False)
        except (idna.IDNAError, UnicodeError, ValueError):
            raise _bad(text, "contains characters that are not allowed in a host name") from None
    if name.endswith("."):
        name = name[:-1]
    labels = [_label(text, label) for label in name.split(".")]
    name = ".".join(labels)
    if len(name) > _MAX_NAME:
        raise _bad(text, f"longer than {_MAX_NAME} octets")
    return name


def _label(text: str, label: str) -> str:
    if not label:
        raise _bad(text, "empty label")
    if not label.isascii():
        try:
            label = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise _bad(text, "not a valid internationalised name (IDNA 2008)") from None
    elif label.startswith("xn--"):
        # An A-label must be the canonical encoding of a valid U-label, or two spellings
        # (different punycode for one name) could name one host.
        try:
            if idna.alabel(idna.ulabel(label)).decode("ascii") != label:
                raise ValueError(label)
        except (idna.IDNAError, UnicodeError, ValueError):
            raise _bad(text, "not a valid punycode label") from None
    if len(label) > _MAX_LABEL:
        raise _bad(text, f"label longer than {_MAX_LABEL} octets")
    if not _ASCII_LABEL.fullmatch(label):
        raise _bad(text, "labels are letters, digits, '-' and '_', not starting or ending with '-'")
    return label


def _ipv4(name: str) -> ipaddress.IPv4Address | None:
    """The WHATWG IPv4 parser on a lower-case name without a trailing dot; None if not IPv4."""
    parts = name.split(".")
    if len(parts) > 4:
        return None
    numbers: list[int] = []
    for part in parts:
        n = _ipv4_number(part)
        if n is None:
            return None
        numbers.append(n)
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        return None
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n * 256 ** (3 - i)
    return ipaddress.IPv4Address(value)


def _ipv4_number(part: str) -> int | None:
    if _HEX.fullmatch(part):
        return int(part[2:] or "0", 16)
    if not _DIGITS.fullmatch(part):
        return None
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8) if set(part) <= set("01234567") else None
    return int(part)


def ip_of(host: str) -> IPAddress | None:
    """The address an IP-literal host denotes (canonically), None for a name or invalid input."""
    try:
        return _canonical(host)[1]
    except KeylessError:
        return None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64, 6to4 or IPv4-compatible address carries (None otherwise)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip.packed[:12] == bytes(12) and int(ip) > 0xFFFF):
        return ipaddress.IPv4Address(ip.packed[12:])
    return None


def checked_ips(ip: IPAddress | None) -> tuple[IPAddress, ...]:
    """Every address a *refusal* must consider for ``ip``: itself and any IPv4 it embeds."""
    if ip is None:
        return ()
    v4 = embedded_ipv4(ip)
    return (ip,) if v4 is None else (ip, v4)


@dataclass(frozen=True, slots=True)
class Target:
    """A destination in canonical form: build it with ``target`` or ``parse_authority`` only.

    ``host`` is a canonical name or address literal (IPv6 without brackets, as mitmproxy keeps
    it); ``ip`` is the address for a literal, None for a name.
    """

    host: str
    port: int
    ip: IPAddress | None = None

    @property
    def bracketed(self) -> str:
        """The host as it appears in an authority: IPv6 in brackets."""
        return f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host

    @property
    def authority(self) -> str:
        """``host:port`` with the port always explicit: unambiguous in logs and CONNECT lines."""
        return f"{self.bracketed}:{self.port}"

    def host_header(self, scheme: str) -> str:
        """The Host header value for ``scheme``: the port only when it is not the default."""
        default = {"http": 80, "https": 443}.get(scheme)
        return self.bracketed if self.port == default else self.authority

    def __str__(self) -> str:
        return self.authority


def target(host: str, port: int) -> Target:
    """The canonical ``Target`` for a host and a port number (1-65535)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise KeylessError("bad_request", f"port {shown(str(port))}: not a port number from 1 to 65535")
    name, ip = _canonical(host)
    return Target(name, port, ip)


def parse_authority(value: str, default_port: int) -> Target:
    """``host[:port]`` from a Host header, ``:authority``, CONNECT line or absolute-form URL.

    Leading and trailing blanks (header OWS) are ignored. The port is 1 to 5 digits naming
    1-65535; an empty port (``host:``) is the default, as RFC 3986 allows. An IPv6 address
    must be in brackets: ``a:b:c`` has no reading that every parser shares.
    """
    text = value.strip(" \t")
    if len(text) > _MAX_INPUT:
        raise KeylessError("bad_request", f"authority {shown(text)}: longer than {_MAX_INPUT} characters")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise KeylessError("bad_request", f"authority {shown(text)}: unterminated [")
        host, rest = text[:end + 1], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise KeylessError("bad_request", f"authority {shown(text)}: junk after ]")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.partition(":")
        if ":" in port_text:
            raise KeylessError("bad_request", f"authority {shown(text)}: an IPv6 address must be in brackets")
    if not port_text:
        port = default_port
    elif _PORT.fullmatch(port_text):
        port = int(port_text)
    else:
        raise KeylessError("bad_request", f"authority {shown(text)}: the port must be digits")
    if not 0 < port < 65536:
        raise KeylessError("bad_request", f"authority {shown(text)}: port {port} is not from 1 to 65535")
    name, ip = _canonical(host)
    return Target(name, port, ip)


def check_authority(*, scheme: str, target: Target, host_header: str | None, connect: Target | None,
                    tls: bool, sni: str | None, authority: str | None = None) -> None:
    """The CONNECT authority, TLS SNI, Host header and request target must all name ``target``.

    mitmproxy never compares them; a mismatch could route a credential meant for one host to
    another (domain fronting), so it is refused with 421 before anything is injected. Every
    one is compared in canonical form, so spelling a name differently is never a mismatch and
    never a way around one.
    """

    def misdirected(why: str) -> KeylessError:
        return KeylessError("misdirected_request", why)

    if connect is not None and connect != target:
        raise misdirected(f"request for {target} inside a tunnel to {connect}")
    if tls:
        if sni is None:
            if target.ip is None:
                raise misdirected("TLS without SNI for a named host")
        else:
            try:
                sni_host = canonical_host(sni)
            except KeylessError as e:
                raise KeylessError("bad_request", f"malformed TLS SNI: {e.message}") from None
            if sni_host != target.host:
                raise misdirected(f"TLS SNI {shown(sni)} does not match {target.host!r}")
    default_port = 443 if scheme == "https" else 80
    # An absolute-form request line inside a tunnel names a third authority; servers must
    # prefer it over Host (RFC 9112 3.2.2), so it has to agree as well.
    for what, value in (("request target", authority), ("Host header", host_header)):
        if not value:
            continue
        try:
            parsed = parse_authority(value, default_port)
        except KeylessError as e:
            raise KeylessError("bad_request", f"malformed {what}: {e.message}") from None
        if parsed != target:
            raise misdirected(f"{what} {shown(value)} does not match {target}")


def config_host(s: Section, key: str = "host", default: str | None = None) -> str | None:
    """The host at ``key`` of a config section in canonical form (None, with the problem noted
    under its key path, when it is invalid), so that it matches however a client spells it."""
    host: str | None = s.text(key) if default is None else s.text(key, default)
    if not host:
        return None
    try:
        return canonical_host(host)
    except KeylessError as e:
        s.error(f"is not a valid host ({e.message})", key)
        return None
