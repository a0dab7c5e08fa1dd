"""Suppressions and webhooks against the real relay: RCPT refusals, the list fed by
upstream refusals, signed events sent from the outbox."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
import standardwebhooks.webhooks
from support import SENDER, free_port, message, onboarded, serve, serve_env

from relay.errors import Invalid
from relay.events import manage

RCPT = "rcpt@dest.test"
GONE = "gone@dest.test"
TODAY = time.strftime("%Y-%m-%d", time.gmtime())


def balance(relay: Any, address: str = SENDER) -> int:
    rows = [r for r in relay.store.list_senders() if r["address"] == address]
    return int(rows[0]["balance"]) if rows else relay.relay.settings.default_send_balance


def transaction(relay: Any, recipients: tuple[str, ...], token: str | None = None) -> list[str]:
    """MAIL, each RCPT and (when one was taken) DATA; every reply in order."""
    raw = relay.raw()
    assert raw.login(token or relay.token()).startswith("235 ")
    answers = [raw.cmd(f"MAIL FROM:<{SENDER}>")]
    answers += [raw.cmd(f"RCPT TO:<{r}>") for r in recipients]
    if any(a.startswith("250 2.1.5") for a in answers[1:]):
        assert raw.cmd("DATA").startswith("354 ")
        raw.sock.sendall(message(to=", ".join(recipients)) + b".\r\n")
        answers.append(raw.read())
    raw.cmd("QUIT")
    return answers


def test_rcpt_to_a_suppressed_address_is_refused_and_costs_nothing(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    token = relay.token()
    relay.store.add_suppression("acme", GONE, reason="complaint")
    relay.store.add_suppression("acme", "*@spam.test")
    _, rcpt, gone, domain, data = transaction(relay, (RCPT, GONE, "x@spam.test"), token)
    assert rcpt == "250 2.1.5 Ok"
    assert gone == (
        f"550 5.1.1 <{GONE}>: suppressed (complaint since {TODAY}); ask the relay admin"
    )
    assert domain.startswith("550 5.1.1 <x@spam.test>: suppressed (manual since ")
    assert data.startswith("250 2.0.0 Ok <")
    [received] = sink.messages
    assert received.rcpt_tos == [RCPT]
    assert balance(relay) == 9


def test_an_upstream_mailbox_refusal_suppresses_the_address(relay_factory, sink):
    sink.recorder.rcpt_replies[GONE] = "550 5.1.1 No such user"
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    token = relay.token()
    *_, first = transaction(relay, (GONE,), token)
    assert first == "550 5.1.1 smtp: No such user"
    assert balance(relay) == 10
    [entry] = relay.store.list_suppressions("acme")
    assert (entry["address"], entry["reason"], entry["expires"]) == (GONE, "hard-bounce", None)
    # The next RCPT to it is refused by the relay, and the upstream is not asked.
    connections = sink.recorder.connections
    _, again = transaction(relay, (GONE,), token)
    assert (
        again == f"550 5.1.1 <{GONE}>: suppressed (hard-bounce since {TODAY}); ask the relay admin"
    )
    assert sink.recorder.connections == connections and sink.messages == []
    assert balance(relay) == 10
    relay.store.remove_suppression("acme", GONE)
    assert transaction(relay, (GONE,), token)[1] == "250 2.1.5 Ok"


# --- webhooks ------------------------------------------------------------------------


class Receiver:
    """An application's webhook endpoint on loopback: records each request, answers
    the scripted statuses in order, then 200."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.hold: threading.Event | None = None  # set: each request waits for it
        self.waiting = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if receiver.hold is not None:
                    receiver.waiting = True
                    receiver.hold.wait(30)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if 300 <= status < 400:  # where a redirect-following sender would go
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/relay"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    """Poll `condition` until it holds; a bound, not a synchronisation."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


WEBHOOK_ENV = {"RELAY_WEBHOOK_ALLOW_PRIVATE": "true", "RELAY_WEBHOOK_BACKOFF": "0.01"}


