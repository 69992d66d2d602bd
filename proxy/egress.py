"""Destination rules: what may leave Keyless, where to, and whether a credential may ride along.

Five checks live here, all plain functions over plain values so that ``proxy.addon`` stays a
table of contents:

* ``transparent_host``: in transparent mode the app never told Keyless where it was going; the
  kernel did (SO_ORIGINAL_DST). The name the policy sees is the TLS SNI, or for plain HTTP the
  Host header, and a plain-HTTP Host header must resolve to the address the app really dialled,
  or an app could dial an attacker's box with ``Host: api.github.com`` and collect a token.
* ``origination``: destinations marked ``tls_origination`` are called by the app in cleartext
  and leave Keyless as verified HTTPS (Istio's egress TLS origination).
* ``check_injection``: a credential never leaves on a cleartext hop unless that destination is
  loopback (the hop stays on the host) or is listed in ``allow_cleartext``; and in transparent
  mode a TLS connection without SNI (an IP literal) gets no credential at all.
* ``check_connect``: called from mitmproxy's ``server_connect``, i.e. before any byte is sent
  upstream. It refuses ports listed in ``refused_ports``, connections back to Keyless itself and
  any connection that no allowed request on the same client connection asked for. With the
  lazy connection strategy that last rule is what guarantees that mitmproxy's transparent mode,
  which knows its destination before any HTTP hook ran, never relays undecided traffic.
* ``check_addresses`` and ``dial_target``: the address a connection goes to is the address
  that was checked (DNS rebinding). ``check_addresses`` runs once per allowed request, before
  the credential is minted: it resolves the name once and checks every answer against
  ``refused_networks`` and Keyless's own listeners, giving a ``Pin``. ``dial_target`` (in
  ``server_connect``) hands mitmproxy that pin, never the name, through ``DialNames``; TLS SNI,
  certificate verification and the Host header keep the name. Without the pin mitmproxy
  resolved the name a second time to connect, and a name whose answer alternates (TTL 0)
  between a public address and 169.254.169.254 passed the check and got the credential
  delivered to the metadata address on every request.

  An answer that mixes allowed and refused addresses refuses the name rather than dialling
  only the allowed ones. No legitimate public name needs a metadata or link-local address in
  its answer, so such an answer is evidence that someone steers the name; refusing keeps the
  outcome independent of answer order, and the refusal (naming the offending address) lands in
  the audit log instead of a silent filter hiding the probe. Filtering would be no safer for
  the credential, only quieter. An operator whose internal names legitimately mix ranges
  narrows ``refused_networks`` instead.

  Transparent mode needs no pin of its own: mitmproxy dials the original destination, an
  address literal (checked like any answer), and ``transparent_host``'s lookup of a plain-HTTP
  Host header only decides which name the policy sees, never where the connection goes. With
  ``tls_origination`` the dial is to the origination host by name, which is pinned as above.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.authority import IPAddress, canonical_host, checked_ips, config_host, ip_of, parse_authority, target
from proxy.confread import Section
from proxy.errors import KeylessError

Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class Origination:
    """``http://host:port`` from the app leaves as ``https://host:upstream_port``."""

    host: str
    port: int = 80
    upstream_port: int = 443


@dataclass(frozen=True, slots=True)
class CleartextAllowance:
    """A destination that may receive a credential over plain HTTP (port None: any port)."""

    host: str
    port: int | None = None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata services and link-local addresses: the classic SSRF targets (instance
# credentials). Private ranges are not refused by default because internal APIs live there;
# add them with egress.extra_refused_networks where that is wanted.
DEFAULT_REFUSED_NETWORKS: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32", "0.0.0.0/8", "::/128",
))


RESOLVE_TIMEOUT = 5.0  # seconds; a resolver that never answers must not hold a request forever
# How long one client connection reuses a pin for the same (host, port) before looking it up again.
# Only checked answers are reused, so this bounds staleness, not safety; it spares a kept-alive
# client a getaddrinfo (and a thread hop) per request.
PIN_REUSE = 5.0


