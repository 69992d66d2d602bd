"""Host-header and authority checks (moving to ``proxy.authority``)."""

from __future__ import annotations

import ipaddress

from proxy.errors import KeylessError


def _norm(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_host_header(value: str, default_port: int) -> tuple[str, int] | None:
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = value.partition(":")
    if not host:
        return None
    if not port_text:
        return _norm(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return _norm(host), int(port_text)


def check_authority(*, scheme: str, host: str, port: int, host_header: str | None,
                    connect: tuple[str, int] | None, tls: bool, sni: str | None,
                    authority: str | None = None) -> None:
    """The CONNECT authority, TLS SNI and Host header must all name the destination.

    mitmproxy never compares them; a mismatch could route a credential meant for one host to
    another (domain fronting), so it is refused with 421 before anything is injected.
    """
    target = _norm(host)

    def misdirected(why: str) -> KeylessError:
        return KeylessError("misdirected_request", why)

    if connect is not None and (_norm(connect[0]), connect[1]) != (target, port):
        raise misdirected(f"request for {host}:{port} inside a tunnel to {connect[0]}:{connect[1]}")
    if tls:
        if sni is None:
            if not _is_ip(target):
                raise misdirected("TLS without SNI for a named host")
        elif _norm(sni) != target:
            raise misdirected(f"TLS SNI {sni!r} does not match {host!r}")
    default_port = 443 if scheme == "https" else 80
    # An absolute-form request line inside a tunnel names a third authority; servers must
    # prefer it over Host (RFC 9112 3.2.2), so it has to agree as well.
    for what, value in (("request target", authority), ("Host header", host_header)):
        if not value:
            continue
        parsed = split_host_header(value, default_port)
        if parsed is None:
            raise KeylessError("bad_request", f"malformed {what}")
        if parsed != (target, port):
            raise misdirected(f"{what} {value!r} does not match {host}:{port}")
