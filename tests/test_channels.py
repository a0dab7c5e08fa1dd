"""Upstream channels end to end: a real client, the real relay, real local upstreams.

The upstreams are an aiosmtpd sink (plain, STARTTLS, implicit TLS, with AUTH) and
local HTTP servers that answer as Resend and Cloudflare document. Each test
checks which upstream a message reached, what it received, and the exact reply
the client saw (docs/channels.md, "Outcomes").
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from support import DOMAIN, SENDER, free_port, message

from relay.channels.base import Delivery, Outbound
from relay.channels.smtp_upstream import SmtpChannel
from relay.errors import DeliveryError
from relay.upstreams import SmtpUpstream
from tests.fake_upstreams import RESEND_UNVERIFIED_DOMAIN, FakeCloudflare, FakeResend

# aiosmtpd warns when a server requires AUTH without STARTTLS, which is also what
# it says of an implicit-TLS server (it cannot tell); under `filterwarnings =
# error` that warning would kill the sink's connection before its greeting.
sink_auth_without_starttls = pytest.mark.filterwarnings(
    "ignore:Requiring AUTH while not requiring TLS:UserWarning"
)

RCPT = "rcpt@dest.test"
OTHER = "other@dest.test"
MESSAGE_ID = "<m1@example.com>"
DELIVERED = f"250 2.0.0 Ok {MESSAGE_ID}"


# --- fixtures and helpers ------------------------------------------------------


@pytest.fixture
def resend() -> Iterator[FakeResend]:
    with FakeResend() as fake:
        yield fake


@pytest.fixture
def cloudflare() -> Iterator[FakeCloudflare]:
    with FakeCloudflare() as fake:
        yield fake


def cloudflare_env(fake: FakeCloudflare) -> dict[str, str]:
    return {
        "CLOUDFLARE_ACCOUNT_ID": fake.account_id,
        "CLOUDFLARE_API_TOKEN": fake.token,
        "CLOUDFLARE_API_URL": fake.url,
    }


def resend_env(fake: FakeResend, token: str = "re_global") -> dict[str, str]:
    return {"RESEND_TOKEN": token, "RESEND_API_URL": fake.url}


def mail(message_id: str = MESSAGE_ID, to: str = RCPT, extra: str = "", **kwargs: Any) -> bytes:
    return message(to=to, extra=f"Message-ID: {message_id}\r\n{extra}", **kwargs)


def send(
    relay: Any,
    content: bytes | None = None,
    recipients: tuple[str, ...] = (RCPT,),
    sender: str = SENDER,
    token: str | None = None,
) -> str:
    """One transaction in a fresh client session; the exact reply to the end of DATA."""
    raw = relay.raw()
    assert raw.login(token or relay.token()).startswith("235 ")
    assert raw.cmd(f"MAIL FROM:<{sender}>").startswith("250 "), sender
    for rcpt in recipients:
        assert raw.cmd(f"RCPT TO:<{rcpt}>").startswith("250 "), rcpt
    assert raw.cmd("DATA").startswith("354 ")
    body = content if content is not None else mail(to=", ".join(recipients))
    stuffed = b"".join(
        b"." + line if line.startswith(b".") else line for line in body.splitlines(keepends=True)
    )
    raw.sock.sendall(stuffed + b".\r\n")
    return raw.read()


def smtp_to(port: int, domain: str = DOMAIN) -> str:
    return f'{{"{domain}": {{"host": "127.0.0.1", "port": {port}, "startTls": false}}}}'


def with_auth_allowed(upstream: Any) -> str:
    """The sink's entry; a plaintext sink's credentials allowed without TLS."""
    if upstream.mode == "plain":
        return str(upstream.smtp_config(tls={"allowPlaintextAuth": True}))
    return str(upstream.smtp_config())


def balance(relay: Any, address: str = SENDER) -> int:
    """The balance the relay reads: the sender's row, or DEFAULT_SEND_BALANCE before the
    first charge writes one."""
    rows = [r for r in relay.store.list_senders() if r["address"] == address]
    return int(rows[0]["balance"]) if rows else relay.relay.settings.default_send_balance


def forward_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The per-message lines `_forward` logs (AUTH lines left out)."""
    lines = (r.getMessage() for r in caplog.records if r.name == "relay.session")
    return [line for line in lines if line.startswith("message ")]


@pytest.fixture
def session_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="relay.session")
    return caplog


def wrap_hook(sink: Any, name: str, before: Callable[[Any], Any]) -> None:
    """Run `before(server)` ahead of the recorder's `handle_<name>` hook.

    aiosmtpd collects the hooks when a connection starts, so this must run
    before the relay first connects.
    """
    original = getattr(sink.recorder, f"handle_{name}")

    async def hook(server: Any, *args: Any) -> Any:
        early = before(server)
        if early is not None:
            return early
        return await original(server, *args)

    setattr(sink.recorder, f"handle_{name}", hook)


def on_sink_loop(server: Any, fn: Callable[[], None]) -> None:
    """Run `fn` on the sink's event loop and wait until it has run."""
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    server.loop.call_soon_threadsafe(run)
    assert done.wait(5)


# --- selection: each rule reaches its upstream -----------------------------------


