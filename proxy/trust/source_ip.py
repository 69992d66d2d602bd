"""``source_ip``: map the caller's source address to a workload id by CIDR.

Weak evidence (addresses get reused and spoofed on shared networks), but it needs nothing from
the workload. The most specific matching CIDR wins, as in a routing table.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from types import MappingProxyType

from proxy.confread import Section
from proxy.model import Attestation
from proxy.trust import Caller

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_SEEN_MAX = 4096


@dataclass(frozen=True, slots=True)
class SourceIpOptions:
    # Sorted most specific first so the first match is the longest prefix.
    workloads: tuple[tuple[Network, str], ...]


def parse(s: Section) -> SourceIpOptions:
    rows: list[tuple[Network, str]] = []
    raw = s.raw.get("workloads")
    s.has("workloads")
    if not isinstance(raw, list) or not raw:
        s.error("is required: a list of {cidr: ..., id: ...}", "workloads")
        raw = []
    for i, item in enumerate(raw):
        row = Section(item, s.key_path(f"workloads[{i}]"), s.problems, s.base_dir)
        net = row.cidr(row.raw.get("cidr"), "cidr")
        row.has("cidr")
        wid = row.text("id")
        row.done()
        if net is not None and wid:
            rows.append((net, wid))
    rows.sort(key=lambda r: r[0].prefixlen, reverse=True)
    return SourceIpOptions(tuple(rows))


class SourceIpProvider:
    type = "source_ip"

    def __init__(self, name: str, options: SourceIpOptions) -> None:
        self.name = name
        self.options = options
        # Per source address, its attestation (None: no workload matches). A pure function of
        # the address and the frozen options, asked on every request: memoised, bounded.
        self._seen: dict[str, Attestation | None] = {}

    def match(self, address: str) -> tuple[Network, str] | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for net, wid in self.options.workloads:
            if ip.version == net.version and ip in net:
                return net, wid
        return None

    async def attest(self, caller: Caller) -> Attestation | None:
        address = caller.address
        try:
            return self._seen[address]
        except KeyError:
            pass
        found = self.match(address)
        att = None if found is None else Attestation(
            self.name, self.type, found[1], MappingProxyType({"address": address, "cidr": str(found[0])}))
        if len(self._seen) >= _SEEN_MAX:
            self._seen.clear()
        self._seen[address] = att
        return att
