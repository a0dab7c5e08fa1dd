"""The README's production steps, run as written, send a message.

The fenced block after `<!-- test: production -->` runs in bash, in a fresh
directory, with `relay` on PATH as this Python's `python -m relay`. Only what a
user would change comes from the environment, which wins over the block's
settings file as documented: the listening port (465 needs root) and
`SMTP_CONFIG`, which points example.com at a local aiosmtpd sink instead of
smtp.example.net. Then smtplib sends one message through the relay with the
token the block printed, and the sink must have it.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
from email.message import EmailMessage
from pathlib import Path

import pytest
from support import free_port

from relay.config import load_settings
from relay.store.facade import Store

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- test: production -->"


def production_block() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(MARKER)
    assert lines[start + 1] == "```sh", "the marker must sit right above a ```sh block"
    end = lines.index("```", start + 2)
    return "\n".join(lines[start + 2 : end]) + "\n"


def test_the_block_is_found_and_ends_by_serving():
    block = production_block()
    assert block.rstrip().splitlines()[-1].startswith("relay serve")
    assert "relay sender topup" in block  # DEFAULT_SEND_BALANCE is 0: no balance, no send
    assert "SMTP_CONFIG" in block


class Output:
    """A pipe read on a thread: its lines, and an event when one matches."""

    def __init__(self, stream, pattern: str) -> None:
        self.lines: list[str] = []
        self.pattern = re.compile(pattern)
        self.seen = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            if self.pattern.search(line):
                self.seen.set()
        self.seen.set()  # the stream closed: whoever waits must look at the lines


@pytest.mark.slow
def test_the_production_steps_deliver_a_message(tmp_path, sink):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    relay = bin_dir / "relay"
    relay.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m relay "$@"\n')
    relay.chmod(0o755)
    home = tmp_path / "relay"
    home.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "RELAY_LISTEN": f"127.0.0.1:{port}",
        "SMTP_CONFIG": sink.smtp_config(),
    }
    # What the block must set itself, never inherited from this test's environment.
    for name in ("RELAY_CONFIG", "RELAY_DATABASE", "RELAY_TLS_CERT", "RELAY_TLS_KEY"):
        env.pop(name, None)
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", production_block()],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stdout = Output(process.stdout, r"^rlt_")
    stderr = Output(process.stderr, r"relay listening on ")
    try:
        assert stderr.seen.wait(60) and process.poll() is None, "\n".join(
            stdout.lines + stderr.lines
        )
        token = next(line for line in stdout.lines if line.startswith("rlt_"))

        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = (
            "welcome@example.com",
            "someone@example.net",
            "Hi",
        )
        msg.set_content("Thanks for signing up.")
        context = ssl.create_default_context(cafile=home / "certs" / "relay.crt")
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30) as client:
            client.login("api_token", token)
            client.send_message(msg)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        for output, stream in ((stdout, process.stdout), (stderr, process.stderr)):
            output.thread.join(10)
            stream.close()

    assert [(m.mail_from, m.rcpt_tos) for m in sink.messages] == [
        ("welcome@example.com", ["someone@example.net"])
    ]
    assert b"Thanks for signing up." in sink.messages[0].content
    # The file's own SMTP_CONFIG (which the environment overrode) loads as written.
    written = load_settings({"RELAY_CONFIG": str(home / "relay.toml")})
    assert list(written.smtp_config) == ["example.com"]
    assert written.smtp_config["example.com"].host == "smtp.example.net"
    # The settings file holds a password: the block's umask kept it private.
    assert (home / "relay.toml").stat().st_mode & 0o077 == 0
    store = Store(home / "data" / "relay.db")
    try:
        assert store.show_sender("welcome@example.com")["balance"] == 999
    finally:
        store.close()


def test_the_settings_file_example_in_the_docs_loads(tmp_path):
    text = (ROOT / "docs" / "configuration.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "relay.toml").write_text(example)
    settings = load_settings({"RELAY_CONFIG": str(tmp_path / "relay.toml")})
    assert settings.smtp_config["example.com"].host == "smtp.example.net"
    assert settings.resend.domain_tokens.keys() == {"MY-SITE_COM"}
    assert settings.default_send_balance == 100