@pytest.mark.parametrize(
    ("channels", "verified", "expected", "charged"),
    [
        pytest.param(("cloudflare", "resend", "smtp"), True, "cloudflare", 0, id="1-verified-free"),
        pytest.param(("cloudflare", "resend", "smtp"), False, "resend", 1, id="2-resend-first"),
        pytest.param(("resend", "smtp"), False, "resend", 1, id="2-resend-over-smtp"),
        pytest.param(("cloudflare", "smtp"), False, "smtp", 1, id="3-smtp-over-cloudflare"),
        pytest.param(("smtp",), False, "smtp", 1, id="3-smtp-only"),
        pytest.param(("cloudflare", "other-smtp"), False, "cloudflare", 1, id="4-cloudflare"),
    ],
)
def test_each_rule_reaches_its_upstream(
    relay_factory, sink, resend, cloudflare, session_log, channels, verified, expected, charged
):
    env = {"DEFAULT_SEND_BALANCE": "1000"}
    if "cloudflare" in channels:
        env |= cloudflare_env(cloudflare)
    if "resend" in channels:
        env |= resend_env(resend)
    if "smtp" in channels:
        env["SMTP_CONFIG"] = sink.smtp_config()
    if "other-smtp" in channels:
        env["SMTP_CONFIG"] = sink.smtp_config("other.test")
    relay = relay_factory(**env)
    if verified:
        relay.store.add_verified(RCPT)

    assert send(relay) == DELIVERED

    reached = {
        "cloudflare": len(cloudflare.requests),
        "resend": len(resend.requests),
        "smtp": len(sink.messages),
    }
    assert reached == {name: int(name == expected) for name in reached}
    assert balance(relay) == 1000 - charged
    rule = {"cloudflare": 1 if verified else 4, "resend": 2, "smtp": 3}[expected]
    [line] = forward_log(session_log)
    assert f"channel={expected} rule={rule} reply='250 2.0.0'" in line


@pytest.mark.parametrize(
    ("sender", "token"),
    [
        pytest.param(SENDER, "re_example", id="per-domain-token-wins"),
        pytest.param("app@other.test", "re_global", id="other-domain-global-token"),
    ],
)
def test_resend_token_per_sender_domain_in_authorization(relay_factory, resend, sender, token):
    relay = relay_factory(
        **resend_env(resend), RESEND_TOKEN_EXAMPLE_COM="re_example", DEFAULT_SEND_BALANCE="10"
    )
    login = relay.token()
    relay.token("acme", "other.test")

    reply = send(relay, mail(sender=sender), sender=sender, token=login)

    assert reply == DELIVERED
    [request] = resend.requests
    assert request.headers["authorization"] == f"Bearer {token}"


def test_verified_recipients_go_free_through_cloudflare_unchanged(relay_factory, cloudflare):
    relay = relay_factory(**cloudflare_env(cloudflare), DEFAULT_SEND_BALANCE="1")
    relay.store.add_verified(RCPT)
    relay.store.add_verified(OTHER)
    content = mail(to=f"{RCPT}, {OTHER}")

    assert send(relay, content, (RCPT, OTHER)) == DELIVERED
    assert send(relay, content.replace(b"m1@", b"m2@"), (RCPT, OTHER)) == (
        "250 2.0.0 Ok <m2@example.com>"
    )

    [first, _] = cloudflare.sent
    assert first.json["from"] == SENDER
    assert first.json["recipients"] == [RCPT, OTHER]
    assert first.json["mime_message"].endswith(content.decode())
    # A balance of 1 covers neither message on a charging channel: these were free.
    assert balance(relay) == 1


def test_no_channel_for_the_sender_domain_is_451_at_mail(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config("other.test"), DEFAULT_SEND_BALANCE="10")
    raw = relay.raw()
    raw.login(relay.token())

    reply = raw.cmd(f"MAIL FROM:<{SENDER}>")

    assert reply == "451 4.3.0 No upstream channel configured for sender domain example.com"
    assert sink.recorder.connections == 0


# --- upstream SMTP: transports, AUTH, certificates, the pool ------------------------


@sink_auth_without_starttls
@pytest.mark.parametrize("mode", ["plain", "starttls", "tls"])
def test_smtp_upstream_with_auth(relay_factory, sink_factory, mode):
    upstream = sink_factory(mode, username="relay-user", password="s3cret")
    relay = relay_factory(SMTP_CONFIG=with_auth_allowed(upstream), DEFAULT_SEND_BALANCE="10")

    assert send(relay) == DELIVERED

    [received] = upstream.messages
    assert (received.mail_from, received.rcpt_tos) == (SENDER, [RCPT])
    assert b"Message-ID: <m1@example.com>" in received.content
    assert upstream.recorder.auth_logins == [b"relay-user"]


@sink_auth_without_starttls
def test_smtp_upstream_rejecting_relay_credentials_is_451(relay_factory, sink_factory):
    upstream = sink_factory("tls", username="relay-user", password="s3cret")
    config = upstream.smtp_config(credentials={"username": "relay-user", "password": "wrong"})
    relay = relay_factory(SMTP_CONFIG=config, DEFAULT_SEND_BALANCE="10")

    assert send(relay) == "451 4.3.0 smtp: upstream rejected relay credentials"
    assert upstream.messages == []
    assert balance(relay) == 10


@sink_auth_without_starttls
@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_smtp_upstream_certificate_is_verified_by_default(relay_factory, sink_factory, mode):
    upstream = sink_factory(mode, username="relay-user", password="s3cret")
    # No `tls.ca`: the sink's self-signed certificate is not in the system store.
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(tls={}), DEFAULT_SEND_BALANCE="10")

    assert send(relay).startswith("451 4.3.0 smtp: ")
    assert upstream.messages == []
    assert upstream.recorder.auth_logins == []
    assert balance(relay) == 10


