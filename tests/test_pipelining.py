"""PIPELINING to the SMTP upstream (RFC 2920), and the aiosmtplib seam that does it.

The upstream is a real aiosmtpd server that advertises PIPELINING (or not) and
records each read of its socket, so the tests see what reached it in one TCP
read: MAIL FROM and every RCPT TO together, DATA after their replies. A scripted
upstream answers a whole group in one write, which aiosmtplib's own reader
would lose.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from conftest import LoopThread, Recorder
from support import DOMAIN, SENDER
from test_channels import DELIVERED, OTHER, RCPT, balance, mail, send

from relay.channels import aiosmtplib_compat
from relay.channels.aiosmtplib_compat import IncompatibleAiosmtplib, Replies, check, pipeline
from relay.channels.base import Outbound
from relay.channels.smtp_upstream import SmtpChannel
from relay.errors import TransientDelivery
from relay.upstreams import SmtpUpstream

GROUP = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nRCPT TO:<{OTHER}>\r\n".encode()


# --- a recording upstream ----------------------------------------------------------


class PipeliningRecorder(Recorder):
    """The shared recorder, with PIPELINING added to the EHLO when asked."""

    def __init__(self, pipelining: bool) -> None:
        super().__init__()
        self.pipelining = pipelining

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does when no hook is set
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class RecordingSMTP(SMTP):
    """aiosmtpd's server, keeping each read of the connection as it arrived."""

    def __init__(self, handler: Any, reads: list[bytes], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.reads = reads

    def data_received(self, data: bytes) -> None:
        self.reads.append(data)
        super().data_received(data)


@dataclass
class Upstream:
    recorder: PipeliningRecorder
    port: int
    mode: str
    ca_file: str
    reads: list[list[bytes]] = field(default_factory=list)  # per connection
    servers: list[RecordingSMTP] = field(default_factory=list)

    def smtp_config(self) -> str:
        secure = self.mode == "tls"
        tls = f', "tls": {{"ca": "{self.ca_file}"}}' if secure else ""
        return (
            f'{{"{DOMAIN}": {{"host": "127.0.0.1", "port": {self.port},'
            f' "secure": {str(secure).lower()}, "startTls": false{tls}}}}}'
        )

    def reads_of(self, connection: int = 0) -> list[bytes]:
        return self.reads[connection]


@pytest.fixture
def upstream_factory(cert_dir: Path) -> Iterator[Callable[..., Upstream]]:
    loops = LoopThread()
    started: list[asyncio.AbstractServer] = []
    upstreams: list[Upstream] = []

    def start(mode: str = "plain", pipelining: bool = True) -> Upstream:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert_dir / "relay.crt", cert_dir / "relay.key")
        recorder = PipeliningRecorder(pipelining)
        upstream = Upstream(recorder, 0, mode, str(cert_dir / "relay.crt"))

        def factory() -> SMTP:
            recorder.connections += 1
            reads: list[bytes] = []
            upstream.reads.append(reads)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                server = RecordingSMTP(recorder, reads, hostname="sink.test", loop=loops.loop)
            upstream.servers.append(server)
            return server

        async def serve() -> asyncio.AbstractServer:
            return await loops.loop.create_server(
                factory, "127.0.0.1", 0, ssl=tls if mode == "tls" else None
            )

        server = loops.call(serve())
        started.append(server)
        upstream.port = server.sockets[0].getsockname()[1]
        upstreams.append(upstream)
        return upstream

    yield start

    async def shut() -> None:
        for server in started:
            server.close()
        for upstream in upstreams:
            for protocol in upstream.servers:
                if protocol.transport is not None:
                    protocol.transport.abort()

    loops.call(shut())
    loops.close()


def commands(reads: list[bytes]) -> list[bytes]:
    """The reads before DATA's content, as they arrived (the greeting exchange left out)."""
    start = next(i for i, r in enumerate(reads) if r.startswith(b"MAIL"))
    return reads[start:]


# --- end to end: what reached the upstream, and the client's reply ---------------


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_mail_and_every_rcpt_reach_the_upstream_in_one_read(relay_factory, upstream_factory, mode):
    upstream = upstream_factory(mode)
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay, recipients=(RCPT, OTHER)) == DELIVERED

    group, data, *_ = commands(upstream.reads_of(0))
    assert group == GROUP
    assert data == b"DATA\r\n"
    [received] = upstream.recorder.messages
    assert received.rcpt_tos == [RCPT, OTHER]
    assert balance(relay) == 8  # one per recipient