def test_a_delivered_message_is_told_signed_and_retried_until_taken(relay_factory, sink, receiver):
    receiver.statuses = [500, 500]
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", **WEBHOOK_ENV)
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, None)
    *_, reply = transaction(relay, (RCPT,), token)
    assert reply.startswith("250 2.0.0 Ok <")
    wait_for(lambda: len(receiver.requests) == 3)
    # The 200 stops the retries: no fourth request comes.
    wait_for(
        lambda: relay.store.list_webhook_attempts("acme", hook["id"])[0]["state"] == "delivered"
    )
    assert len(receiver.requests) == 3
    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert len(ids) == 1  # the same event each time: the receiver drops duplicates
    verifier = standardwebhooks.Webhook(hook["secret"])
    for headers, body in receiver.requests:
        event = verifier.verify(body, headers)
        assert event["type"] == "message.delivered"
        data = event["data"]
        assert (data["sender"], data["account"], data["channel"]) == (SENDER, "acme", "smtp")
        assert data["recipients"] == [
            {"address": RCPT, "outcome": "delivered", "reply": "250 2.0.0"}
        ]
        assert data["message_id"] and data["upstream_id"] and data["attempts"] == 1
    # A forged or altered body does not verify.
    headers, body = receiver.requests[0]
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verifier.verify(body.replace(b"acme", b"evil"), headers)
    statuses = [a["status"] for a in relay.store.list_webhook_attempts("acme", hook["id"])]
    assert statuses == [200, 500, 500]
    assert "whsec_" not in json.dumps(relay.store.list_webhooks("acme"))


def test_an_event_survives_a_restart(relay_factory, sink, receiver, database_url):
    receiver.statuses = [500]
    env = {"SMTP_CONFIG": sink.smtp_config(), "DEFAULT_SEND_BALANCE": "10", **WEBHOOK_ENV}
    first = relay_factory(**{**env, "RELAY_WEBHOOK_BACKOFF": "30"})
    token = first.token()
    hook = first.store.add_webhook("acme", receiver.url, "message.delivered")
    assert transaction(first, (RCPT,), token)[-1].startswith("250 ")
    wait_for(lambda: len(receiver.requests) == 1)  # the 500; the retry is 30 s away
    first.call(first.relay.stop())
    # The 30 s pass while no relay runs (the row's time moved, not the test's clock).
    with first.store._write() as db:
        db.execute("UPDATE webhook_outbox SET next_attempt = 0")
    relay_factory(RELAY_DATABASE=database_url, **env)  # a relay on the same database
    wait_for(lambda: len(receiver.requests) == 2)
    assert receiver.requests[1][0]["webhook-id"] == receiver.requests[0][0]["webhook-id"]
    verifier = standardwebhooks.Webhook(hook["secret"])
    assert verifier.verify(receiver.requests[1][1], receiver.requests[1][0])["type"] == (
        "message.delivered"
    )


def test_a_suppressed_rcpt_is_told(relay_factory, sink, receiver):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", **WEBHOOK_ENV)
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, "recipient.suppressed")
    relay.store.add_suppression("acme", GONE)
    for _ in range(3):  # told once, however often the client repeats it
        assert transaction(relay, (GONE,), token)[1].startswith("550 5.1.1 <")
    wait_for(lambda: len(receiver.requests) == 1)
    event = standardwebhooks.Webhook(hook["secret"]).verify(
        receiver.requests[0][1], receiver.requests[0][0]
    )
    assert event["type"] == "recipient.suppressed"
    assert event["data"] == {
        "account": "acme",
        "address": GONE,
        "reason": "manual",
        "source": "rcpt",
    }


# --- where a webhook may go (SSRF) ----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://example.com/x", "plain http:// only to a loopback host"),
        ("ftp://example.com/x", "expected https://host/path"),
        ("https://user:pw@example.com/x", "credentials in the URL"),
        ("https://127.0.0.1/x", "loopback"),
        ("https://localhost/x", "loopback"),
        ("https://10.1.2.3/x", "private or reserved"),
        ("https://192.168.0.1/x", "private or reserved"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[::1]/x", "loopback"),
        ("https://[::ffff:127.0.0.1]/x", "loopback"),
        ("https://[fd00:ec2::254]/x", "metadata"),
        ("https://100.100.100.200/x", "metadata"),
        ("https://0.0.0.0/x", "private or reserved"),
    ],
)
def test_an_endpoint_that_reaches_inside_is_refused(url: str, why: str) -> None:
    with pytest.raises(Invalid, match=why) as caught:
        manage.check_url(url, allow_private=False)
    assert "pw" not in str(caught.value)


