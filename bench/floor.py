"""The forwarding floor: a bare aiosmtplib client sending to the sink, in its own process.

`python -m bench.floor --port P --size S --sessions N --messages M` opens N
pooled aiosmtplib connections to the sink (EHLO done before the clock starts),
sends N x M messages of S bytes over them, one `sendmail` at a time per
connection, and prints one JSON line: {"messages", "failed", "seconds", "cpu_s"}.
`cpu_s` is this process's utime + stime over the sends (`time.process_time`,
the same counters as /proc/PID/stat).

What the relay does beyond receiving a message is, at the least, this: the
ceiling's CPU per message (the bare receive) plus this process's (the bare
forward) is the floor the relay's own CPU is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiosmtplib
import uvloop

from bench.client import RECIPIENT, Message

HOST = "127.0.0.1"
TIMEOUT = 60.0  # one command's reply


async def send_all(args: argparse.Namespace) -> dict[str, float | int]:
    message = Message.of_size(args.size, args.sender)
    clients = [
        aiosmtplib.SMTP(
            hostname=HOST,
            port=args.port,
            start_tls=False,
            local_hostname="floor.localhost",
            timeout=TIMEOUT,
        )
        for _ in range(args.sessions)
    ]
    for client in clients:
        await client.connect()
        await client.ehlo()
    sent = failed = 0

    async def session(client: aiosmtplib.SMTP, first: int) -> None:
        nonlocal sent, failed
        for number in range(first, first + args.messages):
            try:
                await client.sendmail(
                    args.sender, [RECIPIENT], message.header(number) + message.body
                )
                sent += 1
            except aiosmtplib.SMTPException:
                failed += 1

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(session(c, i * args.messages) for i, c in enumerate(clients)))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    for client in clients:
        client.close()
    return {"messages": sent, "failed": failed, "seconds": seconds, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True, help="per session")
    parser.add_argument("--sender", required=True)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(send_all(args))), flush=True)


if __name__ == "__main__":
    main()