def test_without_pipelining_each_command_waits_for_its_reply(relay_factory, upstream_factory):
    upstream = upstream_factory(pipelining=False)
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay, recipients=(RCPT, OTHER)) == DELIVERED

    mail_from, rcpt, other, data, *_ = commands(upstream.reads_of(0))
    assert [mail_from, rcpt, other, data] == [
        f"MAIL FROM:<{SENDER}>\r\n".encode(),
        f"RCPT TO:<{RCPT}>\r\n".encode(),
        f"RCPT TO:<{OTHER}>\r\n".encode(),
        b"DATA\r\n",
    ]


def test_eight_bit_content_is_declared_in_the_group(relay_factory, upstream_factory):
    upstream = upstream_factory()
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(), DEFAULT_SEND_BALANCE="10")

    eight_bit = mail("<utf8@example.com>", body="Grüße")
    assert send(relay, eight_bit) == "250 2.0.0 Ok <utf8@example.com>"

    group, *_ = commands(upstream.reads_of(0))
    assert group == f"MAIL FROM:<{SENDER}> BODY=8BITMIME\r\nRCPT TO:<{RCPT}>\r\n".encode()
    assert upstream.recorder.mail_options == [["BODY=8BITMIME"]]


def test_a_refused_recipient_is_refused_alone(relay_factory, upstream_factory):
    upstream = upstream_factory()
    upstream.recorder.rcpt_replies[OTHER] = "550 5.1.1 No such user"
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay, recipients=(RCPT, OTHER)) == DELIVERED

    [received] = upstream.recorder.messages
    assert received.rcpt_tos == [RCPT]
    assert balance(relay) == 9


@pytest.mark.parametrize(
    ("script", "reply"),
    [
        pytest.param(
            {"rcpt_replies": {OTHER: "452 4.2.2 mailbox full"}},
            "451 4.3.0 smtp: upstream deferred (452 4.2.2 mailbox full)",
            id="4xx-at-rcpt",
        ),
        pytest.param(
            {"mail_reply": "553 5.7.1 Sender not allowed"},
            "553 5.7.1 smtp: Sender not allowed",
            id="5xx-at-mail",
        ),
        pytest.param(
            {"data_reply": "554 5.7.1 Rejected as spam"},
            "554 5.7.1 smtp: Rejected as spam",
            id="5xx-at-data",
        ),
    ],
)
def test_a_failed_transaction_is_reset_and_the_connection_reused(
    relay_factory, upstream_factory, script, reply
):
    upstream = upstream_factory()
    for name, value in script.items():
        setattr(upstream.recorder, name, value)
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay, mail("<m1@example.com>"), (RCPT, OTHER)) == reply
    for name in script:
        setattr(upstream.recorder, name, {} if name == "rcpt_replies" else None)
    assert send(relay, mail("<m2@example.com>")) == "250 2.0.0 Ok <m2@example.com>"

    reads = commands(upstream.reads_of(0))
    assert reads[0] == GROUP
    assert b"RSET\r\n" in reads
    assert reads[reads.index(b"RSET\r\n") + 1] == (
        f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\n".encode()
    )
    assert upstream.recorder.connections == 1
    assert [m.rcpt_tos for m in upstream.recorder.messages] == [[RCPT]]
    assert balance(relay) == 9


def test_a_421_at_rcpt_defers_every_recipient_and_drops_the_connection(
    relay_factory, upstream_factory
):
    upstream = upstream_factory()
    upstream.recorder.rcpt_replies[RCPT] = "421 4.7.0 Too many connections, try again in 60 s"
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay, mail("<m1@example.com>"), (RCPT, OTHER)) == (
        "451 4.7.0 smtp: upstream deferred (421 4.7.0 Too many connections, try again in 60 s)"
    )
    upstream.recorder.rcpt_replies.clear()
    assert send(relay, mail("<m2@example.com>")) == "250 2.0.0 Ok <m2@example.com>"

    assert upstream.recorder.connections == 2
    assert b"DATA\r\n" not in upstream.reads_of(0)
    assert [m.rcpt_tos for m in upstream.recorder.messages] == [[RCPT]]
    assert balance(relay) == 9


