"""The delivery log, the Prometheus metrics and the health endpoints,
against the real relay (and, for the workers, `relay serve` as a subprocess)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import DOMAIN, SENDER, Lines, free_port, message, plain

from relay import cli, logs
from relay.replies import Reply
from relay.store.deliveries import (
    DeliveryRecord,
    Outcome,
    Query,
    RecipientOutcome,
    outcome_of,
    parse_when,
    recipient_outcomes,
)
from relay.store.facade import Store
from tests.fake_upstreams import FakeCloudflare, FakeResend

ROOT = Path(__file__).resolve().parent.parent
OK, BAD = "ok@dest.test", "bad@dest.test"


def send(
    relay: Any, message_id: str, rcpts: tuple[str, ...] = (OK,), body: bytes | None = None
) -> str:
    """One transaction in a fresh session; the reply to the end of DATA."""
    raw = relay.raw()
    assert raw.login(relay.token(domain=DOMAIN)).startswith("235 ")
    assert raw.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    for rcpt in rcpts:
        assert raw.cmd(f"RCPT TO:<{rcpt}>").startswith("250 ")
    assert raw.cmd("DATA").startswith("354 ")
    content = body or message(to=", ".join(rcpts), extra=f"Message-ID: {message_id}\r\n")
    raw.send(content + b".")
    reply = raw.read()
    raw.cmd("QUIT")
    return reply


def log_json(relay: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any, *args: str) -> list[Any]:
    """`relay log ARGS --json`, as an operator runs it, parsed."""
    monkeypatch.setenv("RELAY_DATABASE", str(relay.relay.settings.database))
    assert cli.main(["log", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# --- the delivery log, one record per outcome ----------------------------------------


def test_each_outcome_leaves_its_record(relay, sink, monkeypatch, capsys):
    sink.recorder.rcpt_replies[BAD] = "550 5.1.1 No such user"
    assert send(relay, "<d@example.com>").startswith("250 ")
    assert send(relay, "<p@example.com>", (OK, BAD)).startswith("250 ")
    sink.recorder.data_reply = "554 5.7.1 Spam"
    assert send(relay, "<r@example.com>").startswith("554 ")
    sink.recorder.data_reply = "451 4.3.0 Try again"
    assert send(relay, "<f@example.com>").startswith("451 ")

    [delivered] = log_json(relay, monkeypatch, capsys, "--message-id", "<d@example.com>")
    assert delivered["outcome"] == "delivered"
    assert delivered["upstream_id"] == "up1"  # the sink's "queued as up1"
    assert (delivered["channel"], delivered["rule"], delivered["charged"]) == ("smtp", 3, 1)
    assert delivered["reply"] == {"code": 250, "enhanced": "2.0.0", "text": "Ok <d@example.com>"}
    assert delivered["recipients"] == [
        {"address": OK, "outcome": "delivered", "code": 250, "enhanced": "2.0.0"}
    ]
    assert (delivered["account"], delivered["sender"], delivered["client"]) == (
        "acme",
        SENDER,
        "127.0.0.1",
    )
    token_ids = {t["id"] for t in relay.store.list_tokens()}
    assert delivered["token_id"] in token_ids
    assert delivered["size"] > 0 and delivered["duration"] >= 0

    [partial] = log_json(relay, monkeypatch, capsys, "--message-id", "<p@example.com>")
    assert (partial["outcome"], partial["charged"], partial["upstream_id"]) == ("partial", 1, "up2")
    assert {(r["address"], r["outcome"], r["code"]) for r in partial["recipients"]} == {
        (OK, "delivered", 250),
        (BAD, "refused", 550),
    }

    [refused] = log_json(relay, monkeypatch, capsys, "--message-id", "<r@example.com>")
    assert (refused["outcome"], refused["charged"], refused["reply"]["code"]) == (
        "refused",
        0,
        554,
    )
    assert refused["recipients"][0]["outcome"] == "refused"

    [deferred] = log_json(relay, monkeypatch, capsys, "--message-id", "<f@example.com>")
    assert (deferred["outcome"], deferred["charged"]) == ("deferred", 0)
    assert deferred["recipients"][0]["outcome"] == "deferred"

    by_sender = log_json(relay, monkeypatch, capsys, "--sender", SENDER.upper())
    assert [r["message_id"] for r in by_sender] == [
        "<f@example.com>",
        "<r@example.com>",
        "<p@example.com>",
        "<d@example.com>",
    ]  # newest first
    [by_rcpt] = log_json(relay, monkeypatch, capsys, "--recipient", BAD)
    assert by_rcpt["message_id"] == "<p@example.com>"
    assert len(log_json(relay, monkeypatch, capsys, "--recipient", OK, "--limit", "2")) == 2
    [only] = log_json(relay, monkeypatch, capsys, "--outcome", "deferred", "--since", "1h")
    assert only["message_id"] == "<f@example.com>"
    assert log_json(relay, monkeypatch, capsys, "--account", "other") == []
    by_channel = log_json(relay, monkeypatch, capsys, "--channel", "smtp")
    assert [r["message_id"] for r in by_channel] == [r["message_id"] for r in by_sender]
    assert log_json(relay, monkeypatch, capsys, "--channel", "resend") == []
    assert log_json(relay, monkeypatch, capsys, "--until", "1h") == []

    # The readable forms.
    assert cli.main(["log", "--sender", SENDER]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["TIME", "MESSAGE-ID", "SENDER"]
    assert len(table) == 5 and "<p@example.com>" in table[3] and "partial" in table[3]
    assert cli.main(["log", "show", "<p@example.com>"]) == 0
    shown = capsys.readouterr().out
    assert f"{BAD}  refused 550 5.1.1" in shown and "upstream id up2" in shown


def test_a_message_id_is_found_with_or_without_its_brackets(relay, sink, monkeypatch, capsys):
    assert send(relay, "<both@example.com>").startswith("250 ")
    # A record of a header written without brackets holds the bare form.
    bare = dataclasses.replace(record_at(datetime.now(UTC)), message_id="bare@example.com")
    relay.store.record_delivery(bare)
    for stored in ("<both@example.com>", "bare@example.com"):
        plain_id = stored.strip("<>")
        for written in (f"<{plain_id}>", plain_id, f" {plain_id} "):
            [found] = log_json(relay, monkeypatch, capsys, "--message-id", written)
            assert found["message_id"] == stored, written
            [shown] = log_json(relay, monkeypatch, capsys, "show", written)
            assert shown["message_id"] == stored, written
    assert cli.main(["log", "show", "both@example.com"]) == 0
    assert "message-id  <both@example.com>" in capsys.readouterr().out
    assert log_json(relay, monkeypatch, capsys, "--message-id", "<both@example.co>") == []
    assert cli.main(["log", "show", "<>"]) == 1  # an empty id matches nothing
    assert cli.main(["log", "show", " "]) == 1  # and no id is no filter: refused
    assert capsys.readouterr().err.splitlines()[-1] == "relay: a Message-ID is required"


def test_a_message_refused_before_the_charge_is_recorded(relay, sink, monkeypatch, capsys):
    foreign = message(sender="someone@elsewhere.test", extra="Message-ID: <x@example.com>\r\n")
    assert send(relay, "<x@example.com>", body=foreign).startswith("550 5.7.1")
    no_from = b"To: ok@dest.test\r\nMessage-ID: <y@example.com>\r\n\r\nHi\r\n"
    assert send(relay, "<y@example.com>", body=no_from).startswith("554 5.6.0")

    [header] = log_json(relay, monkeypatch, capsys, "--message-id", "<x@example.com>")
    assert (header["outcome"], header["channel"], header["charged"]) == ("refused", "", 0)
    assert header["reply"]["code"] == 550
    [defect] = log_json(relay, monkeypatch, capsys, "--message-id", "<y@example.com>")
    assert (defect["outcome"], defect["reply"]["enhanced"]) == ("refused", "5.6.0")
    assert sink.messages == []


@pytest.fixture
def resend() -> Iterator[FakeResend]:
    with FakeResend() as fake:
        yield fake


@pytest.fixture
def cloudflare() -> Iterator[FakeCloudflare]:
    with FakeCloudflare() as fake:
        yield fake


def test_resend_id_and_a_replay_are_recorded(relay_factory, resend, monkeypatch, capsys):
    relay = relay_factory(
        RESEND_TOKEN="re_global", RESEND_API_URL=resend.url, DEFAULT_SEND_BALANCE="10"
    )
    assert send(relay, "<m@example.com>").startswith("250 ")
    # The client lost the reply and sends the same message again: Resend has it.
    assert send(relay, "<m@example.com>").startswith("250 ")

    replay, first = log_json(relay, monkeypatch, capsys, "--message-id", "<m@example.com>")
    [sent] = resend.sent
    assert (first["channel"], first["upstream_id"], first["replay"]) == ("resend", sent.id, False)
    assert (first["charged"], replay["charged"], replay["replay"]) == (1, 0, True)
    assert replay["outcome"] == "delivered"
    assert cli.main(["log", "show", "<m@example.com>", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_cloudflare_message_id_is_the_upstream_id(relay_factory, cloudflare, monkeypatch, capsys):
    relay = relay_factory(
        CLOUDFLARE_ACCOUNT_ID=cloudflare.account_id,
        CLOUDFLARE_API_TOKEN=cloudflare.token,
        CLOUDFLARE_API_URL=cloudflare.url,
        DEFAULT_SEND_BALANCE="10",
    )
    assert send(relay, "<c@example.com>").startswith("250 ")
    [record] = log_json(relay, monkeypatch, capsys, "--message-id", "<c@example.com>")
    assert (record["channel"], record["upstream_id"]) == ("cloudflare", "<c@example.com>")


# --- retention -----------------------------------------------------------------------


def record_at(when: datetime, n: int = 0) -> DeliveryRecord:
    return DeliveryRecord(
        time=int(when.timestamp()),
        message_id=f"<old{n}@example.com>",
        account="acme",
        token_id="t1",
        sender=SENDER,
        recipients=(RecipientOutcome(f"r{n}@dest.test", Outcome.DELIVERED, 250, "2.0.0"),),
        size=100,
        channel="smtp",
        rule=3,
        outcome=Outcome.DELIVERED,
        reply=Reply(250, "2.0.0", "Ok"),
    )


def test_retention_prunes_in_batches(tmp_path):
    store = Store(tmp_path / "relay.db")
    store.migrate()
    now = datetime.now(UTC)
    for n in range(25):
        store.record_delivery(record_at(now - timedelta(days=40), n))
    store.record_delivery(record_at(now - timedelta(days=1), 99))
    before = int((now - timedelta(days=30)).timestamp())
    assert [store.prune_deliveries(before, 10) for _ in range(4)] == [10, 10, 5, 0]
    [kept] = store.find_deliveries(Query())
    assert kept.message_id == "<old99@example.com>"
    # The recipients went with their records.
    assert store.db.execute("SELECT count(*) FROM delivery_recipients").fetchone()[0] == 1
    store.close()


def test_the_upkeep_prunes_past_the_retention(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_LOG_RETENTION_DAYS="7")
    now = datetime.now(UTC)
    relay.store.record_delivery(record_at(now - timedelta(days=8), 1))
    relay.store.record_delivery(record_at(now - timedelta(days=6), 2))
    relay.call(relay.relay.upkeep())
    assert [r.message_id for r in relay.store.find_deliveries(Query())] == ["<old2@example.com>"]


# --- the pure parts ------------------------------------------------------------------

DELIVERED, REFUSED = Reply(250, "2.0.0", "Ok"), Reply(554, "5.0.0", "No")
DEFERRED = Reply(451, "4.3.0", "Later")


@pytest.mark.parametrize(
    ("reply", "refused", "outcome"),
    [
        (DELIVERED, 0, Outcome.DELIVERED),
        (DELIVERED, 1, Outcome.PARTIAL),
        (REFUSED, 0, Outcome.REFUSED),
        (DEFERRED, 0, Outcome.DEFERRED),
        (Reply(550, "5.7.1", "Sender denied"), 0, Outcome.REFUSED),
    ],
)
def test_outcome_of(reply, refused, outcome):
    assert outcome_of(reply, refused) == outcome


def test_recipient_outcomes_name_the_upstream_code():
    bounce = Reply(550, "5.1.1", "No such user")
    got = recipient_outcomes(("A@x.test", "b@x.test"), ("a@x.test", "b@x.test"), ("A@x.test",),
                             {"b@x.test": bounce}, DELIVERED)  # fmt: skip
    assert got == (
        RecipientOutcome("a@x.test", Outcome.DELIVERED, 250, "2.0.0"),
        RecipientOutcome("b@x.test", Outcome.REFUSED, 550, "5.1.1"),
    )
    [deferred] = recipient_outcomes(("a@x.test",), ("a@x.test",), (), {}, DEFERRED)
    assert (deferred.outcome, deferred.code) == (Outcome.DEFERRED, 451)


NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - timedelta(seconds=90)),
        ("15m", NOW - timedelta(minutes=15)),
        ("1d12h", NOW - timedelta(days=1, hours=12)),
        ("1w", NOW - timedelta(days=7)),
        ("2026-11-21", datetime(2026, 11, 21, tzinfo=UTC)),
        ("2026-11-21T10:30", datetime(2026, 11, 21, 10, 30, tzinfo=UTC)),
        ("2026-11-21T10:30+01:00", datetime(2026, 11, 21, 9, 30, tzinfo=UTC)),
    ],
)
def test_parse_when(text, expected):
    assert parse_when(text, NOW) == int(expected.timestamp())


def test_a_bad_time_is_one_line(monkeypatch, capsys, tmp_path):
    Store(tmp_path / "relay.db").migrate()
    monkeypatch.setenv("RELAY_DATABASE", str(tmp_path / "relay.db"))
    assert cli.main(["log", "--since", "yesterday"]) == 1
    assert "not a duration" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"),
    [("--since", "1000000d"), ("--until", "999999999w"), ("--since", "9" * 5000 + "s")],
)
def test_a_time_past_year_one_is_one_line_not_a_traceback(tmp_path, option, value):
    Store(tmp_path / "relay.db").migrate()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT),
           "RELAY_DATABASE": str(tmp_path / "relay.db")}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "relay", "log", option, value],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (1, "")
    [line] = done.stderr.splitlines()
    assert line.startswith("relay: a duration back past year 1: '")
    assert len(line) < 120


def test_json_log_lines_carry_the_fields():
    record = logging.LogRecord(
        "relay.session", logging.INFO, __file__, 1, "message %s", ("x",), None
    )
    record.fields = {"message_id": "<a@b>", "rcpts": 2, "level": "not mine"}
    line = json.loads(logs.JsonFormatter().format(record))
    assert (line["message"], line["message_id"], line["rcpts"]) == ("message x", "<a@b>", 2)
    assert line["level"] == "INFO" and line["pid"] == os.getpid()


# --- metrics and health --------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`/metrics`, read with prometheus_client's own parser."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(figures: dict[Any, float], name: str, **labels: str) -> float:
    return figures.get((name, frozenset(labels.items())), 0.0)


def wait_until(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_metrics_move_by_the_right_amounts(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", RELAY_ADMIN_LISTEN="127.0.0.1:0"
    )
    port = relay.relay.admin_port
    token = relay.token()
    before = scrape(port)

    assert send(relay, "<1@example.com>").startswith("250 ")  # 235, 250 x3, 221
    wrong = relay.raw()
    wrong.cmd("EHLO client.test")
    for _ in range(3):  # the third failure ends the session
        wrong.cmd("AUTH PLAIN " + plain("rlt_wrong"))
    other = relay.raw()
    assert other.login(token).startswith("235 ")
    assert other.cmd("MAIL FROM:<a@elsewhere.test>").startswith("550 ")
    relay.store.set_sender(SENDER, balance=0)
    assert other.cmd(f"MAIL FROM:<{SENDER}>").startswith("550 5.7.1 Send balance")
    other.cmd("QUIT")
    wait_until(lambda: not relay.relay.sessions)

    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("relay_connections_total", result="accepted") == 3
    assert delta("relay_auth_total", result="success") == 2
    assert delta("relay_auth_total", result="failure") == 3
    assert delta("relay_auth_total", result="throttled") == 1
    assert delta("relay_messages_total", channel="smtp", outcome="delivered") == 1
    assert delta("relay_recipients_total", channel="smtp", outcome="delivered") == 1
    assert delta("relay_message_bytes_count") == 1
    assert delta("relay_forward_seconds_count", channel="smtp") == 1
    assert delta("relay_replies_total", code="250") == 3
    assert delta("relay_replies_total", code="235") == 2
    assert delta("relay_replies_total", code="535") == 3
    assert delta("relay_replies_total", code="550") == 2
    assert delta("relay_replies_total", code="221") == 2
    assert delta("relay_balance_refusals_total") == 1
    assert delta("relay_store_seconds_count", op="reserve") == 1
    assert value(after, "relay_sessions") == 0
    assert delta("relay_upstream_errors_total", channel="smtp", kind="refused") == 0


def test_upstream_errors_by_kind(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", RELAY_ADMIN_LISTEN="127.0.0.1:0"
    )
    before = scrape(relay.relay.admin_port)
    sink.recorder.data_reply = "554 5.7.1 Spam"
    send(relay, "<e1@example.com>")
    sink.recorder.data_reply = "451 4.7.0 Slow down"
    send(relay, "<e2@example.com>")
    after = scrape(relay.relay.admin_port)
    for kind in ("refused", "throttled"):
        labels = {"channel": "smtp", "kind": kind}
        assert (
            value(after, "relay_upstream_errors_total", **labels)
            - value(before, "relay_upstream_errors_total", **labels)
            == 1
        )
    assert value(after, "relay_messages_total", channel="smtp", outcome="deferred") >= 1


class HeldData:
    """The sink holds DATA until the test releases it: a forward in flight."""

    def __init__(self, sink: Any) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        original = sink.recorder.handle_DATA

        async def handle_DATA(server: Any, session: Any, envelope: Any) -> str:
            import asyncio

            self.arrived.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
            return str(await original(server, session, envelope))

        sink.recorder.handle_DATA = handle_DATA


def test_readyz_turns_503_while_draining(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_ADMIN_LISTEN="127.0.0.1:0")
    base = f"http://127.0.0.1:{relay.relay.admin_port}"
    relay.store.add_nolimit(SENDER)
    assert httpx.get(f"{base}/healthz").status_code == 200
    ready = httpx.get(f"{base}/readyz")
    assert (ready.status_code, ready.json()) == (
        200,
        {"ready": True, "queue": {"mode": "off", "queued": 0, "held": 0, "oldest_seconds": 0}},
    )

    held = HeldData(sink)
    sender = threading.Thread(target=send, args=(relay, "<h@example.com>"))
    sender.start()
    assert held.arrived.wait(10)
    import asyncio

    stopping = asyncio.run_coroutine_threadsafe(relay.relay.stop(), relay.loop)
    wait_until(lambda: relay.relay.stopping)
    draining = httpx.get(f"{base}/readyz")
    assert draining.status_code == 503
    assert draining.json()["reason"].startswith("draining")
    assert "\n" not in draining.text.strip()
    assert httpx.get(f"{base}/healthz").status_code == 200
    held.release.set()
    sender.join(10)
    stopping.result(10)


def test_readyz_turns_503_when_the_store_is_gone(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_ADMIN_LISTEN="127.0.0.1:0")
    base = f"http://127.0.0.1:{relay.relay.admin_port}"
    assert httpx.get(f"{base}/readyz").status_code == 200
    database = relay.relay.settings.database
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        path.unlink(missing_ok=True)
    gone = httpx.get(f"{base}/readyz")
    assert gone.status_code == 503
    assert "deleted or replaced" in gone.json()["reason"]


def test_a_taken_admin_port_stops_the_start(relay_factory, sink):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match="RELAY_ADMIN_LISTEN"):
            relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_ADMIN_LISTEN=f"127.0.0.1:{port}")


@pytest.mark.slow
def test_two_workers_metrics_are_added_up(tmp_path, cert_dir, sink, client_tls):
    database = tmp_path / "relay.db"
    store = Store(database)
    store.migrate()
    store.create_account("acme")
    store.add_domain("acme", DOMAIN)
    token = store.create_token("acme")["token"]
    store.add_nolimit(SENDER)
    store.close()
    port, admin_port = free_port(), free_port()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "RELAY_LISTEN": f"127.0.0.1:{port}",
        "RELAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
        "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
        "RELAY_DATABASE": str(database),
        "RELAY_HOSTNAME": "relay.test",
        "RELAY_WORKERS": "2",
        "RELAY_LOG_FORMAT": "json",
        "SMTP_CONFIG": sink.smtp_config(),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    log = Lines(proc.stderr)

    def records(lines: list[str], words: str) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in parsed if words in r["message"]]

    try:
        assert log.wait_for(lambda lines: len(records(lines, "relay listening on")) == 2)
        assert log.wait_for(lambda lines: len(records(lines, "admin listener on")) == 1)
        sent = 0
        # The kernel spreads connections over the workers: send until both served one.
        while len({r["pid"] for r in records(log.lines, "AUTH ok")}) < 2:
            assert sent < 60, "one worker took every connection"
            with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=10) as client:
                client.login("api_token", token)
                client.sendmail(SENDER, [f"r{sent}@dest.test"], message())
            sent += 1
            assert log.wait_for(lambda lines, n=sent: len(records(lines, "AUTH ok")) == n)
        assert log.wait_for(lambda lines: len(records(lines, "message <")) == sent)
        [delivered] = {r["outcome"] for r in records(log.lines, "message <")}
        assert delivered == "delivered"

        def figures() -> dict[Any, float]:
            return scrape(admin_port)

        wait_until(lambda: value(figures(), "relay_sessions") == 0)
        after = figures()
        assert value(after, "relay_connections_total", result="accepted") == sent
        assert value(after, "relay_auth_total", result="success") == sent
        assert value(after, "relay_messages_total", channel="smtp", outcome="delivered") == sent
        assert value(after, "relay_recipients_total", channel="smtp", outcome="delivered") == sent
        assert value(after, "relay_message_bytes_count") == sent
        ready = httpx.get(f"http://127.0.0.1:{admin_port}/readyz")
        assert ready.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    stderr = log.text()
    proc.stderr.close()
    assert proc.returncode == 0, stderr
    assert len(Store(database).find_deliveries(Query(limit=1000))) == sent


def test_retention_zero_turns_the_log_off(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="5", RELAY_LOG_RETENTION_DAYS="0"
    )
    assert send(relay, "<off@example.com>").startswith("250 ")
    two_froms = message(extra="From: again@example.com\r\nMessage-ID: <bad@example.com>\r\n")
    assert send(relay, "<bad@example.com>", body=two_froms).startswith("554 ")
    assert sink.messages and relay.store.find_deliveries(Query()) == []
    assert relay.store.show_sender(SENDER)["balance"] == 4  # the charge still settles