@dataclass(frozen=True, slots=True)
class Pin:
    """Where a connection to ``host:port`` goes: the answers of one resolution, every one checked.

    Only ``Egress.check_addresses`` makes one. The connection tries ``addresses`` in resolver
    order (getaddrinfo sorts them by RFC 6724) until one accepts, through ``DialNames``, and
    tries nothing else; ``address`` is the first, the one a single-address dial would use.
    """

    host: str
    port: int
    addresses: tuple[str, ...]
    at: float = field(default=0.0, compare=False)  # Egress's clock when the lookup answered

    @property
    def address(self) -> tuple[str, int]:
        return self.addresses[0], self.port


# Reserved names that stand for a pin while mitmproxy dials it; ``.invalid`` never resolves
# anywhere (RFC 6761), so only the loop resolver DialNames installs can answer one.
PIN_SUFFIX = ".pin.keyless.invalid"

AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


class DialNames:
    """Hands a pin to mitmproxy's dial without giving it a name it could resolve again.

    mitmproxy connects with ``asyncio.open_connection(host, port)``, which tries every address
    the loop's ``getaddrinfo`` returns, in order, until one accepts. A literal would keep only
    one address and lose that fallback (``localhost`` answers ``::1`` first; an upstream that
    listens on 127.0.0.1 only then becomes unreachable); the name would be resolved again, which
    is the rebinding hole. So the dial gets ``<random>.pin.keyless.invalid``, and the running
    loop's ``getaddrinfo``, wrapped once by ``name_for``, answers such a name with the pin's
    checked addresses and nothing else. A name that is not (or no longer) in the table does
    not resolve: a lost pin fails closed. Other names go to the original resolver unchanged.
    """

    # A dial resolves its name at once (mitmproxy's per-address semaphore is keyed by this unique
    # name, so nothing waits); a name still unanswered after this long belongs to a dial that
    # never happened (cancelled) and is dropped, so the table cannot grow without bound.
    MAX_AGE = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._pins: dict[str, tuple[Pin, float]] = {}  # insertion order is age order
        self._clock = clock
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def name_for(self, pin: Pin) -> str:
        """A fresh reserved name for ``pin``, answered once; ``forget`` it if the dial never ran."""
        self._install(asyncio.get_running_loop())
        now = self._clock()
        while self._pins:
            oldest = next(iter(self._pins))
            if now - self._pins[oldest][1] < self.MAX_AGE:
                break
            del self._pins[oldest]
        name = f"{secrets.token_hex(8)}{PIN_SUFFIX}"
        self._pins[name] = (pin, now)
        return name

    def forget(self, name: str) -> None:
        self._pins.pop(name, None)

    def __len__(self) -> int:
        return len(self._pins)

    def answer(self, name: str, port: int, family: int = 0) -> list[AddrInfo]:
        """The addrinfo list for a reserved name: the pin's addresses, in order, numeric only.

        Each name answers once: a dial resolves its name a single time, and nothing else may.
        """
        entry = self._pins.pop(name.lower(), None)
        if entry is None:
            raise socket.gaierror(socket.EAI_NONAME, "keyless: no pinned address for this dial")
        pin = entry[0]
        infos: list[AddrInfo] = []
        for address in pin.addresses:
            # AI_NUMERICHOST: a literal in, a sockaddr out (scope ids included), never a lookup.
            infos.extend(socket.getaddrinfo(address, port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                            socket.AI_NUMERICHOST))
        if not infos:
            raise socket.gaierror(socket.EAI_FAMILY, "keyless: no pinned address of this family")
        return infos

    def _install(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop in self._loops:
            return
        original = loop.getaddrinfo

        async def getaddrinfo(host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0,
                              flags: int = 0) -> list[Any]:
            if isinstance(host, bytes):
                host = host.decode("ascii", "replace")
            if isinstance(host, str) and host.lower().rstrip(".").endswith(PIN_SUFFIX):
                return self.answer(host.lower().rstrip("."), int(port), family)
            return await original(host, port, family=family, type=type, proto=proto, flags=flags)

        # An instance attribute: asyncio's create_connection resolves with loop.getaddrinfo.
        setattr(loop, "getaddrinfo", getaddrinfo)  # noqa: B010 - mypy refuses assigning to a method
        self._loops.add(loop)


# One table per process: every Egress on a loop shares the one getaddrinfo wrapper, so two
# addons (in-process tests, a reload) never shadow each other's dial names.
DIAL_NAMES = DialNames()


def screen(host: str, port: int, answers: Iterable[str], refused: Iterable[Network],
           is_own: Callable[[str, int], bool]) -> tuple[str, ...]:
    """Every answer for ``host`` checked, in order; any refused one refuses the name.

    Refusing the whole answer (instead of dialling only its allowed part) is deliberate: see the
    module docstring. An answer that is not an address literal is refused too, since it cannot
    be checked, and so is an empty answer.
    """
    networks = tuple(refused)
    checked: list[str] = []
    for answer in answers:
        a = _resolved(answer)
        # A name may resolve to Keyless itself: that would loop, and the second hop would be
        # attested as Keyless's own (often trusted) address.
        if is_own(str(a), port):
            raise KeylessError("forbidden", f"{host} resolves to Keyless's own listener")
        # A refusal: an address that embeds a refused one (NAT64, 6to4, compatible) counts too.
        for c in checked_ips(a):
            if any(c.version == n.version and c in n for n in networks):
                raise KeylessError("forbidden", f"{host} resolves to {a}, in egress.refused_networks")
        if str(a) not in checked:
            checked.append(str(a))
    if not checked:
        raise KeylessError("upstream_dns_failed", f"{host} resolves to no address")
    return tuple(checked)


@dataclass(frozen=True, slots=True)
class EgressConfig:
    refused_ports: tuple[int, ...] = ()
    tls_origination: tuple[Origination, ...] = ()
    allow_cleartext: tuple[CleartextAllowance, ...] = ()
    refused_networks: tuple[Network, ...] = DEFAULT_REFUSED_NETWORKS


def parse(s: Section) -> EgressConfig:
    """Read the ``egress`` section (every key optional)."""
    ports = _int_list(s, "refused_ports")
    orig: list[Origination] = []
    for i, item in enumerate(_items(s, "tls_origination")):
        row = Section(item, s.key_path(f"tls_origination[{i}]"), s.problems, s.base_dir)
        host = config_host(row)
        o = Origination(host or "", row.integer("port", 80, lo=1, hi=65535),
                        row.integer("upstream_port", 443, lo=1, hi=65535))
        row.done()
        if host:
            orig.append(o)
    allow: list[CleartextAllowance] = []
    for i, item in enumerate(_items(s, "allow_cleartext")):
        row = Section(item, s.key_path(f"allow_cleartext[{i}]"), s.problems, s.base_dir)
        host = config_host(row)
        port = row.integer("port", None, lo=1, hi=65535)
        row.done()
        if host:
            allow.append(CleartextAllowance(host, port))
    networks = list(DEFAULT_REFUSED_NETWORKS)
    for key in ("refused_networks", "extra_refused_networks"):
        given = s.str_list(key, None)
        if given is None:
            continue
        if key == "refused_networks":
            networks = []
        for i, cidr in enumerate(given):
            net = s.cidr(cidr, f"{key}[{i}]")
            if net is not None:
                networks.append(net)
    return EgressConfig(tuple(ports), tuple(orig), tuple(allow), tuple(networks))


def _items(s: Section, key: str) -> list[object]:
    s.has(key)
    raw = s.raw.get(key)
    if raw is None:
        return []
    if not isinstance(raw, list):
        s.error("must be a list of {host: ..., port: ...}", key)
        return []
    return raw


def _int_list(s: Section, key: str) -> list[int]:
    s.has(key)
    raw = s.raw.get(key)
    if raw is None:
        return []
    ok = isinstance(raw, list) and all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536
                                       for p in raw)
    if not ok:
        s.error("must be a list of port numbers from 1 to 65535", key)
        return []
    return list(raw)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback literal: a hop to it never leaves the machine (or the pod).

    This check *allows* something (a cleartext credential), so an address that only embeds a
    loopback address (NAT64, 6to4, ``::127.0.0.1``) does not count: it is routed elsewhere.
    """
    ip = ip_of(host)
    if ip is None:
        return _canonical_or_none(host) == "localhost"
    return ip.is_loopback


def _canonical_or_none(host: str) -> str | None:
    try:
        return canonical_host(host)
    except KeylessError:
        return None


def _resolved(address: str) -> IPAddress:
    """An address from the resolver (which may carry an IPv6 zone id), refused if unparsable."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        raise KeylessError("forbidden", "the resolver returned something that is not an address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