@pytest.mark.parametrize("how", ["aborted-while-idle", "closed-at-mail", "421-at-mail"])
def test_a_pooled_connection_the_upstream_closed_is_replaced_once(
    relay_factory, upstream_factory, how
):
    upstream = upstream_factory()
    armed = threading.Event()
    original = upstream.recorder.handle_MAIL

    async def at_mail(server: Any, *args: Any) -> str:
        if armed.is_set():
            armed.clear()
            if how == "closed-at-mail":
                server.transport.abort()  # no reply at all: the peer just went away
            return "421 4.4.2 sink.test closing idle connection"
        return await original(server, *args)

    upstream.recorder.handle_MAIL = at_mail
    relay = relay_factory(SMTP_CONFIG=upstream.smtp_config(), DEFAULT_SEND_BALANCE="10")

    assert send(relay, mail("<m1@example.com>")) == "250 2.0.0 Ok <m1@example.com>"
    if how == "aborted-while-idle":
        [server] = upstream.servers
        done = threading.Event()

        def abort() -> None:
            assert server.transport is not None
            server.transport.abort()
            done.set()

        server.loop.call_soon_threadsafe(abort)
        assert done.wait(5)
    else:
        armed.set()
    assert send(relay, mail("<m2@example.com>")) == "250 2.0.0 Ok <m2@example.com>"

    ids = [
        m.content.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in upstream.recorder.messages
    ]
    assert ids == [b"<m1@example.com>", b"<m2@example.com>"]  # each once
    assert upstream.recorder.connections == 2
    assert (
        commands(upstream.reads_of(1))[0]
        == f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\n".encode()
    )
    assert balance(relay) == 8


# --- a scripted upstream: replies that arrive together, or not at all -------------


class Scripted(asyncio.Protocol):
    """Greets, answers EHLO with PIPELINING, then each read with the next script entry.

    A None entry closes the connection: at once, or right after the entry before it.
    """

    def __init__(self, script: list[bytes | None], reads: list[bytes]) -> None:
        self.script = script
        self.reads = reads
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 scripted\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.reads.append(data)
        if data.startswith(b"EHLO"):
            self.transport.write(b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            return
        answer = self.script.pop(0) if self.script else None
        if answer is not None:
            self.transport.write(answer)
        if answer is None or (self.script and self.script[0] is None):
            self.transport.close()  # the upstream goes away


async def scripted(script: list[bytes | None]) -> tuple[asyncio.AbstractServer, list[bytes]]:
    reads: list[bytes] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Scripted(script, reads), "127.0.0.1", 0)
    return server, reads


async def connected(server: asyncio.AbstractServer) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=server.sockets[0].getsockname()[1],
        start_tls=False,
        timeout=5,
        local_hostname="relay.test",
    )
    await client.connect()
    await client.ehlo()
    return client


def group_of(*recipients: str) -> list[bytes]:
    return [
        aiosmtplib_compat.mail_command(SENDER),
        *(aiosmtplib_compat.rcpt_command(r) for r in recipients),
    ]


def test_replies_that_arrive_in_one_segment_are_each_read():
    async def run() -> tuple[Replies, list[bytes], bool]:
        together = b"250 2.1.0 ok\r\n250-2.1.5 first\r\n250 2.1.5 line\r\n550 5.1.1 no\r\n"
        server, reads = await scripted([together, b"250 2.0.0 reset\r\n"])
        async with server:
            client = await connected(server)
            replies = await pipeline(client, group_of(RCPT, OTHER))
            # The client reads its next reply through aiosmtplib again.
            reset = await client.rset()
            client.close()
        return replies, reads, reset.message == "2.0.0 reset"

    replies, reads, reset_read = asyncio.run(run())
    assert replies == Replies(
        (
            aiosmtplib.SMTPResponse(250, "2.1.0 ok"),
            aiosmtplib.SMTPResponse(250, "2.1.5 first\n2.1.5 line"),
            aiosmtplib.SMTPResponse(550, "5.1.1 no"),
        )
    )
    assert reads[1] == GROUP
    assert reset_read


def test_a_connection_lost_after_mail_is_451_and_nothing_is_resent():
    async def run() -> tuple[str, list[bytes], int]:
        connections = 0
        reads: list[bytes] = []
        loop = asyncio.get_running_loop()

        def factory() -> Scripted:
            nonlocal connections
            connections += 1
            # MAIL answered, then the upstream goes away before the RCPT replies.
            return Scripted([b"250 2.1.0 ok\r\n", None], reads)

        server = await loop.create_server(factory, "127.0.0.1", 0)
        upstream = SmtpUpstream("127.0.0.1", server.sockets[0].getsockname()[1], start_tls=False)
        channel = SmtpChannel({DOMAIN: upstream}, timeout=5, local_hostname="relay.test")
        async with server:
            try:
                await channel.deliver(Outbound(SENDER, (RCPT,), mail(), "<m1@example.com>", "0"))
            except TransientDelivery as exc:
                reply = str(exc.reply)
            else:
                reply = "delivered"
            finally:
                await channel.aclose()
        return reply, reads, connections

    reply, reads, connections = asyncio.run(run())
    assert reply == "451 4.3.0 smtp: upstream closed the connection"
    assert connections == 1
    assert b"DATA\r\n" not in reads


