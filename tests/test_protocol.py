"""The documented endpoint, reply by reply, over real TLS against the real relay.

Each test asserts the exact code and enhanced code (RFC 3463) the reply table
(docs/replies.md) documents; the upstream is a real aiosmtpd server.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time

import pytest
from support import DOMAIN, SENDER, Raw, b64, message, plain

from relay.config import Limits


def test_greeting_names_the_host_and_no_software_version(relay):
    raw = relay.raw()
    assert raw.greeting == "220 relay.test ESMTP Service ready"


def test_ehlo_advertises_exactly_the_documented_extensions(relay):
    raw = relay.raw()
    assert raw.cmd("EHLO client.test").split("\n") == [
        "250-relay.test greets client.test",
        "250-AUTH PLAIN LOGIN",
        "250-SIZE 5242880",
        "250-8BITMIME",
        "250 ENHANCEDSTATUSCODES",
    ]


def test_helo_works_and_then_auth_needs_ehlo_extensions(relay):
    raw = relay.raw()
    assert raw.cmd("HELO client.test") == "250 relay.test"
    assert raw.cmd("MAIL FROM:<app@example.com>") == "530 5.7.0 Authentication required"


def test_auth_plain_initial_response(relay):
    raw = relay.raw()
    assert raw.login(relay.token()) == "235 2.7.0 Authentication successful"


def test_auth_plain_after_334_challenge(relay):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH PLAIN") == "334 "
    assert raw.cmd(plain(relay.token())) == "235 2.7.0 Authentication successful"


def test_auth_login_two_step(relay):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH LOGIN") == "334 " + b64("Username:")
    assert raw.cmd(b64("api_token")) == "334 " + b64("Password:")
    assert raw.cmd(b64(relay.token())) == "235 2.7.0 Authentication successful"


def test_auth_login_with_username_as_initial_response(relay):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH LOGIN " + b64("api_token")) == "334 " + b64("Password:")
    assert raw.cmd(b64(relay.token())) == "235 2.7.0 Authentication successful"


@pytest.mark.parametrize(
    "make_credentials",
    [
        pytest.param(lambda r: plain(r.token(), user="apitoken"), id="wrong-username"),
        pytest.param(lambda r: plain("rlt_" + "A" * 43), id="unknown-token"),
        pytest.param(lambda r: plain(""), id="empty-token"),
    ],
)
def test_auth_failures_are_535(relay, make_credentials):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH PLAIN " + make_credentials(relay)) == "535 5.7.8 Authentication failed"
    # The session goes on: a right token still works afterwards.
    assert raw.cmd("AUTH PLAIN " + plain(relay.token())) == "235 2.7.0 Authentication successful"


def test_revoked_token_is_refused(relay):
    token = relay.token()
    token_id = relay.store.list_tokens("acme")[-1]["id"]
    relay.store.revoke_token(token_id)
    raw = relay.raw()
    assert raw.login(token) == "535 5.7.8 Authentication failed"


def test_expired_token_is_refused(relay):
    token = relay.token(expires_in_days=-1)
    raw = relay.raw()
    assert raw.login(token) == "535 5.7.8 Authentication failed"


def test_auth_bad_base64_and_abort_are_501(relay):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH PLAIN !!!notbase64") == "501 5.5.2 Cannot decode base64"
    assert raw.cmd("AUTH LOGIN") == "334 " + b64("Username:")
    assert raw.cmd("*") == "501 5.7.0 Authentication aborted"


def test_second_auth_is_503(relay):
    raw = relay.raw()
    token = relay.token()
    raw.login(token)
    assert raw.cmd("AUTH PLAIN " + plain(token)) == "503 5.5.1 Already authenticated"


def test_unknown_mechanism_is_504(relay):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH CRAM-MD5") == "504 5.5.4 Unrecognized authentication type"


def test_repeated_auth_failures_end_the_session(relay):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    bad = "AUTH PLAIN " + plain("nope")
    assert raw.cmd(bad) == "535 5.7.8 Authentication failed"
    assert raw.cmd(bad) == "535 5.7.8 Authentication failed"
    raw.send(bad)
    assert raw.read() == "535 5.7.8 Authentication failed"
    assert raw.read() == "421 4.7.0 Too many failed authentication attempts"
    assert raw.closed()


def test_auth_exchange_times_out_with_421(relay_factory, sink):
    relay = relay_factory(Limits(auth_timeout=0.5), SMTP_CONFIG=sink.smtp_config())
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH LOGIN") == "334 " + b64("Username:")
    assert raw.read() == "421 4.4.2 Timeout, closing connection"
    assert raw.closed()


def test_idle_session_times_out_with_421(relay_factory, sink):
    relay = relay_factory(Limits(command_timeout=0.5), SMTP_CONFIG=sink.smtp_config())
    raw = relay.raw()
    assert raw.read() == "421 4.4.2 Timeout, closing connection"


@pytest.mark.parametrize("command", ["MAIL FROM:<app@example.com>", "RCPT TO:<a@b.test>", "DATA"])
def test_sending_without_auth_is_530(relay, command):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd(command) == "530 5.7.0 Authentication required"


def test_bad_sequence_is_503(relay):
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd("RCPT TO:<a@dest.test>") == "503 5.5.1 Bad sequence of commands: MAIL first"
    assert raw.cmd("DATA") == "503 5.5.1 Bad sequence of commands: MAIL first"
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("DATA") == "503 5.5.1 Bad sequence of commands: RCPT first"
    assert (
        raw.cmd(f"MAIL FROM:<{SENDER}>") == "503 5.5.1 Bad sequence of commands: MAIL already given"
    )


def test_unknown_command_is_500_and_bad_syntax_501(relay):
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd("FROB") == "500 5.5.2 Command not recognized"
    assert raw.cmd("MAIL app@example.com") == "501 5.5.4 Syntax error in parameters or arguments"
    assert raw.cmd("MAIL FROM:<app@example.com> FOO=1") == "555 5.5.4 Parameter not recognized"
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"
    assert raw.cmd("RSET") == "250 2.0.0 Ok"
    assert raw.cmd("QUIT") == "221 2.0.0 Service closing transmission channel"


def test_sender_domain_not_onboarded_is_550_naming_the_domain(relay):
    relay.token("other", "other.test")
    raw = relay.raw()
    raw.login(relay.token())
    reply = raw.cmd("MAIL FROM:<boss@other.test>")
    assert reply.startswith("550 5.7.1 Sender denied: domain other.test is not onboarded")
    reply = raw.cmd("MAIL FROM:<app@sub.example.com>")
    assert reply.startswith("550 5.7.1 Sender denied: domain sub.example.com is not onboarded")


def test_header_from_must_be_onboarded_too(relay, sink):
    relay.token("other", "other.test")
    with relay.login() as client:
        with pytest.raises(Exception) as refused:
            client.sendmail(SENDER, ["a@dest.test"], message(sender="ceo@other.test"))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.decode().startswith(
        "5.7.1 Sender denied: header address ceo@other.test"
    )
    assert sink.messages == []


def test_header_from_on_another_domain_of_the_same_account_is_allowed(relay, sink):
    token = relay.token()  # creates the account acme, with example.com
    relay.store.add_domain("acme", "acme-mail.test")
    assert {d["domain"] for d in relay.store.list_domains()} == {DOMAIN, "acme-mail.test"}
    with relay.login(token) as client:
        client.sendmail(SENDER, ["a@dest.test"], message(sender="news@acme-mail.test"))
    [received] = sink.messages
    assert b"From: news@acme-mail.test\r\n" in received.content


def test_message_without_from_header_is_refused(relay, sink):
    with relay.login() as client:
        with pytest.raises(Exception) as refused:
            client.sendmail(SENDER, ["a@dest.test"], b"Subject: no from\r\n\r\nbody\r\n")
    assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (554, b"5.6.0")
    assert sink.messages == []


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ('MAIL FROM:<"a\rDATA"@example.com>', "553 5.1.7 Bad sender address syntax"),
        ("MAIL FROM:<a\x01b@example.com>", "553 5.1.7 Bad sender address syntax"),
    ],
)
def test_control_characters_in_sender_are_refused(relay, command, reply):
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(command) == reply


def test_control_characters_in_recipient_are_refused(relay):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    assert raw.cmd('RCPT TO:<"b\rDATA"@dest.test>') == "553 5.1.3 Bad recipient address syntax"
    assert raw.cmd("RCPT TO:<b\x7f@dest.test>") == "553 5.1.3 Bad recipient address syntax"
    assert raw.cmd("RCPT TO:<ok@dest.test>") == "250 2.1.5 Ok"


def test_fifty_recipients_then_452_and_the_session_goes_on(relay, sink):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    for i in range(50):
        assert raw.cmd(f"RCPT TO:<r{i}@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("RCPT TO:<r50@dest.test>") == (
        "452 4.5.3 Too many recipients: at most 50 per message; send the rest in a new message"
    )
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message().replace(b"\r\n.", b"\r\n..") + b".")
    assert raw.read().startswith("250 2.0.0 Ok <")
    assert len(sink.messages[0].rcpt_tos) == 50
    # A new transaction takes the rest.
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    assert raw.cmd("RCPT TO:<r50@dest.test>") == "250 2.1.5 Ok"


def test_declared_size_over_limit_is_552(relay):
    raw = relay.raw()
    raw.login(relay.token())
    too_big = Limits().max_message_size + 1
    assert raw.cmd(f"MAIL FROM:<{SENDER}> SIZE={too_big}") == "552 5.3.4 Message too big"
    assert raw.cmd(f"MAIL FROM:<{SENDER}> SIZE={too_big - 1}") == "250 2.1.0 Ok"


def test_data_over_limit_is_552_and_nothing_is_forwarded(relay, sink):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    assert raw.cmd("DATA") == "354 Start mail input; end with <CR><LF>.<CR><LF>"
    line = b"x" * 998 + b"\r\n"
    raw.sock.sendall(message() + line * (Limits().max_message_size // len(line) + 1) + b".\r\n")
    assert raw.read() == "552 5.3.4 Message too big"
    assert sink.messages == []
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"


def test_delivered_reply_carries_the_clients_message_id(relay, sink):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    raw.cmd("DATA")
    raw.send(message(extra="Message-ID: <abc.123@example.com>\r\n") + b".")
    assert raw.read() == "250 2.0.0 Ok <abc.123@example.com>"
    forwarded = sink.messages[0].content
    assert b"Message-ID: <abc.123@example.com>\r\n" in forwarded
    assert forwarded.count(b"Message-ID:") == 1
    assert b"\r\nDate: " in forwarded or forwarded.startswith(b"Date: ")


def test_relay_adds_message_id_and_date_when_missing(relay, sink):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    raw.cmd("DATA")
    raw.send(message() + b".")
    reply = raw.read()
    assert reply.startswith("250 2.0.0 Ok <") and reply.endswith("@relay.test>")
    message_id = reply.split(" ", 3)[3]
    forwarded = sink.messages[0].content
    assert f"Message-ID: {message_id}\r\n".encode() in forwarded
    assert b"Date: " in forwarded


def test_bare_lf_never_ends_data_and_forwarded_lines_end_in_crlf(relay, sink):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    raw.cmd("DATA")
    # The smuggling attempt: a bare-LF "end of data" followed by a second transaction.
    smuggle = b"line one\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@dest.test>\nDATA\n"
    raw.sock.sendall(message(body="start") + smuggle + b"tail\r\n.\r\n")
    assert raw.read().startswith("250 2.0.0 Ok <")
    assert len(sink.messages) == 1
    content = sink.messages[0].content
    assert sink.messages[0].rcpt_tos == ["a@dest.test"]
    assert b"MAIL FROM:<evil@example.com>\r\n" in content
    assert content.count(b"\n") == content.count(b"\r\n")
    assert content.count(b"\r") == content.count(b"\r\n")


def test_upstream_permanent_refusal_comes_back_clean(relay, sink):
    sink.recorder.rcpt_replies["gone@dest.test"] = "550-5.1.1 No such user\r\n550 5.1.1 here"
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<gone@dest.test>")
    raw.cmd("DATA")
    raw.send(message() + b".")
    reply = raw.read()
    assert reply == "550 5.1.1 smtp: No such user here"
    assert "\n" not in reply


def test_upstream_transient_refusal_is_451(relay, sink):
    sink.recorder.data_reply = "451 4.3.0 try later"
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    raw.cmd("DATA")
    raw.send(message() + b".")
    assert raw.read().startswith("451 4.3.0 smtp: upstream deferred (451 4.3.0 try later)")


def test_upstream_down_is_451(relay_factory):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    smtp = f'{{"{DOMAIN}": {{"host": "127.0.0.1", "port": {port}, "secure": false}}}}'
    relay = relay_factory(SMTP_CONFIG=smtp, DEFAULT_SEND_BALANCE="5")
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    raw.cmd("DATA")
    raw.send(message() + b".")
    assert raw.read() == "451 4.3.0 smtp: upstream refused the connection"


def test_sender_domain_without_channel_is_451_at_mail(relay_factory):
    relay = relay_factory()
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == (
        "451 4.3.0 No upstream channel configured for sender domain example.com"
    )


def test_plaintext_and_bad_tls_clients_are_dropped_without_harm(relay, sink):
    bystander = relay.raw()
    assert bystander.login(relay.token()) == "235 2.7.0 Authentication successful"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as plain_sock:
        plain_sock.sendall(b"EHLO plaintext.test\r\n")
        answer = plain_sock.recv(100)  # nothing, or a TLS alert record: never SMTP
        assert not answer.startswith(b"220") and b"ESMTP" not in answer
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as junk:
        junk.sendall(b"\x16\x03\x01\x00\x05hello")
    lenient = ssl.create_default_context()
    lenient.check_hostname = False
    lenient.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        with lenient.wrap_socket(sock) as tls:
            tls.close()
    assert bystander.cmd("NOOP") == "250 2.0.0 Ok"
    with relay.login() as client:
        client.sendmail(SENDER, ["a@dest.test"], message())
    assert len(sink.messages) == 1


def test_plaintext_client_gets_no_greeting(relay):
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        sock.sendall(b"EHLO plaintext.test\r\n")
        start = time.monotonic()
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        assert b"220" not in data
        assert time.monotonic() - start < 5


def test_connection_cap_answers_421(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_MAX_CONNECTIONS="2")
    first, second = relay.raw(), relay.raw()
    third = Raw.__new__(Raw)
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    third.sock = relay.client_tls.wrap_socket(sock, server_hostname="localhost")
    third.file = third.sock.makefile("rb")
    assert third.read() == "421 4.7.0 Too many connections, try again later"
    assert third.closed()
    third.close()
    assert first.cmd("NOOP") == "250 2.0.0 Ok" and second.cmd("NOOP") == "250 2.0.0 Ok"


def test_lines_starting_with_a_dot_survive_forwarding(relay, sink):
    body = ".leading dot\r\n..two dots\r\nend"
    with relay.login() as client:
        client.sendmail(SENDER, ["a@dest.test"], message(body=body))
    assert sink.messages[0].content.endswith(b"\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n")


def test_data_upload_times_out_with_421(relay_factory, sink):
    relay = relay_factory(
        Limits(data_timeout=0.5), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="5"
    )
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(b"Subject: never finished")
    assert raw.read() == "421 4.4.2 Timeout, closing connection"
    assert raw.closed()
    assert sink.messages == []
    assert relay.store.list_senders() == []  # nothing charged: no row written


def test_no_secret_reaches_the_logs(relay, caplog):
    caplog.set_level(logging.DEBUG)
    token = relay.token()
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH PLAIN " + plain(token)).startswith("235 ")
    second = relay.raw()
    second.cmd("EHLO client.test")
    second.cmd("AUTH LOGIN " + b64("api_token"))
    assert second.cmd(b64(token)).startswith("235 ")
    third = relay.raw()
    third.login("rlt_wrong_" + token[10:])
    for secret in (token, plain(token), b64(token), token[10:]):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    "line",
    [
        b"HELP",
        b"HELP MAIL",
        b"VRFY someone@dest.test",
        b"VRFY",
        b"EXPN list",
        b"RSET now",
        b"QUIT now",
        b"",
        b"\xc3\xa9HLO x",
        b"NOOP " + b"x" * 600,
        b"MAIL FROM:<app@example.com> BODY=9BIT",
        b"MAIL FROM:<app@example.com> SMTPUTF8",
        b"RCPT TO:<a@dest.test> NOTIFY=NEVER",
        b"STARTTLS",
        b"AUTH",
        b"DATA now",
    ],
)
def test_every_reply_carries_an_enhanced_code(relay, line):
    raw = relay.raw()
    raw.login(relay.token())
    if line.startswith(b"RCPT") or line == b"DATA now":
        raw.cmd(f"MAIL FROM:<{SENDER}>")
        raw.cmd("RCPT TO:<first@dest.test>")
    reply = raw.cmd(line)
    for text in reply.split("\n"):
        assert re.fullmatch(r"[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}( .*)?", text), reply


def test_malformed_sender_address_gets_the_sender_code(relay):
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd("MAIL FROM:<@>") == "553 5.1.7 Bad sender address syntax"
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    assert raw.cmd("RCPT TO:<@>") == "553 5.1.3 Bad recipient address syntax"


def test_leaving_during_auth_leaves_no_timer_behind(relay_factory, sink, caplog):
    relay = relay_factory(Limits(command_timeout=0.3), SMTP_CONFIG=sink.smtp_config())
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("AUTH LOGIN") == "334 " + b64("Username:")
    [session] = relay.relay.sessions
    raw.close()

    async def handler_ended() -> bool:
        # aiosmtpd cancels the command loop on connection_lost; a timer started by
        # its cleanup would outlive the connection.
        return session.command_loop_done()

    deadline = time.monotonic() + 5
    while not relay.call(handler_ended()):
        assert time.monotonic() < deadline, "the session did not end"
        time.sleep(0.02)

    async def live_timer() -> bool:
        return session.timer_pending()

    assert not relay.call(live_timer())
    assert not relay.relay.sessions
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_token_revoked_mid_session_stops_that_session(relay):
    token = relay.token()
    token_id = relay.store.list_tokens("acme")[-1]["id"]
    raw = relay.raw()
    raw.login(token)
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    raw.cmd("RSET")
    relay.store.revoke_token(token_id)
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == (
        "530 5.7.0 Authentication required: the token was revoked or expired"
    )
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"
    assert raw.cmd("AUTH PLAIN " + plain(relay.token())) == "235 2.7.0 Authentication successful"
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"


def test_a_domain_removed_before_data_is_not_sent_from(relay, sink):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    relay.store.remove_domain("acme", DOMAIN)
    raw.cmd("DATA")
    raw.send(message() + b".")
    assert raw.read().startswith("550 5.7.1 Sender denied: domain example.com is not onboarded")
    assert sink.messages == []


def test_documented_limits_are_the_defaults():
    # cloudflare-email-service-smtp.txt: 50 recipients, 5 MiB, AUTH 30 s, DATA 300 s.
    limits = Limits()
    assert limits.max_recipients == 50
    assert limits.max_message_size == 5 * 1024 * 1024
    assert limits.auth_timeout == 30.0
    assert limits.data_timeout == 300.0
    assert limits.command_timeout == 300.0


def test_starttls_on_the_implicit_tls_port_says_tls_is_active(relay):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd("STARTTLS") == "554 5.5.1 TLS already active"
    assert raw.cmd("EXPN staff") == "502 5.5.1 Command not implemented"
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"  # the session goes on


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("EHLO", "501 5.5.4 Syntax: EHLO hostname"),
        ("HELO", "501 5.5.4 Syntax: HELO hostname"),
        ("AUTH PLAIN a b c", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        ("AUTH PLAIN " + b64("no-separators"), "501 5.5.2 Cannot split AUTH PLAIN response"),
    ],
)
def test_malformed_greetings_and_auth_get_their_exact_replies(relay, command, reply):
    raw = relay.raw()
    if not command.startswith(("EHLO", "HELO")):
        raw.cmd("EHLO client.test")
    assert raw.cmd(command) == reply
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"


def test_data_with_an_argument_is_a_syntax_error(relay):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    assert raw.cmd("DATA now") == "501 5.5.4 Syntax: DATA"
    assert raw.cmd("RSET") == "250 2.0.0 Ok"
