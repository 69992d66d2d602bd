"""The pure parts of DNS pinning (proxy.egress): one resolution, every answer checked, one dial.

The resolver is Egress's seam; the end-to-end proof with a real DNS server whose answers
change between queries is tests/test_dns_rebinding.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket

import pytest

from proxy.egress import (
    DEFAULT_REFUSED_NETWORKS,
    PIN_REUSE,
    PIN_SUFFIX,
    DialNames,
    Egress,
    EgressConfig,
    Pin,
    describe_peer,
    screen,
)
from proxy.errors import KeylessError

NETS = DEFAULT_REFUSED_NETWORKS + (ipaddress.ip_network("10.0.0.0/8"),)


def _never_own(host: str, port: int) -> bool:
    return False


def _screen(*answers: str) -> tuple[str, ...]:
    return screen("api.test", 443, answers, NETS, _never_own)


def test_every_answer_is_checked_and_a_mixed_answer_refuses_the_name() -> None:
    assert _screen("192.0.2.7") == ("192.0.2.7",)
    assert _screen("192.0.2.7", "2001:db8::7", "192.0.2.7") == ("192.0.2.7", "2001:db8::7")  # order kept, deduped
    for answers in (("169.254.169.254",), ("192.0.2.7", "169.254.169.254"), ("169.254.169.254", "192.0.2.7"),
                    ("192.0.2.7", "10.1.2.3"), ("192.0.2.7", "::ffff:169.254.169.254"),
                    ("2001:db8::7", "fe80::1%lo"), ("192.0.2.7", "64:ff9b::a9fe:a9fe")):
        with pytest.raises(KeylessError) as refused:
            _screen(*answers)
        assert refused.value.code == "forbidden" and "refused_networks" in refused.value.message, answers


def test_unusable_answers_fail_closed() -> None:
    with pytest.raises(KeylessError) as empty:
        _screen()
    assert empty.value.code == "upstream_dns_failed"
    with pytest.raises(KeylessError) as odd:
        _screen("192.0.2.7", "not-an-address")
    assert odd.value.code == "forbidden"
    with pytest.raises(KeylessError) as own:
        screen("loop.test", 15001, ["127.0.0.1"], NETS, lambda host, port: port == 15001)
    assert "own listener" in own.value.message


def test_the_name_is_resolved_once_per_check_and_the_pin_is_that_answer() -> None:
    # A rebinding resolver: public, refused, public, ... (what a TTL-0 attacker's DNS answers).
    answers = itertools.cycle([["192.0.2.7"], ["169.254.169.254"]])
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    e = Egress(EgressConfig(), [("127.0.0.1", 15001)], rebinding)
    pin = asyncio.run(e.check_addresses(("API.Test.", 443)))
    assert pin == Pin("api.test", 443, ("192.0.2.7",)) and pin.address == ("192.0.2.7", 443)
    assert calls == ["api.test"]
    with pytest.raises(KeylessError):
        asyncio.run(e.check_addresses(("api.test", 443)))  # the second lookup answers the refused address
    assert len(calls) == 2
    # A literal is its own answer: no lookup at all.
    assert asyncio.run(e.check_addresses(("[2001:db8::9]", 443))).address == ("2001:db8::9", 443)
    assert len(calls) == 2


def test_resolver_failures_become_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fails(host: str, port: int) -> list[str]:
        if host == "slow.test":
            await asyncio.sleep(60)
        if host == "bad.test":
            raise UnicodeError("label too long")
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    e = Egress(EgressConfig(), [("127.0.0.1", 15001)], fails)
    with pytest.raises(KeylessError) as missing:
        asyncio.run(e.check_addresses(("missing.test", 443)))
    assert missing.value.code == "upstream_dns_failed" and missing.value.status == 502
    with pytest.raises(KeylessError) as bad:
        asyncio.run(e.check_addresses(("bad.test", 443)))
    assert bad.value.code == "bad_request"

    monkeypatch.setattr("proxy.egress.RESOLVE_TIMEOUT", 0.05)
    with pytest.raises(KeylessError) as timeout:
        asyncio.run(e.check_addresses(("slow.test", 443)))
    assert timeout.value.code == "upstream_dns_failed"


def test_the_dial_target_is_the_pin_an_allowed_request_recorded() -> None:
    e = Egress(EgressConfig(), [("127.0.0.1", 15001)])
    pin = Pin("api.test", 443, ("192.0.2.7", "192.0.2.8"))
    pins = {("api.test", 443): pin}
    assert e.dial_target(("API.test", 443), pins) is pin
    assert pin.address == ("192.0.2.7", 443)  # the first; DialNames offers the rest as fallback
    for address in (("api.test", 8443), ("other.test", 443), None):
        with pytest.raises(KeylessError):
            e.dial_target(address, pins)


def test_the_audit_form_of_the_dialled_address() -> None:
    assert describe_peer(("192.0.2.7", 443)) == {"address": "192.0.2.7", "port": 443}
    assert describe_peer(("2001:db8::7", 443, 0, 0)) == {"address": "2001:db8::7", "port": 443}
    assert describe_peer(None) is None


def test_a_dial_name_connects_only_to_the_pinned_addresses_in_order() -> None:
    """The reserved name mitmproxy dials: the pin's addresses with fallback, and nothing else."""

    async def run() -> None:
        accepted: list[str] = []

        async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer.get_extra_info("sockname")[0])
            writer.close()

        server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        names = DialNames()
        # 127.0.0.2 is loopback with nothing listening on this port: refused, so the dial moves on.
        name = names.name_for(Pin("api.test", port, ("127.0.0.2", "127.0.0.1")))
        assert name.endswith(PIN_SUFFIX) and len(names) == 1
        reader, writer = await asyncio.open_connection(name, port)
        assert writer.get_extra_info("peername")[0] == "127.0.0.1"
        writer.close()
        # A dial name answers once; a used, forgotten or never issued one does not resolve.
        assert len(names) == 0
        with pytest.raises(socket.gaierror):
            await asyncio.open_connection(name, port)
        unused = names.name_for(Pin("api.test", port, ("127.0.0.1",)))
        names.forget(unused)
        with pytest.raises(socket.gaierror):
            await asyncio.open_connection(unused, port)
        with pytest.raises(socket.gaierror):
            await asyncio.open_connection("0123456789abcdef" + PIN_SUFFIX, port)
        # Every other name still goes to the real resolver.
        assert (await asyncio.get_running_loop().getaddrinfo("127.0.0.1", port))[0][4][0] == "127.0.0.1"
        await asyncio.sleep(0.05)
        server.close()
        assert accepted == ["127.0.0.1"]

    asyncio.run(run())


