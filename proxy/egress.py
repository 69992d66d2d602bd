"""Destination rules: what may leave Keyless, where to, and whether a credential may ride along.

Four checks live here, all plain functions over plain values so that ``proxy.addon`` stays a
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
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class EgressConfig:
    refused_ports: tuple[int, ...] = ()
    tls_origination: tuple[Origination, ...] = ()
    allow_cleartext: tuple[CleartextAllowance, ...] = ()
    refused_networks: tuple[Network, ...] = DEFAULT_REFUSED_NETWORKS
    # TRACE echoes the request: "refuse" (403) or "forward_bare" (decided, never a credential).
    trace: str = "refuse"


def parse(s: Section) -> EgressConfig:
    """Read the ``egress`` section (every key optional)."""
    ports = _int_list(s, "refused_ports")
    orig: list[Origination] = []
    for i, item in enumerate(_items(s, "tls_origination")):
        row = Section(item, s.key_path(f"tls_origination[{i}]"), s.problems, s.base_dir)
        host = row.text("host")
        o = Origination(_norm(host) if host else "", row.integer("port", 80, lo=1, hi=65535),
                        row.integer("upstream_port", 443, lo=1, hi=65535))
        row.done()
        if host:
            orig.append(o)
    allow: list[CleartextAllowance] = []
    for i, item in enumerate(_items(s, "allow_cleartext")):
        row = Section(item, s.key_path(f"allow_cleartext[{i}]"), s.problems, s.base_dir)
        host = row.text("host")
        port = row.integer("port", None, lo=1, hi=65535)
        row.done()
        if host:
            allow.append(CleartextAllowance(_norm(host), port))
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
    trace = s.choice("trace", ("refuse", "forward_bare"), "refuse")
    return EgressConfig(tuple(ports), tuple(orig), tuple(allow), tuple(networks), trace)


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


def _norm(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(_norm(host))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, compatible) are checked as
        # that IPv4 address, or ::a9fe:a9fe would slip past a 169.254.0.0/16 rule.
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64 or (ip.packed[:12] == bytes(12) and int(ip) > 0xFFFF):
            return ipaddress.IPv4Address(ip.packed[12:])
    return ip


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback literal: a hop to it never leaves the machine (or the pod)."""
    if _norm(host) == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


async def system_resolver(host: str, port: int) -> list[str]:
    """Addresses for ``host`` from the system resolver (run off the event loop by asyncio)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _host_of(host_header: str) -> str:
    value = host_header.strip()
    if value.startswith("["):
        return _norm(value[1:value.find("]")] if "]" in value else value)
    return _norm(value.rsplit(":", 1)[0] if value.count(":") == 1 else value)


class Egress:
    """The egress rules of one running Keyless; ``resolve`` is a seam for the OS resolver."""

    def __init__(self, config: EgressConfig, listen: Iterable[tuple[str, int]],
                 resolve: Resolver = system_resolver) -> None:
        self.config = config
        self.resolve = resolve
        # Keyless's own listeners: a connection to one of them is a redirect loop, or a client
        # that dialled the transparent port directly (its "original destination" is Keyless).
        self._own = tuple((_ip(host), port) for host, port in listen)
        self._refused = frozenset(config.refused_ports)

    async def transparent_host(self, *, dst: tuple[str, int], tls: bool, sni: str | None,
                               host_header: str | None) -> str:
        """The destination name for a redirected connection to ``dst`` (the original address)."""
        if tls:
            # The upstream certificate is verified against the SNI, so a name that does not
            # belong to dst fails there; an absent SNI leaves the IP literal (and no credential).
            return _norm(sni) if sni else _norm(dst[0])
        if host_header is None:
            return _norm(dst[0])
        name = _host_of(host_header)
        if not name:
            raise KeylessError("bad_request", "malformed Host header")
        want = _ip(dst[0])
        if _ip(name) is not None:
            if _ip(name) != want:
                raise KeylessError("misdirected_request",
                                   f"Host header {name!r} does not match the original destination {dst[0]}")
            return name
        try:
            found = await self.resolve(name, dst[1])
        except OSError:
            found = []
        if want not in {_ip(a) for a in found}:
            raise KeylessError("misdirected_request",
                               f"Host header {name!r} does not resolve to the original destination {dst[0]}")
        return name

    def origination(self, host: str, port: int, scheme: str) -> Origination | None:
        """The TLS origination rule for a cleartext request to ``host:port``, if one applies."""
        if scheme != "http":
            return None
        host = _norm(host)
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
        h = _norm(host)
        if any(a.host == h and a.port in (None, port) for a in self.config.allow_cleartext):
            return
        raise KeylessError(
            "forbidden",
            f"credential {credential!r} would leave in cleartext to {host}:{port}; use https, "
            "egress.tls_origination or egress.allow_cleartext for this destination")

    def _is_own(self, host: str, port: int) -> bool:
        ip = _ip(host)
        for own_ip, own_port in self._own:
            if port != own_port:
                continue
            if is_loopback(host) or (ip is not None and ip == own_ip):
                return True
            # A wildcard listener is every local address, but only those: refusing every host
            # that shares Keyless's port would break upstreams on, say, 8080.
            if (own_ip is None or own_ip.is_unspecified) and ip is not None and _is_local_address(ip):
                return True
        return False

    def check_connect(self, address: tuple[str, int] | None, allowed: set[tuple[str, int]]) -> None:
        """May Keyless open a connection to ``address``? Called before the connection exists."""
        if address is None:
            raise KeylessError("forbidden", "upstream connection without a destination")
        host, port = _norm(str(address[0])), int(address[1])
        if port in self._refused:
            raise KeylessError("forbidden", f"port {port} is refused by egress.refused_ports")
        if self._is_own(host, port):
            raise KeylessError("forbidden", "connection to Keyless's own listener (redirect loop?)")
        if (host, port) not in allowed:
            raise KeylessError("forbidden", f"no allowed request asked for a connection to {host}:{port}")

    async def check_addresses(self, address: tuple[str, int]) -> None:
        """Refuse a destination whose addresses fall in ``refused_networks`` (metadata, link-local).

        The policy allowed a name; this stops that name from resolving to an instance
        metadata service. mitmproxy resolves the name again when it connects, so a DNS answer
        that changes in between (rebinding) is not covered; see docs/deployment.md.
        """
        host, port = _norm(str(address[0])), int(address[1])
        ip = _ip(host)
        if ip is not None:
            addresses = [ip]
        else:
            try:
                async with asyncio.timeout(5):
                    found = [_ip(a) for a in await self.resolve(host, port)]
            except TimeoutError:
                raise KeylessError("forbidden", f"{host} did not resolve in time") from None
            addresses = [a for a in found if a is not None]
        for a in addresses:
            # A name may resolve to Keyless itself: that would loop, and the second hop would be
            # attested as Keyless's own (often trusted) address.
            if self._is_own(str(a), port):
                raise KeylessError("forbidden", f"{host} resolves to Keyless's own listener")
            if any(a.version == n.version and a in n for n in self.config.refused_networks):
                raise KeylessError("forbidden", f"{host} resolves to {a}, in egress.refused_networks")

    @staticmethod
    def allow_key(host: str, port: int) -> tuple[str, int]:
        return _norm(host), int(port)


def _is_local_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is assigned to this host (binding to it succeeds only then)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(ip), 0))
        except OSError:
            return False
    return True