@sink_auth_without_starttls
@pytest.mark.parametrize(
    "mode",
    [
        "starttls",
        # aiosmtplib wraps the TLS failure of an implicit-TLS connect in an
        # SMTPConnectError; the reply must still name the TLS failure.
        "tls",
    ],
)
def test_smtp_upstream_certificate_failure_is_named(relay_factory, sink_factory, mode):
    upstream = sink_factory(mode, username="relay-user", password="s3cret")
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(tls={}), DEFAULT_SEND_BALANCE="10")

    assert send(relay) == "451 4.3.0 smtp: TLS with upstream failed (CERTIFICATE_VERIFY_FAILED)"


@sink_auth_without_starttls
@pytest.mark.parametrize("mode", ["plain", "starttls", "tls"])
def test_smtp_connection_reused_across_messages(relay_factory, sink_factory, mode):
    upstream = sink_factory(mode, username="relay-user", password="s3cret")
    relay = relay_factory(SMTP_CONFIG=with_auth_allowed(upstream), DEFAULT_SEND_BALANCE="10")

    assert send(relay, mail("<m1@example.com>")) == "250 2.0.0 Ok <m1@example.com>"
    assert send(relay, mail("<m2@example.com>")) == "250 2.0.0 Ok <m2@example.com>"

    assert len(upstream.messages) == 2
    assert upstream.recorder.connections == 1
    assert upstream.recorder.auth_logins == [b"relay-user"]


@pytest.mark.parametrize(
    ("refusal", "reply"),
    [
        ({"mail_reply": "553 5.7.1 Sender not allowed"}, "553 5.7.1 smtp: Sender not allowed"),
        ({"rcpt_replies": {OTHER: "550 5.1.1 No such user"}}, "550 5.1.1 smtp: No such user"),
        ({"data_reply": "554 5.7.1 Rejected as spam"}, "554 5.7.1 smtp: Rejected as spam"),
    ],
    ids=["mail", "rcpt", "data"],
)
def test_smtp_pooled_connection_survives_a_refused_message(relay_factory, sink, refusal, reply):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    for name, value in refusal.items():
        setattr(sink.recorder, name, value)
    assert send(relay, mail("<m1@example.com>", to=OTHER), (OTHER,)) == reply

    sink.recorder.mail_reply = sink.recorder.data_reply = None
    assert send(relay, mail("<m2@example.com>")) == "250 2.0.0 Ok <m2@example.com>"

    [received] = sink.messages
    assert received.rcpt_tos == [RCPT]
    assert sink.recorder.connections == 1
    assert balance(relay) == 9


@sink_auth_without_starttls
@pytest.mark.parametrize("mode", ["plain", "tls"])
@pytest.mark.parametrize("how", ["aborted-while-idle", "closed-at-mail", "421-at-mail"])
def test_smtp_recovers_from_a_pooled_connection_the_upstream_closed(
    relay_factory, sink_factory, mode, how
):
    upstream = sink_factory(mode, username="relay-user", password="s3cret")
    seen: list[Any] = []
    armed = threading.Event()

    def at_data(server: Any) -> None:
        seen.append(server)

    def at_mail(server: Any) -> str | None:
        if not armed.is_set():
            return None
        armed.clear()
        if how == "closed-at-mail":
            server.transport.abort()  # no reply at all: the peer just went away
        return "421 4.4.2 sink.test closing idle connection"

    wrap_hook(upstream, "DATA", at_data)
    wrap_hook(upstream, "MAIL", at_mail)
    relay = relay_factory(SMTP_CONFIG=with_auth_allowed(upstream), DEFAULT_SEND_BALANCE="10")

    assert send(relay, mail("<m1@example.com>")) == "250 2.0.0 Ok <m1@example.com>"
    if how == "aborted-while-idle":
        [server] = seen  # the one connection, idle in the relay's pool now
        on_sink_loop(server, server.transport.abort)
    else:
        armed.set()
    assert send(relay, mail("<m2@example.com>")) == "250 2.0.0 Ok <m2@example.com>"

    ids = [m.content.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in upstream.messages]
    assert ids == [b"<m1@example.com>", b"<m2@example.com>"]
    assert upstream.recorder.connections == 2
    assert upstream.recorder.auth_logins == [b"relay-user", b"relay-user"]
    assert balance(relay) == 8


# --- Resend: the translation as it reaches Resend ----------------------------------


