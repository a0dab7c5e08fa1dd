"""Settings that must stop the start with one clean line (issue #10, item 21), and the
limits the start checks against the machine (the listen backlog, file descriptors)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.config import load_settings, max_workers
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def serve(env: dict[str, str], *, new_session: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=new_session,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"RELAY_UPSTREAM_TIMEOUT": "1e-9"},
            "relay: RELAY_UPSTREAM_TIMEOUT: must be between 0.1 and 75 seconds, got 1e-9",
        ),
        (
            {"RELAY_UPSTREAM_TIMEOUT": "nan"},
            "relay: RELAY_UPSTREAM_TIMEOUT: must be between 0.1 and 75 seconds, got nan",
        ),
        (
            {"RELAY_SESSION_IDLE_MAX": "ten minutes"},
            "relay: RELAY_SESSION_IDLE_MAX: expected a number of seconds, got 'ten minutes'",
        ),
        (
            {"RELAY_SESSION_IDLE_MAX": "0.5"},
            "relay: RELAY_SESSION_IDLE_MAX: must be between 1 and 86400 seconds, got 0.5",
        ),
        (
            {"DEFAULT_SEND_BALANCE": str(2**63)},
            f"relay: DEFAULT_SEND_BALANCE: must be at most {2**63 - 1}, got {2**63}",
        ),
        (
            {"SMTP_CONFIG": '{"": {"host": "smtp.test"}}'},
            "relay: SMTP_CONFIG: a sender domain key is empty",
        ),
        (
            {"SMTP_CONFIG": '{" ": {"host": "smtp.test"}}'},
            "relay: SMTP_CONFIG: a sender domain key is empty",
        ),
        (
            {"SMTP_CONFIG": '{"a.test": {"host": "smtp.test", "authType": ["xoauth2"]}}'},
            "relay: SMTP_CONFIG['a.test'].authType: 'xoauth2' is not supported"
            " (use plain, login, cram-md5)",
        ),
        (
            {"RELAY_WORKERS": str(max_workers() + 1)},
            f"relay: RELAY_WORKERS: must be at most {max_workers()}, got {max_workers() + 1}",
        ),
        (
            {"RELAY_LISTEN_BACKLOG": "0"},
            "relay: RELAY_LISTEN_BACKLOG: must be at least 1, got 0",
        ),
    ],
)
def test_bad_values_stop_the_start_with_one_line(tmp_path, env, line):
    result = serve({"RELAY_DATABASE": str(tmp_path / "relay.db"), **env})
    assert result.returncode == 2
    assert one_line(result) == line
    assert not (tmp_path / "relay.db").exists()


def test_workers_option_is_bounded_too(tmp_path):
    full_env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "RELAY_DATABASE": str(tmp_path / "relay.db"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--workers", str(max_workers() + 1)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert one_line(result) == (
        f"relay: --workers: must be at most {max_workers()}, got {max_workers() + 1}"
    )


def test_the_session_idle_limit_is_600_seconds_and_settable_from_1():
    assert load_settings({}).session_idle_max == 600.0
    assert load_settings({"RELAY_SESSION_IDLE_MAX": "1"}).session_idle_max == 1.0


def test_the_smallest_upstream_timeout_is_accepted():
    assert load_settings({"RELAY_UPSTREAM_TIMEOUT": "0.1"}).upstream_timeout == 0.1
    with pytest.raises(ConfigError):
        load_settings({"RELAY_UPSTREAM_TIMEOUT": "0.09"})


def test_an_encrypted_key_is_one_line_and_no_passphrase_prompt(tmp_path, cert_dir):
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    result = serve(
        {
            "RELAY_DATABASE": str(tmp_path / "relay.db"),
            "RELAY_LISTEN": "127.0.0.1:0",
            "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
            "RELAY_TLS_KEY": str(encrypted),
        },
        new_session=True,  # no terminal a prompt could reach
    )
    assert result.returncode == 2
    assert one_line(result) == (
        f"relay: RELAY_TLS_KEY: {encrypted} is encrypted; the relay needs an unencrypted key"
        " (readable by its user only)"
    )


def test_listen_backlog_is_the_setting_not_asyncios_100(relay_factory):
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read a listening socket's backlog")
    relay = relay_factory(RELAY_LISTEN_BACKLOG="77")
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{relay.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    # State, Recv-Q, Send-Q (the backlog of a listening socket), local address, ...
    assert out[0] == "LISTEN" and out[2] == "77"


def test_more_connections_than_file_descriptors_stops_the_start(tmp_path):
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    full_env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "RELAY_DATABASE": str(tmp_path / "relay.db"),
        "RELAY_MAX_CONNECTIONS": "1000",
    }
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=low_limit,
    )
    assert result.returncode == 2
    assert one_line(result) == (
        "relay: RELAY_MAX_CONNECTIONS: 1000 sessions need 1256 file descriptors, the limit"
        " (ulimit -n) is 512: lower RELAY_MAX_CONNECTIONS or raise the limit"
    )
