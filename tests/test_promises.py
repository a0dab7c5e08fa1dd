"""Promises the README and docs/ make, each with a test that fails when the promise breaks.

Each test here guards against a one-line change to `relay/` (a mutation) that
no other test caught, and was seen to fail with its mutation applied. Where the promise is
about the wire, the test talks to the real relay over real TLS, with a real
aiosmtpd upstream behind it.
"""

from __future__ import annotations

import multiprocessing
import select
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import DOMAIN, SENDER, Raw, b64, message, plain

from relay.config import Limits, Upkeep, load_settings
from relay.errors import StoreError
from relay.store.facade import Refused, Store
from relay.upstreams import resend_domain_key

DELIVERED = "250 2.0.0 Ok <"


def begin_data(raw: Raw, rcpts: tuple[str, ...] = ("a@dest.test",)) -> None:
    """MAIL, RCPT and DATA, each accepted: the next bytes are the message."""
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    for rcpt in rcpts:
        assert raw.cmd(f"RCPT TO:<{rcpt}>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA") == "354 Start mail input; end with <CR><LF>.<CR><LF>"


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll a condition, bounded; True once it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- a bare LF never ends DATA (SMTP smuggling) ---------------------------------------

# The endings SMTP smuggling scanners try (SEC Consult's SMTP-Smuggling-Tools,
# smtpsmug): each one some server somewhere took for CRLF "." CRLF. Only the
# real CRLF "." CRLF ends DATA here (RFC 5321 section 4.1.1.4).
SMUGGLING_ENDINGS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r\n\x00.\r\n",
    b"\n.\r",
    b"\r\n.\r\r\n",
    b"\r\n\r.\r\n",
    b"\r\n.\x00\r\n",
]

SMUGGLED = (
    b"MAIL FROM:<evil@example.com>\r\n"
    b"RCPT TO:<victim@dest.test>\r\n"
    b"DATA\r\n"
    b"From: evil@example.com\r\nTo: victim@dest.test\r\nSubject: smuggled\r\n\r\n"
    b"smuggled body\r\n"
)


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=lambda e: repr(e)[2:-1])
def test_a_fake_end_of_data_never_lets_a_second_message_through(relay, sink, ending):
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    headers = message(body="").removesuffix(b"\r\n")  # ends with the blank line
    raw.sock.sendall(headers + b"start" + ending + SMUGGLED + b".\r\n")
    if b"\x00" in ending:
        # A next hop that drops NUL would see CRLF "." CRLF: refused whole.
        assert raw.read() == (
            "554 5.6.0 Message contains a NUL octet, which 8BITMIME content must not"
            " (RFC 6152 section 3)"
        )
        assert raw.cmd("NOOP") == "250 2.0.0 Ok"
        assert sink.messages == []
        assert relay.store.list_senders() == []  # nothing charged
        return
    assert raw.read().startswith(DELIVERED)
    # Had the fake ending ended the data, the smuggled MAIL, RCPT and DATA
    # would have had replies of their own queued before this one.
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"
    [received] = sink.messages
    assert received.rcpt_tos == ["a@dest.test"]
    assert received.mail_from == SENDER
    assert b"RCPT TO:<victim@dest.test>" in received.content
    assert received.content.endswith(b"smuggled body\r\n")
    assert relay.store.show_sender(SENDER)["balance"] == 999


# --- a reused upstream connection is replaced only before anything was sent -----------


def test_upstream_dropping_a_reused_connection_after_the_data_is_never_resent(relay, sink):
    original = sink.recorder.handle_DATA
    drops = []

    async def take_then_drop(server: Any, session: Any, envelope: Any) -> str:
        reply = await original(server, session, envelope)
        if len(sink.messages) == 2 and not drops:
            # The content was taken; the connection dies before the reply.
            drops.append(server.transport)
            server.transport.abort()
        return reply

    sink.recorder.handle_DATA = take_then_drop
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    raw.send(message(subject="first") + b".")
    assert raw.read().startswith(DELIVERED)
    assert sink.recorder.connections == 1  # the second message reuses it
    begin_data(raw)
    raw.send(message(subject="second") + b".")
    assert raw.read() == "451 4.3.0 smtp: upstream closed the connection"
    assert drops
    subjects = [m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages]
    assert subjects == [b"first", b"second"]
    # The second message was refunded: the client will send it again.
    assert relay.store.show_sender(SENDER)["balance"] == 999
    assert relay.store.pending_count() == 0


# --- 5 MiB per message ------------------------------------------------------------------