async def system_resolver(host: str, port: int) -> list[str]:
    """Addresses for ``host`` from the system resolver (run off the event loop by asyncio)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class Egress:
    """The egress rules of one running Keyless; ``resolve`` is a seam for the OS resolver."""

    def __init__(self, config: EgressConfig, listen: Iterable[tuple[str, int]],
                 resolve: Resolver = system_resolver, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.resolve = resolve
        self.clock = clock
        # Keyless's own listeners: a connection to one of them is a redirect loop, or a client
        # that dialled the transparent port directly (its "original destination" is Keyless).
        self._own = tuple((ip_of(host), port) for host, port in listen)
        self._refused = frozenset(config.refused_ports)
        self.dial_names = DIAL_NAMES

    async def transparent_host(self, *, dst: tuple[str, int], tls: bool, sni: str | None,
                               host_header: str | None) -> str:
        """The destination name for a redirected connection to ``dst`` (the original address)."""
        if tls:
            # The upstream certificate is verified against the SNI, so a name that does not
            # belong to dst fails there; an absent SNI leaves the IP literal (and no credential).
            return canonical_host(sni) if sni else canonical_host(dst[0])
        if host_header is None:
            return canonical_host(dst[0])
        # The port is compared with the rest of the authority by check_authority.
        named = parse_authority(host_header, dst[1])
        name, want = named.host, ip_of(dst[0])
        if name.endswith(PIN_SUFFIX):
            # Looking it up would consume another connection's dial name (DialNames answers once).
            raise KeylessError("bad_request", f"{name} is a name Keyless reserves for its own dials")
        if named.ip is not None:
            if named.ip != want:
                raise KeylessError("misdirected_request",
                                   f"Host header {name!r} does not match the original destination {dst[0]}")
            return name
        try:
            found = await self.resolve(name, dst[1])
        except OSError:
            found = []
        if want not in {_resolved(a) for a in found}:
            raise KeylessError("misdirected_request",
                               f"Host header {name!r} does not resolve to the original destination {dst[0]}")
        return name

    def origination(self, host: str, port: int, scheme: str) -> Origination | None:
        """The TLS origination rule for a cleartext request to ``host:port``, if one applies."""
        if scheme != "http":
            return None
        host = canonical_host(host)
        return next((o for o in self.config.tls_origination if o.host == host and o.port == port), None)

    def check_injection(self, *, credential: str | None, scheme: str, host: str, port: int,
                        transparent_tls_without_sni: bool = False) -> None:
        """Refuse before a credential would be injected on a hop that cannot protect it."""
        if credential is None:
            return
        if transparent_tls_without_sni:
            raise KeylessError("misdirected_request",
                               f"TLS without SNI to {host}: no credential is injected for an IP literal")
        if scheme == "https" or is_loopback(host):
            return
        h = canonical_host(host)
        if any(a.host == h and a.port in (None, port) for a in self.config.allow_cleartext):
            return
        raise KeylessError(
            "forbidden",
            f"credential {credential!r} would leave in cleartext to {host}:{port}; use https, "
            "egress.tls_origination or egress.allow_cleartext for this destination")

    def _is_own(self, host: str, port: int) -> bool:
        if all(port != own_port for _, own_port in self._own):
            return False  # the common case, and it needs no address parsing
        # A refusal: an address that embeds one of ours (NAT64, 6to4, compatible) counts too.
        ips = checked_ips(ip_of(host))
        for own_ip, own_port in self._own:
            if port != own_port:
                continue
            if _canonical_or_none(host) == "localhost" or any(a.is_loopback or a == own_ip for a in ips):
                return True
            # A wildcard listener is every local address, but only those: refusing every host
            # that shares Keyless's port would break upstreams on, say, 8080.
            if (own_ip is None or own_ip.is_unspecified) and any(_is_local_address(a) for a in ips):
                return True
        return False

    def check_connect(self, address: tuple[str, int] | None, allowed: Container[tuple[str, int]]) -> None:
        """May Keyless open a connection to ``address``? Called before the connection exists."""
        if address is None:
            raise KeylessError("forbidden", "upstream connection without a destination")
        dest = target(str(address[0]), int(address[1]))
        host, port = dest.host, dest.port
        if port in self._refused:
            raise KeylessError("forbidden", f"port {port} is refused by egress.refused_ports")
        if self._is_own(host, port):
            raise KeylessError("forbidden", "connection to Keyless's own listener (redirect loop?)")
        if (host, port) not in allowed:
            raise KeylessError("forbidden", f"no allowed request asked for a connection to {host}:{port}")

    def dial_target(self, address: tuple[str, int] | None, pins: Mapping[tuple[str, int], Pin]) -> Pin:
        """``check_connect``, then the pin the allowed request recorded: the address to dial.

        ``pins`` maps each (host, port) an allowed request on this client connection asked for
        to the pin ``check_addresses`` made for it; there is no second resolution here.
        """
        self.check_connect(address, pins)
        if address is None:  # check_connect refuses None; explicit so python -O keeps it
            raise KeylessError("forbidden", "upstream connection without a destination")
        return pins[self.allow_key(*address)]

    async def check_addresses(self, address: tuple[str, int]) -> Pin:
        """Resolve ``address`` once and check every answer; the result is what Keyless may dial.

        Refuses (``forbidden``) when any answer is in ``refused_networks`` or is Keyless's own
        listener, and (``upstream_dns_failed``) when the name does not resolve. The caller
        connects to ``Pin.address`` and never resolves the name again.
        """
        dest = target(str(address[0]), int(address[1]))
        host, port = dest.host, dest.port
        if host.endswith(PIN_SUFFIX):
            raise KeylessError("bad_request", f"{host} is a name Keyless reserves for its own dials")
        if dest.ip is not None:
            answers = [host]
        else:
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT):
                    answers = await self.resolve(host, port)
            except TimeoutError:
                raise KeylessError("upstream_dns_failed", f"{host} did not resolve in time") from None
            except UnicodeError:
                raise KeylessError("bad_request", f"{host!r} is not a valid host name") from None
            except OSError as e:
                raise KeylessError("upstream_dns_failed", f"{host} does not resolve ({type(e).__name__})") from None
        return Pin(host, port, screen(host, port, answers, self.config.refused_networks, self._is_own), self.clock())

    async def pin_for(self, address: tuple[str, int], held: Mapping[tuple[str, int], Pin]) -> Pin:
        """The pin for ``address``: one this client connection got less than PIN_REUSE s ago, or
        ``check_addresses``. ``held`` is the client connection's pins (what dial_target reads)."""
        known = held.get(self.allow_key(*address))
        if known is not None and 0 <= self.clock() - known.at < PIN_REUSE:
            return known
        return await self.check_addresses(address)

    @staticmethod
    def allow_key(host: str, port: int) -> tuple[str, int]:
        dest = target(host, int(port))
        return dest.host, dest.port


def describe_peer(peername: tuple[Any, ...] | None) -> dict[str, Any] | None:
    """The audit form of the address an upstream socket is connected to (None: never connected).

    Read from the socket itself (mitmproxy's ``server_conn.peername``), so a reused connection
    reports the address it was really opened to, not the answer of this request's lookup.
    """
    if not peername:
        return None
    return {"address": str(peername[0]), "port": int(peername[1])}


def _is_local_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is assigned to this host (binding to it succeeds only then)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(ip), 0))
        except OSError:
            return False
    return True
