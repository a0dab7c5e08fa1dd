"""The `relay` command, settings and set-up: what users and scripts rely on."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest
from support import MISSING_TOOL, SENDER, Lines, free_port, message

from relay.config import load_settings
from relay.errors import ConfigError
from relay.upstreams import Secret

ROOT = Path(__file__).resolve().parent.parent


def relay_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def db_env(tmp_path: Path) -> dict[str, str]:
    """An initialized database, as `relay db init` leaves it."""
    ok(relay_cli("db", "init", env={"RELAY_DATABASE": str(tmp_path / "relay.db")}))
    return {"RELAY_DATABASE": str(tmp_path / "relay.db")}


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_accounts_domains_and_tokens(db_env, tmp_path):
    assert (
        json.loads(ok(relay_cli("account", "create", "acme", "--json", env=db_env)))["name"]
        == "acme"
    )
    ok(relay_cli("account", "create", "other", env=db_env))
    ok(relay_cli("domain", "add", "acme", "Example.COM", env=db_env))
    listed = json.loads(ok(relay_cli("domain", "list", "acme", "--json", env=db_env)))
    assert [d["domain"] for d in listed] == ["example.com"]
    # One domain, one account: another account cannot take it over.
    taken = relay_cli("domain", "add", "other", "example.com", env=db_env)
    assert taken.returncode == 1
    assert taken.stderr.strip() == "relay: domain example.com is already onboarded on an account"

    created = json.loads(
        ok(
            relay_cli(
                "token", "create", "acme", "--name", "ci", "--role", "ops", "--json", env=db_env
            )
        )
    )
    assert set(created) >= {"id", "token"} and created["token"].startswith("rlt_")
    text = ok(relay_cli("token", "create", "acme", "--expires-in", "30", env=db_env))
    last_line = text.strip().splitlines()[-1]
    assert re.fullmatch(r"rlt_[A-Za-z0-9_-]{43}", last_line)

    tokens = json.loads(ok(relay_cli("token", "list", "--json", env=db_env)))
    assert {t["id"] for t in tokens} >= {created["id"]}
    listing = ok(relay_cli("token", "list", "acme", env=db_env)) + json.dumps(tokens)
    assert created["token"] not in listing and last_line not in listing
    assert all("token" not in t and "hash" not in t for t in tokens)

    ok(relay_cli("token", "revoke", created["id"], env=db_env))
    again = relay_cli("token", "revoke", created["id"], env=db_env)
    assert again.returncode == 1 and "no active token" in again.stderr
    statuses = {
        t["id"]: t["status"]
        for t in json.loads(ok(relay_cli("token", "list", "--json", env=db_env)))
    }
    assert statuses[created["id"]] == "revoked"

    ok(relay_cli("domain", "remove", "acme", "example.com", env=db_env))
    assert json.loads(ok(relay_cli("domain", "list", "--json", env=db_env))) == []

    # The secret appears nowhere in the database file (or its WAL), only its hash.
    for path in tmp_path.glob("relay.db*"):
        data = path.read_bytes()
        assert created["token"].encode() not in data
        assert last_line.encode() not in data


def test_verified_list_commands(db_env):
    ok(relay_cli("verified", "add", "Boss@Dest.test", env=db_env))
    assert [
        v["address"] for v in json.loads(ok(relay_cli("verified", "list", "--json", env=db_env)))
    ] == ["boss@dest.test"]
    bad = relay_cli("verified", "add", "not-an-address", env=db_env)
    assert bad.returncode == 1 and "not a usable email address" in bad.stderr
    ok(relay_cli("verified", "remove", "boss@dest.test", env=db_env))
    assert json.loads(ok(relay_cli("verified", "list", "--json", env=db_env))) == []


def test_certs_generate_writes_a_usable_key_pair(tmp_path):
    out = ok(
        relay_cli(
            "certs", "generate", "--hostname", "smtp.test", "--dir", str(tmp_path / "c"), env={}
        )
    )
    crt, key = tmp_path / "c" / "relay.crt", tmp_path / "c" / "relay.key"
    assert str(crt) in out
    assert key.stat().st_mode & 0o777 == 0o600
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"RELAY_TLS_CERT": "/nonexistent/relay.crt"},
            "relay: RELAY_TLS_CERT: /nonexistent/relay.crt does not exist",
        ),
        ({"SMTP_CONFIG": "{not json"}, "relay: SMTP_CONFIG: not valid JSON"),
        (
            {"SMTP_CONFIG": '{"a.test": {"port": 25}}'},
            "relay: SMTP_CONFIG['a.test'].host: required",
        ),
        ({"RELAY_LISTEN": "nonsense"}, "relay: RELAY_LISTEN: expected host:port"),
        ({"DEFAULT_SEND_BALANCE": "lots"}, "relay: DEFAULT_SEND_BALANCE: expected a whole number"),
        ({"CLOUDFLARE_ACCOUNT_ID": "x"}, "relay: CLOUDFLARE_API_TOKEN: Cloudflare needs both"),
    ],
)
def test_bad_settings_stop_the_start_with_one_line(db_env, env, line):
    result = relay_cli("serve", env={**db_env, **env})
    assert result.returncode == 2
    assert result.stderr.startswith(line)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_clear_line(db_env, cert_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            **db_env,
            "RELAY_LISTEN": f"127.0.0.1:{port}",
            "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
            "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
        }
        result = relay_cli("serve", env=env)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"relay: RELAY_LISTEN: cannot listen on 127.0.0.1:{port}: already in use"
    )


def test_settings_from_toml_with_the_environment_winning(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text(
        'RELAY_LISTEN = "127.0.0.1:2525"\nRELAY_HOSTNAME = "from-file.test"\n'
        'RESEND_TOKEN = "re_file"\nRESEND_TOKEN_EXAMPLE_COM = "re_domain"\n'
        '[SMTP_CONFIG."Example.org"]\nhost = "smtp.example.net"\nport = 465\nsecure = true\n'
        'credentials = { username = "u", password = "p" }\n'
    )
    settings = load_settings({"RELAY_CONFIG": str(config), "RELAY_HOSTNAME": "from-env.test"})
    assert settings.listen == ("127.0.0.1", 2525)
    assert settings.hostname == "from-env.test"
    assert settings.resend.token_for("example.com") == "re_domain"
    assert settings.resend.token_for("other.test") == "re_file"
    upstream = settings.smtp_config["example.org"]
    assert (upstream.host, upstream.port, upstream.secure, upstream.verify_tls) == (
        "smtp.example.net",
        465,
        True,
        True,
    )
    # Secrets never print themselves, so logging the settings leaks nothing.
    assert "re_file" not in repr(settings) and "'p'" not in repr(settings)
    assert isinstance(upstream.password, Secret)


def test_bad_toml_names_the_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("RELAY_LISTEN = \n")
    with pytest.raises(ConfigError, match=r"^RELAY_CONFIG: .*bad.toml is not valid TOML"):
        load_settings({"RELAY_CONFIG": str(config)})


# --- outside clients --------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="missing tool: curl is not installed")
def test_curl_smtps_sends_through_the_relay(relay, sink, cert_dir, tmp_path):
    token = relay.token()
    mail = tmp_path / "mail.txt"
    mail.write_bytes(message(subject="From curl", extra="Message-ID: <curl.1@example.com>\r\n"))
    result = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--ssl-reqd",
            "--cacert", str(cert_dir / "relay.crt"),
            "--url", f"smtps://localhost:{relay.port}",
            "--user", f"api_token:{token}",
            "--mail-from", SENDER, "--mail-rcpt", "rcpt@dest.test",
            "--upload-file", str(mail), "-v",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "< 250 2.0.0 Ok <curl.1@example.com>" in result.stderr
    assert len(sink.messages) == 1
    assert b"Subject: From curl\r\n" in sink.messages[0].content


@pytest.mark.skipif(shutil.which("curl") is None, reason="missing tool: curl is not installed")
def test_curl_with_a_wrong_token_gets_535(relay, cert_dir, tmp_path):
    mail = tmp_path / "mail.txt"
    mail.write_bytes(message())
    result = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--ssl-reqd", "-v",
            "--cacert", str(cert_dir / "relay.crt"),
            "--url", f"smtps://localhost:{relay.port}",
            "--user", "api_token:rlt_wrong", "--mail-from", SENDER,
            "--mail-rcpt", "rcpt@dest.test", "--upload-file", str(mail),
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "< 535 5.7.8 Authentication failed" in result.stderr


@pytest.mark.skipif(shutil.which("swaks") is None, reason=MISSING_TOOL + "swaks")
def test_swaks_sends_through_the_relay(relay, sink):
    result = subprocess.run(
        [
            "swaks", "--server", "127.0.0.1", "--port", str(relay.port), "--tls-on-connect",
            "--auth", "LOGIN", "--auth-user", "api_token", "--auth-password", relay.token(),
            "--from", SENDER, "--to", "rcpt@dest.test", "--h-From", SENDER,
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  250 2.0.0 Ok <" in result.stdout
    assert len(sink.messages) == 1


def test_aiosmtplib_client(relay, sink, client_tls):
    token = relay.token()

    async def send() -> tuple[dict, str]:
        return await aiosmtplib.send(
            message(),
            sender=SENDER,
            recipients=["a@dest.test", "b@dest.test"],
            hostname="127.0.0.1",
            port=relay.port,
            use_tls=True,
            tls_context=client_tls,
            username="api_token",
            password=token,
        )

    refused, reply = asyncio.run(send())
    assert refused == {}
    assert reply.startswith("2.0.0 Ok <")
    assert sink.messages[0].rcpt_tos == ["a@dest.test", "b@dest.test"]


def test_smtplib_login_falls_back_cleanly(relay):
    with relay.connect() as client:
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login("api_token", "rlt_nope")
        assert failed.value.smtp_code == 535


# --- make run -----------------------------------------------------------------------


def test_dev_start_creates_a_demo_and_delivers_to_the_outbox(tmp_path):
    port = free_port()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "RELAY_LISTEN": f"127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "dev"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output = Lines(proc.stdout)
    try:
        listening = output.wait_for(lambda lines: any("relay listening on" in x for x in lines))
        assert listening, "".join(output.lines)
        tokens = re.findall(r"--user 'api_token:(rlt_[^']+)'", "".join(output.lines))
        assert tokens, "".join(output.lines)
        token = tokens[0]
        assert (tmp_path / "certs" / "relay.crt").exists()
        ctx = ssl.create_default_context(cafile=str(tmp_path / "certs" / "relay.crt"))
        with smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=10) as client:
            client.login("api_token", token)
            client.sendmail(
                "hello@demo.test", ["you@example.com"], message(sender="hello@demo.test")
            )
        outbox = list((tmp_path / "data" / "outbox").glob("*.eml"))
        assert len(outbox) == 1
        assert b"X-Relay-Envelope-To: <you@example.com>\r\n" in outbox[0].read_bytes()
    finally:
        proc.terminate()
        proc.wait(30)
        output.text()  # the reader has seen the end: the pipe can close
        proc.stdout.close()
    assert proc.returncode == 0, output.text()


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ("RELAY_DEV_OUTBOX = false\n", "RELAY_DEV_OUTBOX: expected a string, got bool"),
        ("DEFAULT_SEND_BALANCE = 2.9\n", "DEFAULT_SEND_BALANCE: expected a whole number"),
        ('RELAY_LOG_LEVEL = "VERBOSE"\n', "RELAY_LOG_LEVEL: expected one of DEBUG"),
        (
            '[SMTP_CONFIG."a.test"]\nhost = "h"\nport = 25\nsecure = "false"\n',
            "SMTP_CONFIG['a.test'].secure: expected true or false",
        ),
        (
            '[SMTP_CONFIG."a.test"]\nhost = "h"\nport = true\n',
            "SMTP_CONFIG['a.test'].port: expected a port number",
        ),
    ],
)
def test_toml_values_of_the_wrong_type_are_refused(tmp_path, toml, line):
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as refused:
        load_settings({"RELAY_CONFIG": str(config)})
    assert str(refused.value).startswith(line)


def test_empty_environment_values_do_not_override_the_file(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text('RESEND_TOKEN = "re_file"\nNO_LIMIT_SEND_ROLE = ["admin", "ops"]\n')
    settings = load_settings({"RELAY_CONFIG": str(config), "RESEND_TOKEN": ""})
    assert settings.resend.token == "re_file"
    assert settings.no_limit_roles == frozenset({"admin", "ops"})


def test_a_missing_upstream_ca_stops_the_start(db_env, cert_dir, tmp_path):
    smtp = json.dumps({"a.test": {"host": "h", "port": 465, "secure": True,
                                  "tls": {"ca": str(tmp_path / "missing.pem")}}})  # fmt: skip
    env = {
        **db_env,
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
        "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
        "SMTP_CONFIG": smtp,
    }
    result = relay_cli("serve", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("relay: SMTP_CONFIG['a.test'].tls.ca: cannot load")
    assert "Traceback" not in result.stderr
    workers = relay_cli("serve", "--workers", "0", env=env)
    assert workers.returncode == 2
    assert workers.stderr.strip() == "relay: --workers: must be at least 1, got 0"
