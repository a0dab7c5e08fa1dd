"""Where uploads wait for their end, and what happens when they cannot be kept.

Against the real relay over TLS: a spool budget (`RELAY_SPOOL_MAX_BYTES`) that
concurrent uploads spend, a spool directory that is gone under the running
relay (a real ENOSPC-like OSError from the kernel), a file-size limit (EFBIG)
on a `relay serve` subprocess, and a DATA over 5 MiB. Each upload that cannot
be kept must be read to its final dot and dropped (none of its lines may run as
a command), get exactly one reply, leave one delivery-log record, and cost
nothing.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import SENDER, Lines, Raw, free_port, message, plain
from test_observe import scrape, value

from relay.config import load_settings
from relay.errors import ConfigError
from relay.smtp import protocol, spool
from relay.smtp.spool import Spool
from relay.store.deliveries import Outcome, Query

MIB = 1024 * 1024
BUDGET = MIB  # the smallest RELAY_SPOOL_MAX_BYTES
FULL = "452 4.3.1 Insufficient system storage"
INJECTED = "injected@evil.test"
# What an attacker puts in a body in the hope that it runs as commands once
# the relay stops reading the upload: a transaction of its own, and NOOPs.
SMUGGLED = (
    b"RSET\r\n"
    b"MAIL FROM:<" + SENDER.encode() + b">\r\n"
    b"RCPT TO:<" + INJECTED.encode() + b">\r\n"
    b"DATA\r\n"
    b"From: " + SENDER.encode() + b"\r\nSubject: injected\r\n\r\ninjected\r\n"
) + b"NOOP\r\n" * 200
LINE = b"z" * 76 + b"\r\n"


def wait_until(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def filler(size: int) -> bytes:
    return LINE * (size // len(LINE))


def begin(relay, token: str, rcpt: str = "a@dest.test", size: int | None = None):
    raw = relay.raw()
    assert raw.login(token).startswith("235 ")
    declared = f" SIZE={size}" if size is not None else ""
    assert raw.cmd(f"MAIL FROM:<{SENDER}>{declared}") == "250 2.1.0 Ok"
    assert raw.cmd(f"RCPT TO:<{rcpt}>") == "250 2.1.5 Ok"
    return raw


def smuggling_upload(raw, size: int) -> str:
    """DATA of `size` bytes of filler, then the smuggled commands, then the final dot."""
    assert raw.cmd("DATA").startswith("354 ")
    raw.sock.sendall(message(to="a@dest.test") + filler(size) + SMUGGLED + b".\r\n")
    return raw.read()


def balance(relay) -> int | None:
    rows = [s for s in relay.store.list_senders() if s["address"] == SENDER]
    return rows[0]["balance"] if rows else None


def assert_session_goes_on(relay, sink, raw) -> None:
    """The session is in step: NOOP is answered, the next transaction delivers."""
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<b@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message(to="b@dest.test") + b".")
    assert raw.read().startswith("250 2.0.0 Ok <")
    assert [m.rcpt_tos for m in sink.messages] == [["b@dest.test"]]
    assert balance(relay) == 9  # that one message, and nothing for the refused one


def the_refused_record(relay, reply: str):
    [record] = relay.store.find_deliveries(Query(outcome=Outcome.DEFERRED))
    assert str(record.reply) == reply
    assert [r.address for r in record.recipients] == ["a@dest.test"]
    assert record.charged == 0 and record.channel == ""
    return record


def test_a_spent_budget_drains_the_rest_and_runs_none_of_the_body(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_SPOOL_MAX_BYTES=str(BUDGET),
    )
    token = relay.token()
    # One session holds most of the budget with an upload it does not end.
    holder = begin(relay, token, "holder@dest.test")
    assert holder.cmd("DATA").startswith("354 ")
    holder.sock.sendall(message() + filler(900 * 1024))
    wait_until(lambda: relay.relay.spool.used >= 900 * 1024)

    raw = begin(relay, token)
    assert smuggling_upload(raw, 300 * 1024) == FULL
    the_refused_record(relay, FULL)
    assert sink.messages == [] and balance(relay) is None
    holder.close()  # its upload ends, and gives its bytes back
    wait_until(lambda: relay.relay.spool.used == 0)
    assert_session_goes_on(relay, sink, raw)
    assert all(INJECTED not in m.rcpt_tos for m in sink.messages)


def test_a_spool_directory_gone_under_the_relay_is_a_452_not_a_smuggle(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10")
    directory = relay.relay.spool.directory
    assert directory == Path(relay.relay.settings.database).parent / "spool"  # the default
    raw = begin(relay, relay.token())
    shutil.rmtree(directory)  # the kernel refuses the spool file: ENOENT
    assert smuggling_upload(raw, 200 * 1024) == FULL
    the_refused_record(relay, FULL)
    assert sink.messages == [] and balance(relay) is None
    assert relay.relay.spool.used == 0
    directory.mkdir(mode=0o700)
    assert_session_goes_on(relay, sink, raw)


def test_a_declared_size_over_the_budget_is_refused_before_the_upload(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_SPOOL_MAX_BYTES=str(BUDGET),
    )
    raw = begin(relay, relay.token(), size=BUDGET + 1)
    assert raw.cmd("DATA") == FULL  # before 354: nothing is uploaded to be dropped
    # It never reached the end of DATA: no record; the session goes on.
    assert relay.store.find_deliveries(Query()) == []
    assert_session_goes_on(relay, sink, raw)


def test_an_upload_over_5_mib_is_recorded_counted_and_logged(relay_factory, sink, caplog):
    caplog.set_level(logging.INFO, "relay")
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
    )
    before = scrape(relay.relay.admin_port)
    raw = begin(relay, relay.token())
    reply = smuggling_upload(raw, 5 * MIB + 1024)
    assert reply == "552 5.3.4 Message too big"
    [record] = relay.store.find_deliveries(Query())
    assert record.outcome == Outcome.REFUSED and str(record.reply) == reply
    assert record.sender == SENDER and [r.address for r in record.recipients] == ["a@dest.test"]
    assert record.size > 5 * MIB and record.charged == 0
    after = scrape(relay.relay.admin_port)
    labels = {"channel": "none", "outcome": "refused"}
    assert value(after, "relay_messages_total", **labels) == (
        value(before, "relay_messages_total", **labels) + 1
    )
    [line] = [r.getMessage() for r in caplog.records if "not kept" in r.getMessage()]
    assert record.message_id in line and "reply='552 5.3.4'" in line
    assert_session_goes_on(relay, sink, raw)


def test_a_write_the_disk_refuses_midway_is_a_452(tmp_path, cert_dir, client_tls, sink):
    """EFBIG for real: `relay serve` under a file-size limit (RLIMIT_FSIZE) the spool passes."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "RELAY_HOSTNAME": "relay.test",
        "RELAY_LISTEN": f"127.0.0.1:{free_port()}",
        "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
        "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
        "RELAY_DATABASE": str(tmp_path / "relay.db"),
        "SMTP_CONFIG": sink.smtp_config(),
        "DEFAULT_SEND_BALANCE": "10",
    }
    relay = [sys.executable, "-m", "relay"]
    subprocess.run([*relay, "db", "init"], env=env, check=True, capture_output=True)
    subprocess.run([*relay, "account", "create", "acme"], env=env, check=True, capture_output=True)
    subprocess.run(
        [*relay, "domain", "add", "acme", "example.com"], env=env, check=True, capture_output=True
    )
    token = subprocess.run(
        [*relay, "token", "create", "acme"], env=env, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    # Far above what the database and its log write here, below one upload.
    limit = 2 * MIB

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    server = subprocess.Popen(
        [*relay, "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=small_files,
    )
    lines = Lines(server.stdout)
    try:
        assert lines.wait_for(lambda ls: any("relay listening" in line for line in ls))
        port = int(env["RELAY_LISTEN"].rsplit(":", 1)[1])
        raw = Raw(port, client_tls)
        assert raw.cmd("EHLO client.test").startswith("250")
        assert raw.cmd("AUTH PLAIN " + plain(token)).startswith("235 ")
        assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
        assert smuggling_upload(raw, 3 * MIB) == FULL
        assert raw.cmd("NOOP") == "250 2.0.0 Ok"
        assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert raw.cmd("RCPT TO:<b@dest.test>") == "250 2.1.5 Ok"
        assert raw.cmd("DATA").startswith("354 ")
        raw.send(message(to="b@dest.test") + b".")
        assert raw.read().startswith("250 2.0.0 Ok <")
        raw.cmd("QUIT")
        raw.close()
    finally:
        server.terminate()
        server.wait(30)
    output = lines.text()
    assert server.stdout is not None
    server.stdout.close()
    assert "File too large" in output and "uploads refused with 452 4.3.1" in output
    assert [m.rcpt_tos for m in sink.messages] == [["b@dest.test"]]


# --- the settings and the directory -----------------------------------------------------


def base(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"RELAY_DATABASE": str(tmp_path / "db" / "relay.db"), **extra}


def test_the_spool_defaults_beside_the_database_private_and_bounded(tmp_path):
    settings = load_settings(base(tmp_path))
    assert settings.spool_dir == tmp_path / "db" / "spool"
    assert settings.spool_max_bytes is None
    # A file a crashed relay left under the fallback's name, and someone else's.
    settings.spool_dir.mkdir(parents=True)
    (settings.spool_dir / "relay-spool-abc").write_bytes(b"x")
    (settings.spool_dir / "keep.txt").write_bytes(b"x")
    opened = Spool(settings)
    opened.open()
    assert sorted(p.name for p in settings.spool_dir.iterdir()) == ["keep.txt"]
    free = os.statvfs(settings.spool_dir)
    assert opened.budget == spool.default_budget(free.f_bavail * free.f_frsize)
    assert MIB <= opened.budget <= spool.DEFAULT_BUDGET_CAP

    fresh = Spool(load_settings(base(tmp_path / "other")))
    fresh.open()
    assert fresh.directory.stat().st_mode & 0o777 == 0o700


def test_the_budget_is_shared_out_among_the_workers(tmp_path):
    settings = load_settings(base(tmp_path, RELAY_SPOOL_MAX_BYTES=str(8 * MIB), RELAY_WORKERS="2"))
    shared = Spool(settings)
    shared.open()
    assert shared.budget == 4 * MIB


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("1048575", "RELAY_SPOOL_MAX_BYTES: must be at least 1048576, got 1048575"),
        ("0", "RELAY_SPOOL_MAX_BYTES: must be at least 1048576, got 0"),
        ("10MB", "RELAY_SPOOL_MAX_BYTES: expected a whole number, got '10MB'"),
    ],
)
def test_a_bad_budget_stops_the_start_in_one_line(tmp_path, value, error):
    with pytest.raises(ConfigError) as caught:
        load_settings(base(tmp_path, RELAY_SPOOL_MAX_BYTES=value))
    assert str(caught.value) == error