def test_private_allowed_only_when_set() -> None:
    assert manage.check_url("http://127.0.0.1:9/x", allow_private=True) == "http://127.0.0.1:9/x"


def test_each_send_checks_the_address_again(relay_factory, sink, receiver):
    # Created while private addresses were allowed (or before the name moved):
    # the relay that sends does not allow them, so nothing reaches the receiver.
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, None)
    assert transaction(relay, (RCPT,), token)[-1].startswith("250 ")
    wait_for(lambda: bool(relay.store.list_webhook_attempts("acme", hook["id"])))
    [attempt] = relay.store.list_webhook_attempts("acme", hook["id"])
    assert attempt["status"] is None and "resolves to loopback address" in attempt["answer"]
    assert receiver.requests == []


def test_no_redirect_is_followed(relay_factory, sink, receiver):
    receiver.statuses = [307]
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", **WEBHOOK_ENV)
    relay.token()  # the account
    hook = relay.store.add_webhook("acme", receiver.url, None)
    relay.store.test_webhook("acme", hook["id"])
    wait_for(lambda: len(receiver.requests) >= 2)
    attempts = relay.store.list_webhook_attempts("acme", hook["id"])
    assert [a["status"] for a in attempts][-1] == 307  # a failure, retried; never followed
    assert all(r[0]["host"].startswith("127.0.0.1:") for r in receiver.requests)


# --- the admin API -------------------------------------------------------------------


