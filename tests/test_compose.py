"""The compose files say what the relay does, and work as written.

Each file is read as YAML: a `certs` one-shot writes the certificate as the
relay's user, every relay service waits for it and has a healthcheck on
`/readyz`, and every environment name is a setting `relay/config.py` knows. The
healthcheck's own command runs against a real relay with its admin listener on
a non-loopback address (HTTPS only, as in the container). `docker compose
config` (or docker-compose) validates the files where it is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import missing_tool

from relay.config import is_known_setting, load_settings

ROOT = Path(__file__).resolve().parent.parent
FILES = ["docker-compose.yml", "docker-compose.cluster.yml"]
# The relay's user in the image: the Dockerfile's `useradd --uid`.
RELAY_UID = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)  # type: ignore[union-attr]


def services(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())["services"]


def relays(name: str) -> dict[str, Any]:
    """The services that run `relay serve` (the image's default command)."""
    return {
        key: service
        for key, service in services(name).items()
        if service.get("image") == "smtps-relay:latest"
        and "command" not in service
        and "entrypoint" not in service
    }


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> the host side it is published on."""
    out = {}
    for mapping in service.get("ports", []):
        host, _, container = str(mapping).rpartition(":")
        out[int(container)] = host
    return out


@pytest.mark.parametrize("name", FILES)
def test_every_relay_service_is_found(name):
    assert relays(name)


@pytest.mark.parametrize("name", FILES)
def test_no_comment_calls_the_admin_listener_plain_http(name):
    assert "plain http" not in (ROOT / name).read_text().lower()


@pytest.mark.parametrize("name", FILES)
def test_a_certs_one_shot_writes_the_certificate_as_the_relays_user(name):
    certs = services(name)["certs"]
    assert str(certs["user"]) == RELAY_UID
    assert certs["restart"] == "no"
    command = " ".join(certs["command"])
    assert "relay certs generate --dir /certs" in command
    # An existing certificate (a real one, or last start's) is kept.
    assert command.startswith("test -s /certs/relay.crt ||")
    assert "--force" not in command
    volume = next(v for v in certs["volumes"] if v.endswith(":/certs"))
    for key, service in relays(name).items():
        assert f"{volume}:ro" in service["volumes"], key
        assert service["depends_on"]["certs"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", FILES)
def test_the_environment_names_only_settings_and_matches_the_ports(name):
    for key, service in relays(name).items():
        env = service["environment"]
        assert [n for n in env if not is_known_setting(n)] == [], key
        assert "RELAY_DEV_OUTBOX" not in env  # never in a production start
        listen = int(env["RELAY_LISTEN"].rpartition(":")[2])
        admin_host, _, admin = env["RELAY_ADMIN_LISTEN"].rpartition(":")
        ports = published(service)
        assert listen == 465 and 465 in ports, key
        # Off loopback inside the container (so HTTPS), published on the host's loopback.
        assert admin_host == "0.0.0.0" and ports[int(admin)].startswith("127.0.0.1"), key
        mounts = {v.split(":")[1] for v in service["volumes"]}
        for setting in ("RELAY_TLS_CERT", "RELAY_TLS_KEY"):
            assert str(Path(env[setting]).parent) in mounts, (key, setting)
        if not env["RELAY_DATABASE"].startswith("postgresql://"):
            assert str(Path(env["RELAY_DATABASE"]).parent) in mounts, key


@pytest.mark.parametrize("name", FILES)
def test_every_relay_has_a_healthcheck_on_readyz_over_https(name):
    for key, service in relays(name).items():
        env, check = service["environment"], service["healthcheck"]
        assert check["test"][:3] == ["CMD", "python", "-c"], key
        port = env["RELAY_ADMIN_LISTEN"].rpartition(":")[2]
        assert f"https://127.0.0.1:{port}/readyz" in check["test"][3], key


def healthcheck_exit(port: int) -> int:
    """The compose file's healthcheck command, pointed at `port`."""
    code = services("docker-compose.yml")["relay"]["healthcheck"]["test"][3]
    code = code.replace("127.0.0.1:9465", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_the_healthcheck_passes_on_a_ready_relay_and_fails_when_it_is_not(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_ADMIN_LISTEN="0.0.0.0:0")
    port = relay.relay.admin_port
    assert healthcheck_exit(port) == 0
    # The database file deleted under the running relay: /readyz answers 503.
    database = relay.relay.settings.database
    assert isinstance(database, Path)
    database.unlink()
    assert healthcheck_exit(port) != 0


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("name", FILES)
def test_docker_compose_config_accepts_the_file(name, tmp_path):
    command = compose_command()
    if command is None:
        missing_tool("docker compose (or docker-compose)")
    # The cluster file requires a PostgreSQL password; no engine is needed.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "POSTGRES_PASSWORD": "x"}
    result = subprocess.run(
        [*command, "-f", str(ROOT / name), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_settings_the_compose_file_sets_load():
    env = {
        k: v
        for k, v in relays("docker-compose.yml")["relay"]["environment"].items()
        if "${" not in str(v)
    }
    settings = load_settings(env)
    assert settings.listen == ("0.0.0.0", 465)
    assert settings.admin_listen == ("0.0.0.0", 9465)
