"""Settings that must stop the start with one clean line, and the
limits the start checks against the machine (the listen backlog, file descriptors)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support import Lines, free_port

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
            {"RELAY_HOSTNAME": "relay.test\r\n250 forged"},
            "relay: RELAY_HOSTNAME: expected a domain name such as smtp.example.com,"
            " got 'relay.test\\r\\n250 forged'",
        ),
        (
            {"RELAY_HOSTNAME": "smtp example.com"},
            "relay: RELAY_HOSTNAME: expected a domain name such as smtp.example.com,"
            " got 'smtp example.com'",
        ),
        (
            {"RELAY_HOSTNAME": "-smtp.example.com"},
            "relay: RELAY_HOSTNAME: expected a domain name such as smtp.example.com,"
            " got '-smtp.example.com'",
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


def test_a_hostname_is_one_rfc_5321_domain():
    assert load_settings({"RELAY_HOSTNAME": "smtp-1.Example.com"}).hostname == "smtp-1.Example.com"
    assert load_settings({"RELAY_HOSTNAME": "a" * 63 + ".test"}).hostname == "a" * 63 + ".test"
    for bad in ("a" * 64 + ".test", "smtp..example.com", "smtp.example.com.", "smtp_1.test"):
        with pytest.raises(ConfigError):
            load_settings({"RELAY_HOSTNAME": bad})


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


# --- upstream API URLs, and what a start warns of ----------------------------------------

NOT_HTTPS = "use https:// (http:// is accepted only to a loopback host)"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"RESEND_TOKEN": "re_secret", "RESEND_API_URL": "http://api.resend.com"},
            f"RESEND_API_URL: plain http:// would send the API key unencrypted to api.resend.com;"
            f" {NOT_HTTPS}",
        ),
        (  # a name that starts like a loopback address is not one
            {"RESEND_API_URL": "http://127.0.0.1.evil.test/"},
            f"RESEND_API_URL: plain http:// would send the API key unencrypted to"
            f" 127.0.0.1.evil.test; {NOT_HTTPS}",
        ),
        (
            {"RESEND_API_URL": "http://10.0.0.1:8080"},
            f"RESEND_API_URL: plain http:// would send the API key unencrypted to 10.0.0.1;"
            f" {NOT_HTTPS}",
        ),
        (
            {
                "CLOUDFLARE_ACCOUNT_ID": "acc",
                "CLOUDFLARE_API_TOKEN": "cf_secret",
                "CLOUDFLARE_API_URL": "file:///etc/passwd",
            },
            "CLOUDFLARE_API_URL: expected an https:// URL, got file scheme",
        ),
        (  # set but unused is still a bad setting
            {"CLOUDFLARE_API_URL": "file:///etc/passwd"},
            "CLOUDFLARE_API_URL: expected an https:// URL, got file scheme",
        ),
        (
            {"RESEND_API_URL": "ftp://api.resend.com"},
            "RESEND_API_URL: expected an https:// URL, got ftp scheme",
        ),
        (
            {"RESEND_API_URL": "api.resend.com"},
            "RESEND_API_URL: expected an https:// URL, got no scheme",
        ),
        ({"RESEND_API_URL": "https:///emails"}, "RESEND_API_URL: the URL names no host"),
        (
            {"RESEND_API_URL": "https://user:pa55word@api.resend.com"},
            "RESEND_API_URL: a URL with credentials in it is refused (the key has its own setting)",
        ),
        (
            {"CLOUDFLARE_API_URL": "https://api.cloudflare.com:99999/client/v4"},
            "CLOUDFLARE_API_URL: not a URL (expected https://host/path)",
        ),
        (
            {"RESEND_API_URL": "https://api.resend.com/?key=1"},
            "RESEND_API_URL: a base URL takes no ?query or #fragment",
        ),
        (
            {"RESEND_API_URL": "https://api.resend.com\r\nX: y"},
            "RESEND_API_URL: a URL holds no spaces or control characters",
        ),
    ],
)
def test_an_api_url_that_could_leak_the_key_stops_the_start(tmp_path, env, line):
    result = serve({"RELAY_DATABASE": str(tmp_path / "relay.db"), **env})
    assert result.returncode == 2
    assert one_line(result) == f"relay: {line}"
    assert "pa55word" not in result.stderr
    assert not (tmp_path / "relay.db").exists()


def test_https_and_loopback_api_urls_are_accepted():
    for url in ("https://api.resend.com/", "http://127.0.0.1:8025", "http://127.8.9.10",
                "http://[::1]:8025/v1", "http://localhost:8025"):  # fmt: skip
        settings = load_settings({"RESEND_API_URL": url, "CLOUDFLARE_API_URL": url})
        assert settings.resend.api_url == url.rstrip("/")


class Running:
    """`relay serve` in the background, its JSON log read as it comes."""

    def __init__(self, env: dict[str, str]) -> None:
        full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT),
                    "RELAY_LOG_FORMAT": "json", **env}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        self.log = Lines(self.proc.stderr)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.lines if line.startswith("{")]

    def listening(self, workers: int) -> None:
        def started(lines: list[str]) -> bool:
            return sum("relay listening on" in r["message"] for r in self.records()) == workers

        assert self.log.wait_for(started), "".join(self.log.lines)

    def warnings(self) -> list[str]:
        return [r["message"] for r in self.records() if r["level"] == "WARNING"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.text()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def running() -> Iterator[Callable[[dict[str, str]], Running]]:
    started: list[Running] = []

    def start(env: dict[str, str]) -> Running:
        started.append(Running(env))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def serving_env(tmp_path: Path, cert_dir: Path) -> dict[str, str]:
    return {
        "RELAY_DATABASE": str(tmp_path / "relay.db"),
        "RELAY_LISTEN": f"127.0.0.1:{free_port()}",
        "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
        "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
        "RELAY_HOSTNAME": "relay.test",
        "RELAY_WORKERS": "2",  # still one line: the parent warns before it forks
    }


def test_an_api_key_over_loopback_http_is_one_warning(tmp_path, cert_dir, running):
    relay = running(
        {
            **serving_env(tmp_path, cert_dir),
            "RESEND_TOKEN": "re_secret",
            "RESEND_API_URL": "http://127.0.0.1:9/",
        }
    )
    relay.listening(workers=2)
    assert relay.warnings() == [
        "RESEND_API_URL: plain http:// to 127.0.0.1: the API key crosses loopback unencrypted"
        " (for a test double or a local proxy only)"
    ]
    assert "re_secret" not in "".join(relay.log.lines)


def test_no_channel_is_one_warning_and_not_ready(tmp_path, cert_dir, running):
    admin = free_port()
    relay = running({**serving_env(tmp_path, cert_dir), "RELAY_ADMIN_LISTEN": f"127.0.0.1:{admin}"})
    relay.listening(workers=2)
    reason = (
        "no channel configured: set SMTP_CONFIG, RESEND_TOKEN, CLOUDFLARE_ACCOUNT_ID with"
        " CLOUDFLARE_API_TOKEN, or RELAY_DEV_OUTBOX; until then every MAIL FROM gets 451 4.3.0"
    )
    assert relay.warnings() == [reason]
    ready = httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=10)
    empty = {"mode": "off", "queued": 0, "held": 0, "oldest_seconds": 0}
    assert (ready.status_code, ready.json()) == (
        503,
        {"ready": False, "reason": reason, "queue": empty},
    )
    assert httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=10).status_code == 200


def test_a_configured_channel_warns_of_nothing_and_is_ready(tmp_path, cert_dir, running):
    admin = free_port()
    relay = running(
        {
            **serving_env(tmp_path, cert_dir),
            "RELAY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "RELAY_DEV_OUTBOX": str(tmp_path / "outbox"),
        }
    )
    relay.listening(workers=2)
    assert relay.warnings() == []
    ready = httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=10)
    empty = {"mode": "off", "queued": 0, "held": 0, "oldest_seconds": 0}
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "queue": empty})


def test_worker_mailer_entries_start_unchanged() -> None:
    # Every key of worker-mailer's WorkerMailerOptions (zou-yu/worker-mailer
    # src/mailer.ts), so an entry pasted from a worker-mailer setup starts as it is.
    from relay.config import start_warnings

    entry = {
        "host": "smtp.example.net",
        "port": 465,
        "secure": True,
        "startTls": True,
        "credentials": {"username": "u", "password": "p"},
        "logLevel": "DEBUG",
        "dsn": {"RET": {"HEADERS": True}, "NOTIFY": {"FAILURE": True}},
        "socketTimeoutMs": 60000,
        "responseTimeoutMs": 30000,
        "startTLS": False,  # a typo: not worker-mailer's key, named at start
    }
    settings = load_settings({"SMTP_CONFIG": json.dumps({"a.test": entry})})
    upstream = settings.smtp_config["a.test"]
    assert upstream.auth_types == ()  # worker-mailer's default: none named
    assert upstream.unknown_keys == ("startTLS",)
    assert "SMTP_CONFIG['a.test']: unknown key(s) ignored: startTLS" in start_warnings(settings)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"RELAY_WEBHOOK_ALLOW_PRIVATE": "yes"},
            "RELAY_WEBHOOK_ALLOW_PRIVATE: expected true or false",
        ),
        ({"RELAY_WEBHOOK_BACKOFF": "0"}, "RELAY_WEBHOOK_BACKOFF"),
        ({"RESEND_WEBHOOK_SECRET": "s3cret-not-whsec"}, "RESEND_WEBHOOK_SECRET: expected"),
    ],
)
def test_bad_webhook_settings_stop_the_start(env: dict[str, str], line: str) -> None:
    with pytest.raises(ConfigError, match=line) as caught:
        load_settings(env)
    assert "s3cret" not in str(caught.value)
    assert "\n" not in str(caught.value)
