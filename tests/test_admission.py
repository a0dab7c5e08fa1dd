"""Connection caps: per address and relay-wide, counted from accept() through the handshake."""

from __future__ import annotations

import socket
import time

from relay.admission import Admission


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def refused_reply(relay) -> str:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    tls = relay.client_tls.wrap_socket(sock, server_hostname="localhost")
    try:
        return tls.makefile("rb").readline().decode().rstrip("\r\n")
    finally:
        tls.close()


def test_admission_counts_and_releases():
    gate = Admission(max_total=4, max_per_address=2)
    assert gate.admit("a") is None
    assert gate.admit("a") is None
    assert str(gate.admit("a")) == "421 4.7.0 Too many connections from your address"
    assert gate.admit("b") is None  # another address is not affected by a's share...
    assert str(gate.admit("c")) == "421 4.7.0 Too many connections, try again later"  # ...total
    assert gate.total == 5 and gate.by_address == {"a": 3, "b": 1, "c": 1}
    for address in ("a", "a", "a", "b", "c"):
        gate.release(address)
    assert gate.total == 0 and gate.by_address == {}


def test_a_flood_from_one_address_is_dropped_before_tls():
    gate = Admission(max_total=100, max_per_address=2)
    for _ in range(4):
        gate.admit("a")
    assert not gate.drop_without_reply("a")
    gate.admit("a")
    assert gate.drop_without_reply("a")
    assert not gate.drop_without_reply("b")


def test_the_next_connection_from_an_address_over_its_cap_gets_421(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_MAX_CONNECTIONS_PER_IP="2")
    first, second = relay.raw(), relay.raw()
    assert refused_reply(relay) == "421 4.7.0 Too many connections from your address"
    assert first.cmd("NOOP") == "250 2.0.0 Ok" and second.cmd("NOOP") == "250 2.0.0 Ok"
    first.close()
    wait_until(lambda: relay.relay.admission.total == 1)
    third = relay.raw()
    assert third.greeting.startswith("220 ")


def test_connections_still_in_the_handshake_count(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_MAX_CONNECTIONS_PER_IP="2")
    # Two clients that connect and never start TLS: they hold the address's share.
    stalled = [socket.create_connection(("127.0.0.1", relay.port)) for _ in range(2)]
    wait_until(lambda: relay.relay.admission.total == 2)
    assert relay.relay.sessions == set()  # no session yet: both are in the handshake
    assert refused_reply(relay) == "421 4.7.0 Too many connections from your address"
    for sock in stalled:
        sock.close()
    wait_until(lambda: relay.relay.admission.total == 0)
    assert relay.raw().greeting.startswith("220 ")


def test_the_relay_wide_cap_counts_handshakes_too(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_MAX_CONNECTIONS="1")
    stalled = socket.create_connection(("127.0.0.1", relay.port))
    wait_until(lambda: relay.relay.admission.total == 1)
    assert refused_reply(relay) == "421 4.7.0 Too many connections, try again later"
    stalled.close()
    wait_until(lambda: relay.relay.admission.total == 0)
    assert relay.raw().greeting.startswith("220 ")


def test_closed_connections_are_counted_for_the_memory_trim():
    gate = Admission(max_total=10, max_per_address=10)
    for address in ("a", "b", "a"):
        gate.admit(address)
    gate.release("a")
    gate.release("b")
    assert gate.take_closed() == 2
    assert gate.take_closed() == 0
    gate.release("a")
    assert gate.closed == 1 and gate.total == 0