def test_a_message_just_under_5_mib_arrives_byte_exact(relay, sink):
    assert Limits().max_message_size == 5 * 1024 * 1024
    headers = message(
        body="",
        extra="Message-ID: <big.1@example.com>\r\nDate: Sun, 22 Nov 2026 06:00:00 +0000\r\n",
    )
    line = b"y" * 998 + b"\r\n"
    content = headers + line * ((int(4.9 * 1024 * 1024) - len(headers)) // len(line))
    assert 4.85 * 1024 * 1024 < len(content) <= 4.9 * 1024 * 1024
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    raw.sock.sendall(content + b".\r\n")
    assert raw.read() == "250 2.0.0 Ok <big.1@example.com>"
    [received] = sink.messages
    assert received.content == content


# --- exactly one From: ------------------------------------------------------------------


def test_two_from_headers_are_554_and_nothing_is_sent(relay, sink):
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    raw.send(message(extra=f"From: other@{DOMAIN}\r\n") + b".")
    assert raw.read() == "554 5.6.0 Message must have exactly one From header (RFC 5322)"
    assert sink.messages == []
    assert relay.store.list_senders() == []  # nothing charged: no sender row was made
    assert relay.store.pending_count() == 0


# --- Sender: on another account's domain is refused -------------------------------------


def test_sender_header_on_another_accounts_domain_is_refused(relay, sink):
    relay.token("other", "other.test")
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    raw.send(message(extra="Sender: boss@other.test\r\n") + b".")
    assert raw.read() == (
        "550 5.7.1 Sender denied: header address boss@other.test"
        " is not on a domain of this token's account"
    )
    assert sink.messages == []
    assert relay.store.list_senders() == []  # nothing charged: no sender row was made


# --- the charge takes SQLite's write lock -----------------------------------------------


def _spend(path: Path, account_id: int, start: Any, results: Any, attempts: int) -> None:
    """One writer process: `attempts` reserves of one recipient, each outcome reported."""
    store = Store(path)
    outcomes = []
    start.wait()
    for _ in range(attempts):
        try:
            store.reserve(
                SENDER,
                account_id=account_id,
                recipients=1,
                unit=1,
                default_balance=0,
                domain=DOMAIN,
            )
            outcomes.append("charged")
        except Refused:
            outcomes.append("refused")
        except StoreError as exc:
            outcomes.append(f"error: {exc}")
    store.close()
    results.put(outcomes)


def test_reserve_from_many_processes_charges_exactly_the_balance(tmp_path: Path):
    """Racing writer processes on one database: each reserve charges or is Refused, no error.

    A deferred BEGIN reads first and upgrades to a write later; in WAL mode the
    upgrade fails at once (SQLITE_BUSY, no busy wait) when another connection
    wrote meanwhile. BEGIN IMMEDIATE takes the write lock before the first read.
    Threads in one process rarely race here; processes on two cores do.
    """
    database = tmp_path / "race.db"
    admin = Store(database)
    admin.migrate()
    account_id = admin.create_account("acme")["id"]
    admin.add_domain("acme", DOMAIN)
    admin.set_sender(SENDER, balance=100)
    writers, attempts = 4, 50
    spawn = multiprocessing.get_context("spawn")  # no fork of a threaded test process
    start, results = spawn.Barrier(writers), spawn.Queue()
    processes = [
        spawn.Process(target=_spend, args=(database, account_id, start, results, attempts))
        for _ in range(writers)
    ]
    for process in processes:
        process.start()
    outcomes = [o for _ in processes for o in results.get(timeout=60)]
    for process in processes:
        process.join(10)
    assert [o for o in outcomes if o.startswith("error")] == []
    assert outcomes.count("charged") == 100
    assert outcomes.count("refused") == writers * attempts - 100
    assert admin.show_sender(SENDER)["balance"] == 0
    assert admin.pending_count() == 100
    admin.close()


# --- a stale reservation is refunded by a sweep every minute ------------------------------


def reserve_at(path: Path, account_id: int, when: datetime) -> None:
    """A reservation as a process that died at `when` would have left it."""
    store = Store(path, clock=lambda: when)
    try:
        store.reserve(
            SENDER, account_id=account_id, recipients=1, unit=1, default_balance=0, domain=DOMAIN
        )
    finally:
        store.close()


def test_the_sweep_runs_every_minute_and_refunds_after_twice_the_budget_plus_a_minute(
    relay_factory, sink
):
    # The documented cadence; the test runs the same loop faster.
    assert Upkeep().sweep_interval == 60
    relay = relay_factory(
        upkeep=Upkeep(sweep_interval=0.2, checkpoint_interval=0.05),
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_UPSTREAM_TIMEOUT="5",
    )
    settings = relay.relay.settings
    assert settings.forward_budget == 10
    assert settings.stale_after == 2 * 10 + 60
    relay.token()
    account_id = relay.store.list_accounts()[0]["id"]
    relay.store.set_sender(SENDER, balance=10)
    now = datetime.now(UTC)
    # Created after the start's sweep, so only the periodic one can refund them.
    reserve_at(settings.database, account_id, now - timedelta(seconds=settings.stale_after + 5))
    reserve_at(settings.database, account_id, now - timedelta(seconds=settings.stale_after - 40))
    assert relay.store.pending_count() == 2
    assert wait_until(lambda: relay.store.pending_count() == 1)
    # The old one refunded; the one younger than the threshold still pending.
    assert relay.store.show_sender(SENDER)["balance"] == 9


# --- upstream certificates verified unless tls.rejectUnauthorized is false ----------------


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_an_untrusted_upstream_certificate_is_refused_unless_reject_unauthorized_is_false(
    relay_factory, sink_factory, mode
):
    untrusted = sink_factory(mode)
    checked = relay_factory(SMTP_CONFIG=untrusted.smtp_config(tls={}), DEFAULT_SEND_BALANCE="5")
    raw = checked.raw()
    raw.login(checked.token())
    begin_data(raw)
    raw.send(message() + b".")
    assert raw.read() == ("451 4.3.0 smtp: TLS with upstream failed (CERTIFICATE_VERIFY_FAILED)")
    assert untrusted.messages == []
    assert checked.store.show_sender(SENDER)["balance"] == 5

    lenient = relay_factory(
        SMTP_CONFIG=untrusted.smtp_config(tls={"rejectUnauthorized": False}),
        DEFAULT_SEND_BALANCE="5",
    )
    raw = lenient.raw()
    raw.login(lenient.token())
    begin_data(raw)
    raw.send(message() + b".")
    assert raw.read().startswith(DELIVERED)
    assert len(untrusted.messages) == 1


# --- RESEND_TOKEN_<DOMAIN> keeps hyphens ---------------------------------------------------


def test_resend_domain_tokens_keep_hyphens():
    assert resend_domain_key("my-shop.example.com") == "MY-SHOP_EXAMPLE_COM"
    settings = load_settings(
        {
            "RESEND_TOKEN": "re_global",
            "RESEND_TOKEN_MY-SHOP_EXAMPLE_COM": "re_hyphen",
            "RESEND_TOKEN_MY_SHOP_EXAMPLE_COM": "re_underscore",
        }
    )
    assert settings.resend.token_for("my-shop.example.com") == "re_hyphen"
    assert settings.resend.token_for("my_shop.example.com") == "re_underscore"
    assert settings.resend.token_for("other.example.com") == "re_global"


# --- 300 s for the whole DATA upload; 30 s for AUTH ---------------------------------------


def test_documented_timeouts_are_30_s_for_auth_and_300_s_for_the_data():
    assert Limits().auth_timeout == 30
    assert Limits().data_timeout == 300


def test_a_slow_drip_of_data_times_out_with_421_and_sends_nothing(relay_factory, sink):
    relay = relay_factory(
        Limits(data_timeout=1.0), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="5"
    )
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    # A byte every 0.2 s: each arrives well inside the timeout, the whole never.
    drip = iter(message() * 100)
    deadline = time.monotonic() + 10
    while not select.select([raw.sock], [], [], 0.2)[0]:
        assert time.monotonic() < deadline, "the drip held the session open"
        try:
            raw.sock.sendall(bytes([next(drip)]))
        except OSError:
            break  # closed between the check and the send
    assert raw.read() == "421 4.4.2 Timeout, closing connection"
    assert raw.closed()
    assert sink.messages == []
    assert relay.store.list_senders() == []  # nothing charged: no sender row was made
    assert relay.store.pending_count() == 0


def test_the_auth_exchange_has_its_own_timeout_not_the_command_one(relay_factory, sink):
    relay = relay_factory(
        Limits(command_timeout=0.3, auth_timeout=30), SMTP_CONFIG=sink.smtp_config()
    )
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH LOGIN") == "334 " + b64("Username:")
    # A slow client: more than the command timeout between the two steps.
    assert not select.select([raw.sock], [], [], 0.8)[0]
    assert raw.cmd(b64("api_token")) == "334 " + b64("Password:")
    assert raw.cmd(b64(relay.token())) == "235 2.7.0 Authentication successful"


# --- a token that expires mid-session gets 530 at MAIL --------------------------------------


def test_a_token_expiring_mid_session_gets_530_at_mail(relay):
    token = relay.token(expires_in_days=1)
    token_id = relay.store.list_tokens("acme")[-1]["id"]
    raw = relay.raw()
    assert raw.login(token) == "235 2.7.0 Authentication successful"
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RSET") == "250 2.0.0 Ok"
    # Expired now, not revoked.
    relay.store.db.execute(
        "UPDATE tokens SET expires = ? WHERE id = ?", (int(time.time()) - 1, token_id)
    )
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == (
        "530 5.7.0 Authentication required: the token was revoked or expired"
    )
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"


# --- AUTH before EHLO is 503 5.5.1 -------------------------------------------------------


def test_auth_before_ehlo_is_503(relay):
    token = relay.token()
    raw = relay.raw()
    assert raw.cmd("AUTH PLAIN " + plain(token)) == "503 5.5.1 Send EHLO first"
    assert (
        raw.cmd(f"MAIL FROM:<{SENDER}>")
        == "503 5.5.1 Bad sequence of commands: send EHLO or HELO first"
    )
    assert raw.login(token) == "235 2.7.0 Authentication successful"


# --- sessions still open after RELAY_DRAIN_TIMEOUT are aborted -----------------------------


def test_a_session_still_open_after_the_drain_is_aborted(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="5", RELAY_DRAIN_TIMEOUT="0.5"
    )
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"  # in a transaction: not idle
    relay.call(relay.relay.stop())
    assert relay.relay.sessions == set()
    raw.sock.settimeout(5)  # without the abort, the read below would wait for it
    assert raw.read() == "421 4.3.2 Service shutting down, try again later"
    assert raw.closed()