def test_a_spool_directory_that_cannot_be_made_stops_the_start_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    settings = load_settings(base(tmp_path, RELAY_SPOOL_DIR=str(blocker / "spool")))
    with pytest.raises(ConfigError) as caught:
        Spool(settings).open()
    assert str(caught.value) == f"RELAY_SPOOL_DIR: cannot use {blocker / 'spool'}: Not a directory"


def test_relay_serve_refuses_a_bad_spool_setting_in_one_line(tmp_path, cert_dir):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "RELAY_LISTEN": f"127.0.0.1:{free_port()}",
        "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
        "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
        "RELAY_DATABASE": str(tmp_path / "relay.db"),
        "RELAY_SPOOL_MAX_BYTES": "512k",
    }
    done = subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "relay: RELAY_SPOOL_MAX_BYTES: expected a whole number, got '512k'"
    ]


def test_from_data_on_the_connection_buffers_little(relay):
    """What bounds a stalled upload's memory: the kernel's and the TLS layer's buffers."""
    raw = begin(relay, relay.token())
    assert raw.cmd("DATA").startswith("354 ")
    [session] = relay.relay.sessions
    transport = session.transport
    rcvbuf = transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert rcvbuf == 2 * protocol.DATA_SOCKET_BUFFER == 64 * 1024  # socket(7): doubled
    assert transport.get_read_buffer_limits()[1] == protocol.DATA_TLS_QUEUE == 16 * 1024
    raw.send(message() + b".")
    assert raw.read().startswith("250 2.0.0 Ok <")


@pytest.mark.parametrize("nameless", [True, False], ids=["O_TMPFILE", "unlinked-at-once"])
def test_a_spooled_upload_has_no_name_and_gives_its_bytes_back(tmp_path, nameless):
    opened = Spool(load_settings(base(tmp_path, RELAY_SPOOL_MAX_BYTES=str(MIB))))
    opened.open()
    opened._tmpfile = nameless  # the fallback, for a filesystem without O_TMPFILE
    body = filler(spool.MEMORY_BYTES * 2)
    with opened.upload() as stored:
        stored.write(body[:1000])
        assert stored._fd is None  # small: in memory
        stored.write(body[1000:])
        assert stored._fd is not None and list(opened.directory.iterdir()) == []
        assert stored.content() == body and opened.used == len(body)
        with pytest.raises(spool.NotStored), opened.upload() as other:
            other.write(filler(MIB - len(body) + 100))
        assert opened.used == len(body)  # the refused one gave its bytes back
    assert opened.used == 0
