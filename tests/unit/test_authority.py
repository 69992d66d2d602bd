"""proxy.authority: every spelling of a host has one canonical form, and junk is refused.

Plain values only: the parser is a pure function. The end-to-end proof that the policy, the
upstream and the audit record all see the canonical form is tests/test_e2e_authority.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.authority import (
    Target,
    canonical_host,
    check_authority,
    checked_ips,
    embedded_ipv4,
    ip_of,
    parse_authority,
    target,
)
from proxy.config import load_config
from proxy.egress import Egress, EgressConfig, is_loopback
from proxy.errors import ConfigError, KeylessError
from tests.harness import base_config

SPELLINGS = [
    # names: case, one trailing dot, UTS-46 mapping, IDNA 2008 punycode
    ("denied.example", "denied.example"),
    ("DENIED.EXAMPLE", "denied.example"),
    ("Denied.Example.", "denied.example"),
    ("ｄｅｎｉｅｄ．example", "denied.example"),  # full-width letters and full stop
    ("denied\u3002example", "denied.example"),  # ideographic full stop
    ("Bücher.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("faß.de", "xn--fa-hia.de"),  # non-transitional, as browsers: not "fass.de"
    ("den\u00adied.exa\u200bmple", "denied.example"),  # soft hyphen, zero-width space: ignored by UTS-46
    ("localhost", "localhost"),
    ("LOCALHOST.", "localhost"),
    ("my_service", "my_service"),  # compose service names are real
    ("a-b.c-d", "a-b.c-d"),
    ("0x1g.example", "0x1g.example"),  # last label is not a number: a name
    # IPv4, every WHATWG numeric form
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0X7F000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0177.0.0.01", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0x7f.0.0.0x1", "127.0.0.1"),
    ("１２７.０.０.１", "127.0.0.1"),  # full-width digits map first, then parse as IPv4
    ("0", "0.0.0.0"),
    ("0x", "0.0.0.0"),
    ("4294967295", "255.255.255.255"),
    ("169.254.43518", "169.254.169.254"),
    # IPv6, bracketed or not, compressed; IPv4-mapped is the IPv4 address
    ("::1", "::1"),
    ("[::1]", "::1"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("[2001:DB8::0001]", "2001:db8::1"),
    ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("::FFFF:7f00:1", "127.0.0.1"),
    ("[::ffff:169.254.169.254]", "169.254.169.254"),
    # NAT64, 6to4, compatible: kept as IPv6 (routed elsewhere), see checked_ips
    ("[64:ff9b::7f00:1]", "64:ff9b::7f00:1"),
    ("[2002:7f00:1::1]", "2002:7f00:1::1"),
    ("[::127.0.0.1]", "::7f00:1"),
]


@pytest.mark.parametrize(("text", "canonical"), SPELLINGS)
def test_spellings(text: str, canonical: str) -> None:
    assert canonical_host(text) == canonical
    assert canonical_host(canonical) == canonical


REJECTS = [
    ("", "empty"),
    ("a..b", "empty label"),
    (".a", "empty label"),
    ("a..", "empty label"),
    ("a b", "labels are"),
    ("a\x00b", "labels are"),
    ("a\r\nb", "labels are"),
    ("a/b", "labels are"),
    ("-a.example", "labels are"),
    ("a-.example", "labels are"),
    ("a" * 64 + ".example", "label longer than 63"),
    (".".join(["a" * 63] * 4), "longer than 253"),
    ("x" * 5000, "longer than 1024"),
    ("a%2eb", "percent-escapes"),
    ("%31%32%37.0.0.1", "percent-escapes"),
    ("[fe80::1%eth0]", "zone ids"),
    ("fe80::1%25eth0", "zone ids"),
    ("user@host", "userinfo"),
    ("user:pw@host", "userinfo"),
    ("[::1", "unterminated"),
    ("[127.0.0.1]", "not a valid IPv6"),
    ("1::2::3", "not a valid IPv6"),
    ("[::ffff:0177.0.0.1]", "not a valid IPv6"),
    ("a:b:c", "not a valid IPv6"),
    ("xn--abc", "punycode"),
    ("xn--bcher-kva-.example", "punycode"),
    ("☃.example", "IDNA 2008"),
    ("a\ud800b.example", "not allowed"),  # a lone surrogate (from a surrogateescape decode)
    ("foo.123", "ends in a number"),
    ("1.2.3.4.5", "ends in a number"),
    ("256.0.0.1", "ends in a number"),
    ("1.16777216", "ends in a number"),
    ("4294967296", "ends in a number"),
    ("0x100000000", "ends in a number"),
    ("09.0.0.1", "ends in a number"),
    ("1..1", "empty label"),
    ("example.0x", "ends in a number"),
]


@pytest.mark.parametrize(("text", "why"), REJECTS)
def test_rejects(text: str, why: str) -> None:
    with pytest.raises(KeylessError) as e:
        canonical_host(text)
    assert e.value.code == "bad_request"
    assert why in e.value.message
    # One line, and a huge input is never echoed whole.
    assert "\n" not in e.value.message and len(e.value.message) < 200


AUTHORITIES = [
    ("api.example", 443, Target("api.example", 443)),
    ("API.Example:8443", 443, Target("api.example", 8443)),
    ("api.example.:80", 443, Target("api.example", 80)),
    (" localhost:8080\t", 80, Target("localhost", 8080)),
    ("[::1]:8443", 443, Target("::1", 8443, ipaddress.ip_address("::1"))),
    ("[::1]", 443, Target("::1", 443, ipaddress.ip_address("::1"))),
    ("[::1]:", 443, Target("::1", 443, ipaddress.ip_address("::1"))),  # empty port: default (RFC 3986)
    ("a:", 80, Target("a", 80)),
    ("2130706433:9000", 80, Target("127.0.0.1", 9000, ipaddress.ip_address("127.0.0.1"))),
    ("[::ffff:127.0.0.1]:9000", 80, Target("127.0.0.1", 9000, ipaddress.ip_address("127.0.0.1"))),
    ("api.example:00080", 443, Target("api.example", 80)),
]


@pytest.mark.parametrize(("value", "default", "expected"), AUTHORITIES)
def test_parse_authority(value: str, default: int, expected: Target) -> None:
    assert parse_authority(value, default) == expected


# The four on which broker.split_host_header and egress._host_of used to disagree, and more.
@pytest.mark.parametrize("value", ["api.example:8o", "[::1", "a:b:c", "api.example:99999", "", ":80", "[::1]x",
                                   "a:0", "a:65536", "a:-1", "a:+80", "a: 80", "a:١٢", "a:123456", "::1",
                                   "[::1]:8o", "user@api.example:443", "api.example:443/path", "[v1.x]:80"])
def test_parse_authority_rejects(value: str) -> None:
    with pytest.raises(KeylessError) as e:
        parse_authority(value, 443)
    assert e.value.code == "bad_request"


def test_target_forms() -> None:
    v6 = target("[2001:db8::1]", 443)
    assert (v6.host, v6.authority, v6.host_header("https"), v6.host_header("http")) == \
        ("2001:db8::1", "[2001:db8::1]:443", "[2001:db8::1]", "[2001:db8::1]:443")
    name = target("API.example", 8080)
    assert (name.authority, name.host_header("http"), name.ip, str(name)) == \
        ("api.example:8080", "api.example:8080", None, "api.example:8080")
    assert target("api.example", 80).host_header("http") == "api.example"
    for port in (0, 65536, -1, True):
        with pytest.raises(KeylessError):
            target("api.example", port)


def test_embedded_ipv4_is_checked_only_by_refusals() -> None:
    v4 = ipaddress.IPv4Address("169.254.169.254")
    for text in ("64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "::a9fe:a9fe"):
        ip = ip_of(text)
        assert ip is not None and ip.version == 6 and embedded_ipv4(ip) == v4
        assert checked_ips(ip) == (ip, v4)
    assert ip_of("::ffff:169.254.169.254") == v4  # mapped: it *is* the IPv4 address
    assert checked_ips(v4) == (v4,)
    assert checked_ips(ipaddress.IPv6Address("::1")) == (ipaddress.IPv6Address("::1"),)  # not "0.0.0.1"
    assert checked_ips(None) == ()
    assert ip_of("api.example") is None and ip_of("foo.123") is None


def test_check_authority_compares_canonical_forms() -> None:
    # Different spellings of one destination agree...
    check_authority(scheme="https", target=target("127.1", 443), host_header="2130706433",
                    connect=parse_authority("0x7f000001:443", 443), tls=True, sni=None,
                    authority="[::ffff:127.0.0.1]:443")
    check_authority(scheme="https", target=target("api.example", 443), host_header="API.EXAMPLE.:443",
                    connect=parse_authority("api.example.:443", 443), tls=True, sni="Api.Example.")
    # ...and no spelling hides a different one.
    with pytest.raises(KeylessError) as e:
        check_authority(scheme="http", target=target("127.0.0.1", 80), host_header="127.0.0.2",
                        connect=None, tls=False, sni=None)
    assert e.value.code == "misdirected_request"
    with pytest.raises(KeylessError) as e:
        check_authority(scheme="https", target=target("api.example", 443), host_header=None,
                        connect=None, tls=True, sni="api.example:443")
    assert e.value.code == "bad_request" and "SNI" in e.value.message
    with pytest.raises(KeylessError) as e:
        check_authority(scheme="http", target=target("api.example", 80), host_header="api.example:8o",
                        connect=None, tls=False, sni=None)
    assert e.value.code == "bad_request" and "Host header" in e.value.message


def test_config_hosts_are_canonical_and_bad_ones_name_their_key(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, egress={
        "tls_origination": [{"host": "API.Example.", "port": 80}, {"host": "foo.123"}],
        "allow_cleartext": [{"host": "[::FFFF:10.0.0.1]"}, {"host": "a..b"}]})
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "k.yaml")
    text = "\n".join(err.value.problems)
    assert "egress.tls_origination[1].host: is not a valid host" in text, text
    assert "egress.allow_cleartext[1].host: is not a valid host" in text, text
    assert "tls_origination[0]" not in text and "allow_cleartext[0]" not in text
    cfg["egress"]["tls_origination"].pop()
    cfg["egress"]["allow_cleartext"].pop()
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(cfg))
    egress = load_config(tmp_path / "k.yaml").egress
    assert [o.host for o in egress.tls_origination] == ["api.example"]
    assert [a.host for a in egress.allow_cleartext] == ["10.0.0.1"]


# --- properties ------------------------------------------------------------------------------

HOSTISH = st.text(alphabet=string.ascii_letters + string.digits + ".-_:[]%@ xX\u3002ｄ１ßü", max_size=40)


@settings(max_examples=500, deadline=None)
@given(st.one_of(HOSTISH, st.text(max_size=40)))
@example("0x7f.1.")
@example("[::ffff:7f00:1]")
def test_canonical_host_is_idempotent_and_refuses_only_with_bad_request(text: str) -> None:
    try:
        once = canonical_host(text)
    except KeylessError as e:
        assert e.code == "bad_request" and "\n" not in e.message
        return
    assert canonical_host(once) == once
    assert once.isascii() and once == once.lower() and len(once) <= 253
    # An authority built from the canonical form parses back to the same Target.
    t = target(once, 8443)
    assert parse_authority(t.authority, 1) == t
    assert parse_authority(t.host_header("https"), 8443) == t


def _ipv4_spelling(value: int, parts: int, radixes: list[str], upper: bool, dot: bool) -> str:
    """``value`` written WHATWG-style in ``parts`` parts, each in the given radix."""
    tail_bytes = 5 - parts
    head = [(value >> (8 * (3 - i))) & 0xFF for i in range(parts - 1)]
    numbers = [*head, value & ((1 << (8 * tail_bytes)) - 1)]
    out = []
    for n, radix in zip(numbers, radixes, strict=False):
        if radix == "hex":
            text = ("0X" if upper else "0x") + (format(n, "X" if upper else "x") if n or upper else "")
        elif radix == "oct":
            text = "0" + format(n, "o")
        else:
            text = str(n)
        out.append(text)
    return ".".join(out) + ("." if dot else "")


@settings(max_examples=1000, deadline=None)
@given(value=st.integers(0, 2**32 - 1), parts=st.integers(1, 4),
       radixes=st.lists(st.sampled_from(["dec", "hex", "oct"]), min_size=4, max_size=4),
       upper=st.booleans(), dot=st.booleans())
def test_every_numeric_ipv4_spelling_is_the_dotted_quad(value: int, parts: int, radixes: list[str],
                                                        upper: bool, dot: bool) -> None:
    text = _ipv4_spelling(value, parts, radixes, upper, dot)
    quad = str(ipaddress.IPv4Address(value))
    assert canonical_host(text) == quad, text
    assert canonical_host(f"[::ffff:{quad}]") == quad
    assert parse_authority(f"{text}:8080", 80) == Target(quad, 8080, ipaddress.IPv4Address(value))


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**128 - 1), st.booleans(), st.booleans())
def test_every_ipv6_spelling_is_the_compressed_form(value: int, exploded: bool, upper: bool) -> None:
    ip = ipaddress.IPv6Address(value)
    text = ip.exploded if exploded else ip.compressed
    text = text.upper() if upper else text
    want = str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else ip.compressed
    assert canonical_host(text) == want
    assert canonical_host(f"[{text}]") == want
    assert parse_authority(f"[{text}]:443", 80).host == want


# --- the egress checks use the same canonical form -------------------------------------------


def test_egress_checks_see_the_canonical_form() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        # A stand-in for DNS (only canonical names are ever asked for).
        return {"api.example": ["10.0.0.2"]}.get(host, [])

    e = Egress(EgressConfig(), [("127.0.0.1", 15001)], resolve)
    # Transparent mode: a Host header spelled numerically names the dialled address.
    assert asyncio.run(e.transparent_host(dst=("10.0.0.2", 80), tls=False, sni=None,
                                          host_header="0x0a000002")) == "10.0.0.2"
    assert asyncio.run(e.transparent_host(dst=("10.0.0.2", 80), tls=False, sni=None,
                                          host_header="API.EXAMPLE.:80")) == "api.example"
    with pytest.raises(KeylessError) as bad:
        asyncio.run(e.transparent_host(dst=("10.0.0.2", 80), tls=False, sni=None, host_header="api.example:8o"))
    assert bad.value.code == "bad_request"
    # The connection gate matches whatever spelling mitmproxy holds against the allowed set.
    e.check_connect(("2130706433", 9000), {Egress.allow_key("127.0.0.1", 9000)})
    e.check_connect(("::ffff:127.0.0.1", 9000), {Egress.allow_key("127.1", 9000)})
    with pytest.raises(KeylessError):
        e.check_connect(("127.0.0.2", 9000), {Egress.allow_key("127.1", 9000)})
    # Every spelling of the metadata address is refused, and of Keyless's own listener.
    for host in ("0xa9fea9fe", "169.254.43518", "[::ffff:169.254.169.254]", "64:ff9b::a9fe:a9fe"):
        with pytest.raises(KeylessError) as refused:
            asyncio.run(e.check_addresses((host, 80)))
        assert "refused_networks" in refused.value.message, host
    with pytest.raises(KeylessError) as own:
        asyncio.run(e.check_addresses(("2130706433", 15001)))
    assert "own listener" in own.value.message
    # Loopback *allows* a cleartext credential: only addresses that are loopback count.
    assert is_loopback("LOCALHOST.") and is_loopback("0x7f000001") and is_loopback("[::ffff:127.0.0.1]")
    assert not is_loopback("::127.0.0.1") and not is_loopback("64:ff9b::7f00:1")
