"""Connection caps: per address and relay-wide, counted from accept() through the handshake."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import pytest

from relay import replies
from relay.logs import OncePer
from relay.network import client_key
from relay.smtp.admission import Admission, HostCounts


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


# --- client keys: IPv4 by address, IPv6 by /64 -----------------------------------------


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff", "2001:db8::/64"),  # the same /64: the same client
        ("2001:db8:0:0:ffff:ffff:ffff:ffff", "2001:db8::/64"),
        ("2001:db8:0:1::", "2001:db8:0:1::/64"),  # the next /64: another client
        ("::ffff:1.2.3.4", "1.2.3.4"),  # an IPv4 client of a dual-stack listener
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_client_keys(address, key):
    assert client_key(address) == key


def test_an_ipv6_host_rotating_within_its_64_shares_one_cap():
    gate = Admission(max_total=100, max_per_address=2)
    assert gate.admit(client_key("2001:db8::1")) is None
    assert gate.admit(client_key("2001:db8::2")) is None
    assert gate.admit(client_key("2001:db8::ffff:3")) == replies.TOO_MANY_FROM_ADDRESS
    assert gate.admit(client_key("2001:db8:0:1::1")) is None
    assert gate.admit(client_key("::ffff:192.0.2.7")) is None
    assert gate.admit(client_key("192.0.2.7")) is None
    assert gate.admit(client_key("::ffff:192.0.2.7")) == replies.TOO_MANY_FROM_ADDRESS


# --- the per-address count shared by the workers of a host ------------------------------


@pytest.fixture
def host_counts():
    made: list[HostCounts] = []

    def make(workers: int) -> HostCounts:
        made.append(HostCounts(workers))
        return made[-1]

    yield make
    for counts in made:
        counts.close()


def test_host_counts_add_every_workers_connections(host_counts):
    counts = host_counts(3)
    first = Admission(max_total=100, max_per_address=3, shared=counts)
    counts.serve_as(0)
    assert first.admit("192.0.2.1") is None
    assert first.admit("192.0.2.1") is None
    counts.serve_as(1)  # as another worker would, with its own row
    assert first.admit("192.0.2.1") is None
    assert first.admit("192.0.2.1") == replies.TOO_MANY_FROM_ADDRESS
    assert counts.count("192.0.2.1") == 4 and counts.count("192.0.2.2") == 0
    first.release("192.0.2.1")  # from row 1
    assert counts.count("192.0.2.1") == 3
    counts.forget(0)  # worker 0 exited: its two connections went with it
    assert counts.count("192.0.2.1") == 1
    counts.serve_as(2)
    assert first.admit("192.0.2.1") is None


def test_host_counts_are_shared_with_forked_workers(host_counts):
    counts = host_counts(2)
    counts.serve_as(0)
    counts.add("192.0.2.1")
    child = os.fork()
    if child == 0:  # a worker: counts in its own row, seen by the parent
        code = 1
        try:
            counts.serve_as(1)
            code = 0 if counts.add("192.0.2.1") == 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert counts.count("192.0.2.1") == 2


# --- refused connections: no traceback, one log line per address a minute ---------------


def test_once_per_logs_each_key_once_an_interval_and_remembers_a_bounded_number():
    now = [0.0]
    gate = OncePer(60.0, max_keys=3, clock=lambda: now[0])
    assert [gate.allow(k) for k in ("a", "a", "b", "c", "d", "e", "b")] == [
        True, False, True, True, False, False, False,
    ]  # fmt: skip
    assert gate.unlogged() == 2  # d and e: no room
    assert gate.unlogged() == 0  # reported once an interval
    now[0] = 59.9
    assert not gate.allow("a")
    now[0] = 60.0
    assert gate.allow("d") and gate.allow("a")
    for n in range(10_000):  # a flood from many keys: memory stays bounded
        gate.allow(f"k{n}")
    assert len(gate._logged) <= 3
    now[0] = 120.0
    assert gate.unlogged() == 10_000 - 1


def send_after_refusal(relay, source: str, close_notify: bool) -> str:
    """Connect from `source`, read the reply, send commands anyway, then end the stream."""
    sock = socket.create_connection(
        ("127.0.0.1", relay.port), timeout=5, source_address=(source, 0)
    )
    tls = relay.client_tls.wrap_socket(sock, server_hostname="localhost")
    try:
        reply = tls.makefile("rb").readline().decode().rstrip("\r\n")
        with contextlib.suppress(OSError):
            tls.sendall(b"EHLO client.test\r\nAUTH PLAIN AGFwaV90b2tlbgB4\r\nQUIT\r\n")
            if close_notify:
                tls.unwrap()  # TLS close_notify: the server's eof_received
            else:
                sock.shutdown(socket.SHUT_WR)  # a bare TCP FIN
        return reply
    finally:
        tls.close()


def test_refused_clients_that_keep_talking_log_one_line_each_and_no_traceback(
    relay_factory, sink, caplog
):
    caplog.set_level(logging.DEBUG)
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_MAX_CONNECTIONS_PER_IP="1",
        RELAY_AUTH_FAILURE_LIMIT="1",
    )
    relay.store.record_auth_failure("127.0.0.2")  # 127.0.0.2 is throttled
    held = relay.raw()  # 127.0.0.1 holds its one place
    for n in range(60):
        close_notify = n % 2 == 0
        assert send_after_refusal(relay, "127.0.0.1", close_notify) == (
            "421 4.7.0 Too many connections from your address"
        )
        assert send_after_refusal(relay, "127.0.0.2", close_notify) == (
            "421 4.7.0 Too many failed authentication attempts, try again later"
        )
        wait_until(lambda: relay.relay.admission.total == 1)
    assert held.cmd("NOOP") == "250 2.0.0 Ok"
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]
    refusals = [r.getMessage() for r in caplog.records if r.name == "relay.listener"]
    assert len(refusals) == 2
    assert "from 127.0.0.1: 421 4.7.0 Too many connections from your address" in refusals[0]
    assert "from 127.0.0.2: 421 4.7.0 Too many failed authentication attempts" in refusals[1]
    # An SMTP session was made for the held connection only.
    assert len([r for r in caplog.records if r.getMessage().startswith("Peer: ")]) == 1