def test_a_request_for_a_reserved_dial_name_is_refused() -> None:
    e = Egress(EgressConfig(), [("127.0.0.1", 15001)])
    with pytest.raises(KeylessError) as reserved:
        asyncio.run(e.check_addresses(("abc" + PIN_SUFFIX, 443)))
    assert reserved.value.code == "bad_request"
    with pytest.raises(KeylessError) as header:
        asyncio.run(e.transparent_host(dst=("192.0.2.7", 80), tls=False, sni=None,
                                       host_header="abc" + PIN_SUFFIX.upper() + ":80"))
    assert header.value.code == "bad_request"


def test_a_client_connection_reuses_a_young_pin_and_looks_up_an_old_one() -> None:
    now = [100.0]
    answers = itertools.cycle([["192.0.2.7"], ["169.254.169.254"]])
    calls: list[tuple[str, int]] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return next(answers)

    e = Egress(EgressConfig(), [("127.0.0.1", 15001)], rebinding, clock=lambda: now[0])
    held: dict[tuple[str, int], Pin] = {}
    pin = asyncio.run(e.pin_for(("api.test", 443), held))
    assert pin.address == ("192.0.2.7", 443) and pin.at == 100.0
    held[("api.test", 443)] = pin
    now[0] += PIN_REUSE - 0.1
    assert asyncio.run(e.pin_for(("API.test", 443), held)) is pin
    assert calls == [("api.test", 443)]
    now[0] += 0.2  # too old: looked up again, and this answer (the metadata address) is refused
    with pytest.raises(KeylessError):
        asyncio.run(e.pin_for(("api.test", 443), held))
    assert calls == [("api.test", 443)] * 2
    # Another port is another pin: never served from this one.
    asyncio.run(e.pin_for(("api.test", 8443), held))
    assert calls[-1] == ("api.test", 8443)


def test_dial_names_of_dials_that_never_ran_expire() -> None:
    now = [0.0]
    names = DialNames(clock=lambda: now[0])

    async def run() -> None:
        pin = Pin("api.test", 443, ("192.0.2.7",))
        stale = names.name_for(pin)
        now[0] += DialNames.MAX_AGE + 1
        fresh = names.name_for(pin)
        assert len(names) == 1
        with pytest.raises(socket.gaierror):
            names.answer(stale, 443)
        assert [info[4][0] for info in names.answer(fresh, 443)] == ["192.0.2.7"]

    asyncio.run(run())