def test_a_group_with_a_control_character_is_not_sent():
    async def run() -> list[bytes]:
        server, reads = await scripted([])
        async with server:
            client = await connected(server)
            with pytest.raises(ValueError, match="prohibited control character"):
                await pipeline(client, [b"RCPT TO:<a@b.test>\r\nDATA"])
            client.close()
        return reads

    assert asyncio.run(run()) == [b"EHLO relay.test\r\n"]


@pytest.mark.parametrize(
    "address",
    [
        SENDER,
        "first.last+tag@sub.example.com",
        "o'hara!#$%&*/=?^_`{|}~-@example.com",
        "",
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "Name <a@example.com>",
        "a@[127.0.0.1]",
        '"quoted local"@example.com',
        "a@b@c",
        "ünï@example.com",
        " a@example.com ",
    ],
)
def test_addresses_are_quoted_as_aiosmtplib_quotes_them(address):
    def quoted(fn: Callable[[], bytes]) -> bytes | type[Exception]:
        try:
            return fn()
        except (ValueError, UnicodeError) as exc:
            return type(exc)

    expected = quoted(lambda: aiosmtplib.email.quote_address(address).encode("ascii"))
    assert quoted(lambda: aiosmtplib_compat.quote(address)) == expected


# --- the import-time check ----------------------------------------------------------


def assigning(owner: str, setter: str, without: str) -> Callable[[Any], None]:
    """A `setter` that assigns what the real one does, except `without`."""
    names = [n for o, n, s in aiosmtplib_compat.ATTRIBUTES if (o, s) == (owner, setter)]
    body = "".join(f"    self.{n} = None\n" for n in names if n != without) or "    pass\n"
    namespace: dict[str, Any] = {}
    exec(f"def {setter}(self):\n{body}", namespace)
    return namespace[setter]


def fake_aiosmtplib(drop: str | None = None, unset: str | None = None) -> types.ModuleType:
    """A stand-in for the aiosmtplib package, lacking one name or no longer setting one."""

    def members(cls: type, owner: str) -> dict[str, Any]:
        names = [n for o, n in aiosmtplib_compat.METHODS if o == owner]
        names += [s for o, _, s in aiosmtplib_compat.ATTRIBUTES if o == owner]
        found = {n: getattr(cls, n) for n in names if f"{owner}.{n}" != drop}
        for o, name, setter in aiosmtplib_compat.ATTRIBUTES:
            if o == owner and name == unset:
                found[setter] = assigning(owner, setter, without=unset)
        return found

    module = types.ModuleType("aiosmtplib")
    module.SMTP = type("SMTP", (), members(aiosmtplib.SMTP, "SMTP"))
    protocol = types.SimpleNamespace(
        SMTPProtocol=type(
            "SMTPProtocol", (), members(aiosmtplib.protocol.SMTPProtocol, "SMTPProtocol")
        )
    )
    module.protocol = protocol
    if drop != "email.quote_address":
        module.email = types.SimpleNamespace(quote_address=aiosmtplib.email.quote_address)
    return module


def test_the_installed_aiosmtplib_passes():
    check(aiosmtplib, aiosmtplib.__version__)
    check(fake_aiosmtplib(), "5.1.2")


@pytest.mark.parametrize("version", ["5.1.1", "5.2.0", "6.0", "5.x"])
def test_an_untested_version_is_refused_in_one_line(version):
    with pytest.raises(IncompatibleAiosmtplib) as info:
        check(aiosmtplib, version)
    assert str(info.value) == (
        f"aiosmtplib {version} is installed; the relay is tested with 5.1.x from 5.1.2"
        " (pip install 'aiosmtplib>=5.1.2,<5.2')"
    )


@pytest.mark.parametrize(
    "name",
    [f"{o}.{n}" for o, n in aiosmtplib_compat.METHODS] + ["email.quote_address"],
)
def test_a_missing_name_is_named(name):
    with pytest.raises(IncompatibleAiosmtplib) as info:
        check(fake_aiosmtplib(drop=name), "5.1.3")
    assert str(info.value) == f"aiosmtplib 5.1.3: {name} is missing"


@pytest.mark.parametrize(("owner", "name", "setter"), aiosmtplib_compat.ATTRIBUTES)
def test_an_attribute_no_longer_set_is_named(owner, name, setter):
    with pytest.raises(IncompatibleAiosmtplib) as info:
        check(fake_aiosmtplib(unset=name), "5.1.3")
    assert str(info.value) == f"aiosmtplib 5.1.3: {owner}.{setter} no longer sets {name}"