def test_the_admin_api(relay_factory, sink, receiver, caplog):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), RELAY_ADMIN_LISTEN="127.0.0.1:0", **WEBHOOK_ENV
    )
    relay.token()
    token = relay.store.create_admin_token(name="tests")["token"]
    base = f"http://127.0.0.1:{relay.relay.admin_port}/api/v1/accounts/acme"
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
        made = http.post(f"{base}/suppressions", json={"address": "*@Spam.test", "expires_in": 60})
        assert made.status_code == 201, made.text
        assert made.json()["address"] == "*@spam.test"
        assert [r["address"] for r in http.get(f"{base}/suppressions").json()] == ["*@spam.test"]
        assert http.delete(f"{base}/suppressions/*@spam.test").status_code == 200
        assert http.delete(f"{base}/suppressions/*@spam.test").status_code == 404
        assert http.get(f"{base.replace('acme', 'nobody')}/suppressions").status_code == 404

        hook = http.post(
            f"{base}/webhooks", json={"url": receiver.url, "events": ["message.delivered"]}
        )
        assert hook.status_code == 201, hook.text
        secret = hook.json()["secret"]
        assert secret.startswith("whsec_")
        listed = http.get(f"{base}/webhooks")
        assert secret not in listed.text and listed.json()[0]["events"] == ["message.delivered"]
        hook_id = hook.json()["id"]
        assert http.post(f"{base}/webhooks/{hook_id}/test").status_code == 202
        wait_for(lambda: len(receiver.requests) == 1)
        event = standardwebhooks.Webhook(secret).verify(
            receiver.requests[0][1], receiver.requests[0][0]
        )
        assert event["type"] == "webhook.test"
        wait_for(lambda: bool(http.get(f"{base}/webhooks/{hook_id}/attempts").json()))
        [attempt] = http.get(f"{base}/webhooks/{hook_id}/attempts").json()
        assert (attempt["status"], attempt["answer"]) == (200, "ok")
        bad = http.post(f"{base}/webhooks", json={"url": "http://example.com/x"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_url"
        assert http.delete(f"{base}/webhooks/{hook_id}").status_code == 200
    assert secret not in caplog.text
    assert secret not in json.dumps(relay.store.list_audit())


def test_private_endpoints_refused_by_the_api(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_ADMIN_LISTEN="127.0.0.1:0")
    relay.token()
    token = relay.store.create_admin_token(name="tests")["token"]
    url = f"http://127.0.0.1:{relay.relay.admin_port}/api/v1/accounts/acme/webhooks"
    for target in ("https://169.254.169.254/x", "http://127.0.0.1:8080/x", "https://10.0.0.1/"):
        answer = httpx.post(url, json={"url": target}, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 422
        assert answer.json()["error"]["code"] == "private_address"
    assert relay.store.list_webhooks("acme") == []


# --- the commands ----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def relay_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_commands(tmp_path: Path) -> None:
    env = {"RELAY_DATABASE": str(tmp_path / "relay.db")}
    for args in (("db", "init"), ("account", "create", "acme")):
        assert relay_cli(*args, env=env).returncode == 0
    added = relay_cli("suppression", "add", "acme", "Bob@X.test", "--expires-in", "60", env=env)
    assert added.returncode == 0 and "suppressed bob@x.test (manual, until " in added.stdout
    listed = json.loads(relay_cli("suppression", "list", "acme", "--json", env=env).stdout)
    assert [(r["address"], r["reason"]) for r in listed] == [("bob@x.test", "manual")]
    assert relay_cli("suppression", "remove", "acme", "bob@x.test", env=env).returncode == 0
    gone = relay_cli("suppression", "remove", "acme", "bob@x.test", env=env)
    assert gone.returncode == 1 and "not suppressed" in gone.stderr

    refused = relay_cli("webhook", "add", "acme", "--url", "https://127.0.0.1/x", env=env)
    assert refused.returncode == 1 and "loopback" in refused.stderr
    made = relay_cli(
        "webhook", "add", "acme", "--url", "http://127.0.0.1:9/x", "--json",
        env={**env, "RELAY_WEBHOOK_ALLOW_PRIVATE": "true"},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    hook = json.loads(made.stdout)
    assert hook["secret"].startswith("whsec_")
    listed_text = relay_cli("webhook", "list", "acme", env=env).stdout
    assert hook["id"] in listed_text and hook["secret"] not in listed_text
    tested = relay_cli("webhook", "test", "acme", hook["id"], env=env)
    assert tested.returncode == 0 and "queued test event evt_" in tested.stdout
    audit = relay_cli("audit", "--json", env=env).stdout
    assert "webhook.add" in audit and hook["secret"] not in audit
    assert relay_cli("webhook", "remove", "acme", hook["id"], env=env).returncode == 0


def test_a_whole_message_refusal_suppresses_no_one(relay_factory):
    # Resend's 422 "Invalid `to` field" names no recipient: none of them is
    # recorded as a bounce (one invalid address must not suppress the others).
    from tests.fake_upstreams import FakeResend

    with FakeResend() as resend:
        relay = relay_factory(
            RESEND_TOKEN="re_x", RESEND_API_URL=resend.url, DEFAULT_SEND_BALANCE="10"
        )
        token = relay.token()
        resend.fail(422, "invalid_parameter", "Invalid `to` field.")
        reply = transaction(relay, (RCPT, GONE), token)[-1]
        assert reply.startswith("550 5.1.3 resend: ")
        assert relay.store.list_suppressions("acme") == []


# --- Resend's events in (POST /hooks/resend) -------------------------------------------

RESEND_SECRET = "whsec_" + base64.b64encode(b"resend-test-signing-key-32-bytes").decode()


def resend_event(kind: str, to: str, bounce: str = "Permanent") -> bytes:
    data: dict[str, Any] = {
        "email_id": "4ef9a417-02e9-4d39-ad75-9611e0fcc33c",
        "from": "Alice <alice@example.com>",
        "to": [to],
        "subject": "hello",
        "created_at": "2026-03-01T12:00:00.000Z",
    }
    if kind == "email.bounced":
        data["bounce"] = {"message": "mailbox does not exist", "type": bounce}
    return json.dumps({"type": kind, "created_at": "2026-03-01T12:00:00Z", "data": data}).encode()


def svix(body: bytes, *, msg_id: str = "msg_1", when: int | None = None, key: str = RESEND_SECRET):
    stamp = int(time.time()) if when is None else when
    signature = standardwebhooks.Webhook(key).sign(
        msg_id, datetime.fromtimestamp(stamp, UTC), body.decode()
    )
    return {"svix-id": msg_id, "svix-timestamp": str(stamp), "svix-signature": signature}


def test_resend_events_in(relay_factory, sink, receiver):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
        RESEND_WEBHOOK_SECRET=RESEND_SECRET,
        **WEBHOOK_ENV,
    )
    relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, ["message.bounced"])
    url = f"http://127.0.0.1:{relay.relay.admin_port}/hooks/resend"
    bounced = resend_event("email.bounced", GONE)

    forged = svix(bounced, key="whsec_" + base64.b64encode(b"x" * 32).decode())
    stale = svix(bounced, when=int(time.time()) - 3600)
    altered = svix(bounced)
    for headers, body in (
        (forged, bounced),
        (stale, bounced),
        (altered, bounced + b" "),
        ({}, bounced),
    ):
        answer = httpx.post(url, content=body, headers=headers)
        assert answer.status_code == 401, answer.text
    assert relay.store.list_suppressions("acme") == []  # a forged event changes nothing

    genuine = svix(bounced, msg_id="msg_2")
    assert httpx.post(url, content=bounced, headers=genuine).status_code == 204
    assert httpx.post(url, content=bounced, headers=genuine).status_code == 204  # replayed
    [entry] = relay.store.list_suppressions("acme")
    assert (entry["address"], entry["reason"]) == (GONE, "hard-bounce")
    rows = relay.store._read(
        "SELECT COUNT(*) AS n FROM webhook_outbox WHERE type = ?", ("message.bounced",)
    )
    assert rows[0]["n"] == 1  # the replay made no second event
    wait_for(lambda: len(receiver.requests) == 1)
    [(headers, body)] = receiver.requests
    event = standardwebhooks.Webhook(hook["secret"]).verify(body, headers)
    assert event["type"] == "message.bounced"
    assert event["data"]["recipients"] == [GONE] and event["data"]["provider"] == "resend"

    transient = resend_event("email.bounced", "later@dest.test", bounce="Transient")
    assert (
        httpx.post(url, content=transient, headers=svix(transient, msg_id="m3")).status_code == 204
    )
    complaint = resend_event("email.complained", "angry@dest.test")
    assert (
        httpx.post(url, content=complaint, headers=svix(complaint, msg_id="m4")).status_code == 204
    )
    assert {(r["address"], r["reason"]) for r in relay.store.list_suppressions("acme")} == {
        (GONE, "hard-bounce"),
        ("angry@dest.test", "complaint"),
    }


@pytest.mark.sqlite_only
def test_kill_9_while_an_event_is_in_flight_loses_nothing(
    tmp_path, cert_dir, sink, client_tls, relay_factory
):
    """The relay dies (SIGKILL) after its 250, while it sends the event (the receiver
    holds the request): the event is still in the outbox, claimed for a lease; the
    next relay on the database sends it when the lease ends."""
    database = tmp_path / "relay.db"
    store, token = onboarded(database)
    hanging = threading.Event()
    held = Receiver()
    held.hold = hanging
    hook = store.add_webhook("acme", held.url, None)
    port = free_port()
    env = serve_env(
        database,
        cert_dir,
        port,
        **{
            "SMTP_CONFIG": sink.smtp_config(),
            **WEBHOOK_ENV,
        },
    )
    proc, log = serve(env)
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=30) as client:
            client.login("api_token", token)
            assert client.sendmail(SENDER, ["a@dest.test"], message(to="a@dest.test")) == {}
        wait_for(lambda: held.waiting)  # the event's request is at the receiver
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        hanging.set()
        log.text(10)  # the output ended with the process
        assert proc.stderr is not None
        proc.stderr.close()
    [(headers, _)] = held.requests
    [row] = store._read("SELECT state, attempts, next_attempt FROM webhook_outbox")
    assert (row["state"], row["attempts"]) == ("pending", 0)  # claimed, never settled
    with store._write() as db:  # the 60 s lease ends while no relay runs
        db.execute("UPDATE webhook_outbox SET next_attempt = 0")
    held.hold = None
    relay_factory(RELAY_DATABASE=str(database), SMTP_CONFIG=sink.smtp_config(), **WEBHOOK_ENV)
    wait_for(lambda: len(held.requests) == 2)
    assert held.requests[1][0]["webhook-id"] == headers["webhook-id"]  # the same event
    standardwebhooks.Webhook(hook["secret"]).verify(held.requests[1][1], held.requests[1][0])
    wait_for(lambda: store._read("SELECT state FROM webhook_outbox")[0]["state"] == "delivered")
    held.close()