def test_resend_bcc_for_envelope_only_recipients(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")

    assert send(relay, mail(to=RCPT), (RCPT, OTHER)) == DELIVERED

    [sent] = resend.sent
    assert sent.json["to"] == [RCPT]
    assert sent.json["bcc"] == [OTHER]
    assert "cc" not in sent.json


def test_resend_bcc_only_send_goes_once_per_recipient(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")
    content = mail(to="undisclosed-recipients:;")

    assert send(relay, content, (RCPT, OTHER)) == DELIVERED

    # Resend shows `to` to everyone: each Bcc recipient gets a request of its own.
    assert sorted(s.json["to"][0] for s in resend.sent) == sorted([RCPT, OTHER])
    assert all(len(s.json["to"]) == 1 and "bcc" not in s.json for s in resend.sent)
    keys = {r.headers["idempotency-key"] for r in resend.requests}
    assert len(keys) == 2
    assert relay.store.show_sender(SENDER)["balance"] == 8


def test_resend_bcc_only_partial_refusal_charges_the_delivered_one(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")
    resend.fail(422, "validation_error", "Invalid `to` field.")

    assert send(relay, mail(to="undisclosed-recipients:;"), (RCPT, OTHER)) == DELIVERED

    assert len(resend.sent) == 1
    assert relay.store.show_sender(SENDER)["balance"] == 9


def test_resend_header_only_addresses_are_not_sent_to(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")
    content = mail(to=f"{RCPT}, listed@dest.test", extra="Cc: copied@dest.test\r\n")

    assert send(relay, content, (RCPT,)) == DELIVERED

    [sent] = resend.sent
    assert sent.json["to"] == [RCPT]
    assert "cc" not in sent.json
    assert "bcc" not in sent.json
    assert b"listed@dest.test" not in sent.request.body
    assert b"copied@dest.test" not in sent.request.body


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + bytes(range(255, -1, -1)) * 8


def test_resend_attachments_and_inline_image_survive(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RCPT
    msg["Subject"] = "Report"
    msg["Message-ID"] = MESSAGE_ID
    msg.set_content("See the report.\n")
    msg.add_alternative('<p>See the report.</p><img src="cid:logo@example.com">\n', subtype="html")
    html = msg.get_body(preferencelist=("html",))
    assert html is not None
    html.add_related(
        PNG, "image", "png", cid="<logo@example.com>", filename="logo.png", disposition="inline"
    )
    msg.add_attachment(PDF, "application", "pdf", filename="report.pdf")

    with relay.login() as client:
        assert client.send_message(msg) == {}

    [sent] = resend.sent
    body = sent.json
    assert body["subject"] == "Report"
    assert body["text"] == "See the report.\n"
    assert body["html"] == '<p>See the report.</p><img src="cid:logo@example.com">\n'
    by_name = {a["filename"]: a for a in body["attachments"]}
    assert set(by_name) == {"logo.png", "report.pdf"}
    logo, report = by_name["logo.png"], by_name["report.pdf"]
    assert base64.b64decode(logo["content"]) == PNG
    assert logo["content_type"] == "image/png"
    assert logo["content_id"] == "logo@example.com"
    assert base64.b64decode(report["content"]) == PDF
    assert report["content_type"] == "application/pdf"
    assert "content_id" not in report


def test_resend_idempotency_key_stable_across_a_client_retry(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")
    content = mail("<retry@example.com>")

    first = send(relay, content)
    second = send(relay, content)  # the client lost the first reply and sends again

    assert first == second == "250 2.0.0 Ok <retry@example.com>"
    keys = [r.headers["idempotency-key"] for r in resend.requests]
    assert len(keys) == 2
    assert keys[0] == keys[1]
    assert len(resend.sent) == 1
    # Resend sent it once, so the retry is not charged: 10 - 1 recipient.
    assert relay.store.show_sender(SENDER)["balance"] == 9


def test_resend_another_message_another_idempotency_key(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")

    assert send(relay, mail("<a@example.com>")) == "250 2.0.0 Ok <a@example.com>"
    assert send(relay, mail("<b@example.com>")) == "250 2.0.0 Ok <b@example.com>"

    keys = {r.headers["idempotency-key"] for r in resend.requests}
    assert len(keys) == 2
    assert len(resend.sent) == 2
    assert relay.store.show_sender(SENDER)["balance"] == 8


# --- outcomes in the client's session, per channel ------------------------------------


def _ok(fake: Any) -> None:
    return None


RESEND_OUTCOMES = [
    pytest.param(_ok, DELIVERED, 9, id="delivered"),
    pytest.param(
        lambda f: f.fail(422, "invalid_attachment"),
        "554 5.6.0 resend: Attachment must have either a content or path.",
        10,
        id="422-content-refused",
    ),
    pytest.param(
        lambda f: f.fail(422, "validation_error", "Invalid `to` field."),
        "550 5.1.3 resend: Invalid to field.",
        10,
        id="422-recipient-refused",
    ),
    pytest.param(
        lambda f: f.fail(403, "validation_error", RESEND_UNVERIFIED_DOMAIN),
        "550 5.7.1 resend: The example.com domain is not verified. Please, add and verify "
        "your domain on https://resend.com/domains",
        10,
        id="403-domain-not-verified",
    ),
    pytest.param(
        lambda f: f.fail(429, "rate_limit_exceeded", retry_after="30"),
        "451 4.7.0 resend: rate limited; retry after 30 s",
        10,
        id="429-throttled",
    ),
    pytest.param(
        lambda f: f.fail(429, "daily_quota_exceeded"),
        "451 4.7.0 resend: daily quota exceeded",
        10,
        id="429-quota",
    ),
    pytest.param(
        lambda f: f.fail(500, "internal_server_error"),
        "451 4.3.0 resend: upstream error (HTTP 500)",
        10,
        id="500-down",
    ),
    pytest.param(
        lambda f: f.script(502, "<html>Bad gateway</html>"),
        "451 4.3.0 resend: unexpected reply (HTTP 502)",
        10,
        id="502-html",
    ),
    pytest.param(
        lambda f: f.fail(403, "invalid_api_key"),
        "451 4.3.0 resend: upstream rejected relay credentials",
        10,
        id="403-credentials",
    ),
    pytest.param(
        lambda f: f.fail(401, "missing_api_key"),
        "451 4.3.0 resend: upstream rejected relay credentials",
        10,
        id="401-credentials",
    ),
]


@pytest.mark.parametrize(("script", "reply", "left"), RESEND_OUTCOMES)
def test_resend_outcomes(relay_factory, resend, script, reply, left):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")
    script(resend)

    assert send(relay) == reply
    assert len(resend.requests) == 1
    assert balance(relay) == left


CLOUDFLARE_OUTCOMES = [
    pytest.param(_ok, DELIVERED, 9, id="delivered"),
    pytest.param(
        lambda f: f.queue(RCPT),
        DELIVERED,
        9,
        id="queued",
    ),
    pytest.param(
        lambda f: f.bounce(RCPT),
        "550 5.1.1 cloudflare: permanent bounce",
        10,
        id="all-bounced",
    ),
    pytest.param(
        lambda f: f.fail(400, 10202),
        "554 5.6.0 cloudflare: invalid email content",
        10,
        id="400-content-refused",
    ),
    pytest.param(
        lambda f: f.fail(200, 10203),
        "451 4.3.0 cloudflare: sending disabled for this domain or account",
        10,
        id="200-success-false",
    ),
    pytest.param(
        lambda f: f.fail(429, 10004, "Too many requests", retry_after="7"),
        "451 4.7.0 cloudflare: rate limited; retry after 7 s",
        10,
        id="429-throttled",
    ),
    pytest.param(
        lambda f: f.fail(500, 10002, "Internal error"),
        "451 4.3.0 cloudflare: upstream error (HTTP 500)",
        10,
        id="500-down",
    ),
    pytest.param(
        lambda f: f.fail(401, 10101, "Unauthorized"),
        "451 4.3.0 cloudflare: upstream rejected relay credentials",
        10,
        id="401-credentials",
    ),
]


@pytest.mark.parametrize(("script", "reply", "left"), CLOUDFLARE_OUTCOMES)
def test_cloudflare_outcomes(relay_factory, cloudflare, script, reply, left):
    relay = relay_factory(**cloudflare_env(cloudflare), DEFAULT_SEND_BALANCE="10")
    script(cloudflare)

    assert send(relay) == reply
    assert len(cloudflare.requests) == 1
    assert balance(relay) == left


SMTP_OUTCOMES = [
    pytest.param({}, DELIVERED, 9, id="delivered"),
    pytest.param(
        {"data_reply": "554 5.7.1 Message content rejected as spam"},
        "554 5.7.1 smtp: Message content rejected as spam",
        10,
        id="554-at-data",
    ),
    pytest.param(
        {"rcpt_replies": {RCPT: "550 5.1.1 No such user"}},
        "550 5.1.1 smtp: No such user",
        10,
        id="550-only-recipient",
    ),
    pytest.param(
        {"mail_reply": "451 4.7.1 Too many messages, slow down"},
        "451 4.7.0 smtp: upstream deferred (451 4.7.1 Too many messages, slow down)",
        10,
        id="451-throttled",
    ),
    pytest.param(
        {"mail_reply": "421 4.3.2 Service not available"},
        "451 4.3.0 smtp: upstream deferred (421 4.3.2 Service not available)",
        10,
        id="421-at-mail",
    ),
    pytest.param(
        {"rcpt_replies": {RCPT: "452 4.5.3 Too many recipients"}},
        "451 4.3.0 smtp: upstream deferred (452 4.5.3 Too many recipients)",
        10,
        id="452-at-rcpt",
    ),
    pytest.param(
        {"data_reply": "451 4.3.0 Queue full"},
        "451 4.3.0 smtp: upstream deferred (451 4.3.0 Queue full)",
        10,
        id="451-at-data",
    ),
    pytest.param(
        {"data_reply": "421 4.3.2 Shutting down"},
        "451 4.3.0 smtp: upstream deferred (421 4.3.2 Shutting down)",
        10,
        id="421-at-data",
    ),
    pytest.param(
        {"rcpt_replies": {RCPT: "421 4.7.0 Too many connections, try again in 60 s"}},
        "451 4.7.0 smtp: upstream deferred (421 4.7.0 Too many connections, try again in 60 s)",
        10,
        # aiosmtplib closes the connection on a 421: no RSET may hide its reason.
        id="421-at-rcpt",
    ),
]


@pytest.mark.parametrize(("script", "reply", "left"), SMTP_OUTCOMES)
def test_smtp_outcomes(relay_factory, sink, script, reply, left):
    for name, value in script.items():
        setattr(sink.recorder, name, value)
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay) == reply
    assert len(sink.messages) == int(reply.startswith("250"))
    assert balance(relay) == left


def test_smtp_421_at_rcpt_defers_and_delivers_nothing(relay_factory, sink):
    sink.recorder.rcpt_replies[RCPT] = "421 4.7.0 Too many connections, try again in 60 s"
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay).startswith("451 4.")
    assert sink.messages == []
    assert balance(relay) == 10


@pytest.mark.parametrize(
    ("channel", "reply"),
    [
        ("resend", "451 4.3.0 resend: upstream unreachable (connection failed)"),
        ("cloudflare", "451 4.3.0 cloudflare: upstream unreachable (connection failed)"),
        ("smtp", "451 4.3.0 smtp: upstream refused the connection"),
    ],
)
def test_upstream_down_is_451(relay_factory, channel, reply):
    url = f"http://127.0.0.1:{free_port()}"
    env = {
        "resend": {"RESEND_TOKEN": "re_global", "RESEND_API_URL": url},
        "cloudflare": {
            "CLOUDFLARE_ACCOUNT_ID": "acct-1",
            "CLOUDFLARE_API_TOKEN": "cf-token",
            "CLOUDFLARE_API_URL": url,
        },
        "smtp": {"SMTP_CONFIG": smtp_to(free_port())},
    }[channel]
    relay = relay_factory(**env, DEFAULT_SEND_BALANCE="10")

    assert send(relay) == reply
    assert balance(relay) == 10


@pytest.fixture
def silent_smtp() -> Iterator[int]:
    """A listener that accepts and never greets: an upstream that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.mark.parametrize("channel", ["resend", "cloudflare", "smtp"])
def test_upstream_timeout_is_451(relay_factory, resend, cloudflare, silent_smtp, channel):
    # The fakes hold the answer far longer than the timeout; stopping them releases it.
    resend.script(200, {"id": "late"}, delay=30)
    cloudflare.script(200, {"success": True, "result": {"delivered": [RCPT]}}, delay=30)
    env = {
        "resend": resend_env(resend),
        "cloudflare": cloudflare_env(cloudflare),
        "smtp": {"SMTP_CONFIG": smtp_to(silent_smtp)},
    }[channel]
    relay = relay_factory(**env, RELAY_UPSTREAM_TIMEOUT="0.5", DEFAULT_SEND_BALANCE="10")

    assert send(relay) == f"451 4.3.0 {channel}: upstream timed out"
    assert balance(relay) == 10


# --- partial delivery: success for the delivered, the refused logged and not charged ---


def test_cloudflare_partial_bounce(relay_factory, cloudflare, session_log):
    relay = relay_factory(**cloudflare_env(cloudflare), DEFAULT_SEND_BALANCE="10")
    cloudflare.bounce(OTHER)

    assert send(relay, recipients=(RCPT, OTHER)) == DELIVERED

    assert len(cloudflare.sent) == 1
    assert balance(relay) == 9
    [line] = forward_log(session_log)
    assert "channel=cloudflare rule=4 reply='250 2.0.0'" in line
    assert f"refused={OTHER}:550" in line


def test_smtp_partial_refusal(relay_factory, sink, session_log):
    sink.recorder.rcpt_replies[OTHER] = "550 5.1.1 No such user"
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay, recipients=(RCPT, OTHER)) == DELIVERED

    [received] = sink.messages
    assert received.rcpt_tos == [RCPT]
    assert balance(relay) == 9
    [line] = forward_log(session_log)
    assert "channel=smtp rule=3 reply='250 2.0.0'" in line
    assert f"refused={OTHER}:550" in line
    assert "upstream_id=up1 " in line


def test_channel_outcome_and_upstream_id_logged(relay_factory, resend, session_log):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")

    assert send(relay) == DELIVERED

    [sent] = resend.sent
    [line] = forward_log(session_log)
    assert line.startswith(f"message {MESSAGE_ID} from={SENDER} rcpts=1 channel=resend rule=2")
    assert f"reply='250 2.0.0' upstream_id={sent.id} refused=- refunded=0" in line


# --- failover: tests/test_failover.py ------------------------------------------------


# --- hostile or ambiguous sender headers (found in review) -----------------------------


@pytest.mark.parametrize(
    "from_value",
    [
        "x@victim.test y@example.com",  # getaddresses reads y@, Resend's parser x@
        "x@victim.test\\x@:",
        "\r\n ".join(["(" * 900] * 6) + "a@example.com",  # nested comments, folded: RecursionError
    ],
)
def test_ambiguous_from_header_is_refused_and_nothing_is_sent(relay_factory, resend, from_value):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")
    relay.token("victim", "victim.test")
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd(f"RCPT TO:<{RCPT}>")
    raw.cmd("DATA")
    raw.send(f"From: {from_value}\r\nTo: {RCPT}\r\nSubject: s\r\n\r\nbody\r\n.".encode())
    assert raw.read() == (
        "554 5.6.0 From or Sender header is not a clean address list (RFC 5322 section 3.4)"
    )
    assert resend.requests == []
    assert relay.store.list_senders() == []  # nothing charged, nothing written
    # The session goes on with a fresh transaction.
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"


def test_pooled_connection_survives_a_refused_data_command(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    original = sink.recorder.handle_DATA
    calls = []

    async def refuse_first(server, session, envelope):
        calls.append(1)
        if len(calls) == 1:
            return "451 4.3.0 try again"
        return await original(server, session, envelope)

    sink.recorder.handle_DATA = refuse_first
    assert send(relay, mail("<one@example.com>")).startswith("451 4.3.0 smtp: upstream deferred")
    assert send(relay, mail("<two@example.com>")) == "250 2.0.0 Ok <two@example.com>"
    assert sink.recorder.connections == 1
    assert len(sink.messages) == 1


def test_a_deferred_recipient_defers_the_whole_message(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    sink.recorder.rcpt_replies[OTHER] = "452 4.2.2 mailbox full"
    reply = send(relay, mail(), (RCPT, OTHER))
    assert reply == "451 4.3.0 smtp: upstream deferred (452 4.2.2 mailbox full)"
    assert sink.messages == []
    assert relay.store.show_sender(SENDER)["balance"] == 10


def test_resend_bcc_only_copy_deferred_defers_the_message(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10")
    resend.fail(429, "rate_limit_exceeded", retry_after="7")

    reply = send(relay, mail(to="undisclosed-recipients:;"), (RCPT, OTHER))

    assert reply.startswith("451 4.7.0 resend: ") and "retry after 7 s" in reply
    assert relay.store.show_sender(SENDER)["balance"] == 10


def test_upstream_asking_for_auth_the_relay_lacks_is_451(relay_factory, sink_factory):
    sink = sink_factory("plain", username="relay-user", password="s3cret")
    config = json.loads(sink.smtp_config())
    del config[DOMAIN]["credentials"]
    relay = relay_factory(SMTP_CONFIG=json.dumps(config), DEFAULT_SEND_BALANCE="10")
    reply = send(relay, mail())
    assert reply.startswith(
        "451 4.3.0 smtp: upstream requires authentication the relay does not have"
    )
    assert relay.store.show_sender(SENDER)["balance"] == 10


def test_eight_bit_content_is_declared_to_the_upstream(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    assert send(relay, mail("<plain@example.com>")) == "250 2.0.0 Ok <plain@example.com>"
    eight_bit = mail("<utf8@example.com>", body="Grüße")  # UTF-8 in the body
    assert send(relay, eight_bit) == "250 2.0.0 Ok <utf8@example.com>"
    assert sink.recorder.mail_options == [[], ["BODY=8BITMIME"]]
    assert "Grüße".encode() in sink.messages[1].content


@sink_auth_without_starttls
@pytest.mark.parametrize("start_tls", [True, False], ids=["none-offered", "startTls-false"])
def test_credentials_never_travel_in_cleartext(relay_factory, sink_factory, caplog, start_tls):
    upstream = sink_factory("plain", username="relay-user", password="s3cret")
    relay = relay_factory(
        SMTP_CONFIG=upstream.smtp_config(startTls=start_tls), DEFAULT_SEND_BALANCE="10"
    )
    with caplog.at_level(logging.ERROR, logger="relay.smtp"):
        first = send(relay, mail("<m1@example.com>"))
        second = send(relay, mail("<m2@example.com>"))

    reason = "451 4.3.0 smtp: upstream offers no TLS; credentials not sent in cleartext"
    assert first == second == reason
    assert upstream.recorder.auth_logins == []
    assert upstream.messages == []
    assert balance(relay) == 10
    logged = [r for r in caplog.records if "offers no TLS" in r.getMessage()]
    assert len(logged) == 1  # once per upstream, not per message
    assert "s3cret" not in caplog.text


@sink_auth_without_starttls
def test_plaintext_auth_when_the_entry_allows_it(relay_factory, sink_factory):
    upstream = sink_factory("plain", username="relay-user", password="s3cret")
    relay = relay_factory(SMTP_CONFIG=with_auth_allowed(upstream), DEFAULT_SEND_BALANCE="10")
    assert send(relay) == DELIVERED
    assert upstream.recorder.auth_logins == [b"relay-user"]


def test_lines_starting_with_a_dot_reach_the_upstream_unchanged(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    body = ".hidden\r\n..two dots\r\n.\r\nend"
    assert send(relay, mail(body=body)) == DELIVERED
    [received] = sink.messages
    assert received.content.endswith(body.encode() + b"\r\n")


def test_eight_bit_content_is_declared_on_a_new_connection(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    eight_bit = mail("<utf8@example.com>", body="Grüße")
    assert send(relay, eight_bit) == "250 2.0.0 Ok <utf8@example.com>"
    assert sink.recorder.connections == 1
    assert sink.recorder.mail_options == [["BODY=8BITMIME"]]
    assert "Grüße".encode() in sink.messages[0].content


# --- per-upstream pacing ----------------------------------------------------------


def deliver_smtp_together(sink: Any, rate: float, count: int, timeout: float) -> list[Any]:
    upstream = SmtpUpstream("127.0.0.1", sink.port, start_tls=False, rate=rate)

    async def run() -> list[Any]:
        channel = SmtpChannel({DOMAIN: upstream}, timeout=timeout, local_hostname="relay.test")

        async def one(i: int) -> Any:
            content = mail(f"<p{i}@example.com>")
            try:
                return await channel.deliver(
                    Outbound(SENDER, (RCPT,), content, f"<p{i}@example.com>", f"{i:064x}")
                )
            except DeliveryError as exc:
                return exc

        try:
            return list(await asyncio.gather(*(one(i) for i in range(count))))
        finally:
            await channel.aclose()

    return asyncio.run(run())


def test_an_upstream_rate_paces_messages_within_the_budget(sink):
    results = deliver_smtp_together(sink, rate=2, count=3, timeout=5)
    assert all(isinstance(r, Delivery) for r in results)
    assert len(sink.messages) == 3


def test_an_upstream_rate_beyond_the_budget_is_451_with_the_wait(sink):
    results = deliver_smtp_together(sink, rate=1, count=2, timeout=0.5)  # a 1 s budget
    assert [isinstance(r, Delivery) for r in results] == [True, False]
    assert str(results[1].reply) == "451 4.7.0 smtp: upstream rate of 1/s; retry after 1 s"
    assert len(sink.messages) == 1


@pytest.mark.parametrize(
    ("size", "reply"),
    [
        (5_241_856, "354 "),  # what Cloudflare's 5 MiB leaves after the relay's headers
        (5_241_857, "552 5.3.4 Message too big for the cloudflare channel: at most 5241856 octets"),
    ],
)
def test_a_size_the_channel_cannot_carry_is_refused_before_the_upload(
    relay_factory, cloudflare, size, reply
):
    relay = relay_factory(**cloudflare_env(cloudflare), DEFAULT_SEND_BALANCE="10")
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}> SIZE={size}") == "250 2.1.0 Ok"
    assert raw.cmd(f"RCPT TO:<{RCPT}>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith(reply)
    if reply == "354 ":
        raw.sock.sendall(b".\r\n")  # abandon it: an empty message
        raw.read()
    assert cloudflare.requests == []


def test_a_forward_cancelled_while_the_upstream_greets_closes_its_connection():
    """The forward's time running out during connect or EHLO must not leave the
    socket open for the garbage collector: the upstream sees the connection end."""

    async def run() -> bytes:
        ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 upstream.test ESMTP\r\n")  # then never answers EHLO
            ended.set_result(await reader.read())  # reads until the end
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = SmtpUpstream("127.0.0.1", port, start_tls=False)
        channel = SmtpChannel({DOMAIN: upstream}, timeout=30, local_hostname="relay.test")
        outbound = Outbound(SENDER, (RCPT,), mail("<c@example.com>"), "<c@example.com>", "0" * 64)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await channel.deliver(outbound)
        try:
            async with asyncio.timeout(5):  # a bound, not a sync: the end comes at once
                return await ended
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(run()) == b"EHLO relay.test\r\n"  # and then the end


# --- worker-mailer's format (zou-yu/worker-mailer src/mailer.ts) -----------------


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_no_auth_where_the_upstream_offers_none(relay_factory, sink_factory, caplog, mode):
    # worker-mailer authenticates only when EHLO names AUTH; its other keys
    # (dsn, logLevel, the timeouts) are accepted and have no effect here.
    upstream = sink_factory(mode)
    config = upstream.smtp_config(
        credentials={"username": "relay-user", "password": "s3cret"},
        dsn={"RET": {"HEADERS": True}},
        logLevel="DEBUG",
        socketTimeoutMs=60000,
        responseTimeoutMs=30000,
    )
    relay = relay_factory(SMTP_CONFIG=config, DEFAULT_SEND_BALANCE="10")
    with caplog.at_level(logging.WARNING, logger="relay.smtp"):
        assert send(relay, mail("<m1@example.com>")) == "250 2.0.0 Ok <m1@example.com>"
        assert send(relay, mail("<m2@example.com>")) == "250 2.0.0 Ok <m2@example.com>"
    assert len(upstream.messages) == 2
    assert balance(relay) == 8
    logged = [r for r in caplog.records if "advertises no AUTH" in r.getMessage()]
    assert len(logged) == 1  # once per upstream
    assert "s3cret" not in caplog.text


@sink_auth_without_starttls
def test_no_auth_type_offered_of_those_named_is_451(relay_factory, sink_factory, caplog):
    upstream = sink_factory("tls", username="relay-user", password="s3cret")
    relay = relay_factory(
        SMTP_CONFIG=upstream.smtp_config(authType="cram-md5"), DEFAULT_SEND_BALANCE="10"
    )
    with caplog.at_level(logging.ERROR, logger="relay.smtp"):
        reply = send(relay)
    assert reply == "451 4.3.0 smtp: upstream offers none of authType cram-md5"
    assert upstream.messages == [] and upstream.recorder.auth_logins == []
    assert balance(relay) == 10
    assert "s3cret" not in caplog.text


@sink_auth_without_starttls
def test_without_auth_type_the_first_offered_is_used(relay_factory, sink_factory):
    upstream = sink_factory("tls", username="relay-user", password="s3cret")
    entry = json.loads(upstream.smtp_config())
    del entry[DOMAIN]["authType"]
    relay = relay_factory(SMTP_CONFIG=json.dumps(entry), DEFAULT_SEND_BALANCE="10")
    assert send(relay) == DELIVERED
    assert upstream.recorder.auth_logins == [b"relay-user"]


def test_cloudflare_size_as_sent_is_checked_before_the_request(relay_factory, cloudflare):
    # Under the relay's 5 MiB as MIME; over Cloudflare's 5 MiB once its line
    # ends travel escaped in the JSON string (email-service/platform/limits.mdx).
    relay = relay_factory(**cloudflare_env(cloudflare), DEFAULT_SEND_BALANCE="10")
    body = "abcdefgh\r\n" * ((5 * 1024 * 1024 - 8192) // 10)
    reply = send(relay, mail(body=body))
    assert reply.startswith("552 5.3.4 cloudflare: message too big as sent (")
    assert cloudflare.requests == []
    assert balance(relay) == 10


def test_cloudflare_suppression_400_delivers_the_other_recipients(relay_factory, cloudflare):
    cloudflare.suppress(OTHER)
    relay = relay_factory(**cloudflare_env(cloudflare), DEFAULT_SEND_BALANCE="10")
    assert send(relay, recipients=(RCPT, OTHER)) == DELIVERED
    [sent] = cloudflare.sent
    assert sent.json["recipients"] == [RCPT]
    assert balance(relay) == 9  # the suppressed recipient is not charged
    # Recorded as the provider's suppression, for a day (Cloudflare's shortest).
    [entry] = relay.store.list_suppressions("acme")
    assert (entry["address"], entry["reason"]) == (OTHER, "provider")
    assert entry["expires"] is not None and entry["expires"] - entry["created"] == 86400
