"""The two reference servers, each run in its own process: `python -m bench.servers KIND ...`.

- `sink`: the relay's upstream. Plain SMTP, accepts every message and discards it,
  counting messages, bytes and connections so the bench can check that every
  message the relay accepted was forwarded. Like aiosmtpd it does not advertise
  PIPELINING (RFC 2920), unless started with `--pipelining`.
- `ceiling`: what the relay is measured against. Implicit TLS with AUTH, the same
  certificate and event loop as the relay, accepts and discards: no store, no
  forwarding. Its messages per second bound what any relay on aiosmtpd can reach.

Both speak one line protocol with the bench on stdio: on start they print
`{"port": N}`; each `stats` line on stdin is answered with a JSON line of
counters; end of stdin stops the server, so a bench that dies takes them along.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
import warnings
from collections.abc import Callable
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

# The relay's documented SIZE; the ceiling enforces the same limit the relay does.
MAX_MESSAGE_SIZE = 5 * 1024 * 1024
# The sink takes anything the relay forwards; aiosmtpd's own default (32 MiB).
SINK_SIZE_LIMIT = 32 * 1024 * 1024
API_TOKEN_USER = b"api_token"


class Discard:
    """An aiosmtpd handler that counts each message and keeps nothing."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.connections = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        self.bytes += len(envelope.original_content or b"")
        # Dropped at once: a discarding server must not grow with the load.
        envelope.original_content = envelope.content = None
        return f"250 2.0.0 Ok <discarded-{self.messages}>"

    def stats(self) -> dict[str, int]:
        return {"messages": self.messages, "bytes": self.bytes, "connections": self.connections}


class PipeliningDiscard(Discard):
    """`Discard`, with PIPELINING in the EHLO reply (aiosmtpd reads commands in
    order, so it serves pipelined clients; it only does not say so)."""

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself when no hook is set
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


def token_authenticator(token: str) -> Callable[..., AuthResult]:
    expected = token.encode()

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == API_TOKEN_USER
            and data.password == expected
        )
        # handled=False: with the default True a failure sends no reply at all.
        return AuthResult(success=ok, handled=False)

    return authenticate


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    handler = PipeliningDiscard() if args.pipelining else Discard()
    tls: ssl.SSLContext | None = None
    kwargs: dict[str, Any] = {
        # A fixed name: without it aiosmtpd calls socket.getfqdn() per connection.
        "hostname": "bench.localhost",
        "ident": "bench",
        "decode_data": False,
        "enable_SMTPUTF8": False,
        "loop": loop,
    }
    if args.kind == "ceiling":
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(args.cert, args.key)
        kwargs |= {
            "data_size_limit": MAX_MESSAGE_SIZE,
            "authenticator": token_authenticator(args.token),
            "auth_required": True,
            # Implicit TLS leaves session.ssl None, so the default would hide AUTH.
            "auth_require_tls": False,
        }
    else:
        kwargs["data_size_limit"] = SINK_SIZE_LIMIT

    def factory() -> SMTP:
        handler.connections += 1
        return SMTP(handler, **kwargs)

    server = await loop.create_server(factory, "127.0.0.1", args.port, ssl=tls, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # One command per line until the bench closes stdin.
    while line := await reader.readline():
        if line.strip() == b"stats":
            print(json.dumps(handler.stats()), flush=True)
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=["sink", "ceiling"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--token", default="")
    parser.add_argument("--pipelining", action="store_true", help="sink: advertise PIPELINING")
    args = parser.parse_args()
    if args.kind == "ceiling" and not (args.cert and args.key and args.token):
        parser.error("ceiling needs --cert, --key and --token")
    # aiosmtpd logs each connection and a deprecation warning on every AUTH; under
    # load that would cost more than the SMTP exchange it reports.
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    # Every listener here is implicit TLS, which aiosmtpd cannot see (session.ssl is None).
    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
