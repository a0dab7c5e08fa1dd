"""Running the relay and its database: `serve`, `dev`, `certs generate`, `db init|status|copy`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from relay import certs, logs
from relay.cli.output import emit
from relay.config import Settings, load_settings, max_workers
from relay.errors import ConfigError, RelayError
from relay.store.facade import Store
from relay.store.schema import MIGRATIONS

DEMO_ACCOUNT = "demo"
DEMO_DOMAIN = "demo.test"
DEV_LISTEN = "127.0.0.1:2465"


def cmd_serve(args: argparse.Namespace) -> None:
    from relay import workers

    settings = load_settings()
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
        if args.workers > max_workers():
            raise ConfigError(f"--workers: must be at most {max_workers()}, got {args.workers}")
        settings = dataclasses.replace(settings, workers=args.workers)
    configure_logging(settings)
    workers.run(settings)


def cmd_dev(args: argparse.Namespace) -> None:
    """`make run`: a development relay that works with no external account."""
    from relay import workers

    env = dict(os.environ)
    env.setdefault("RELAY_LISTEN", DEV_LISTEN)
    env.setdefault("RELAY_HOSTNAME", "localhost")
    probe = load_settings(env)
    if not (probe.cloudflare or probe.resend.configured or probe.smtp_config):
        env.setdefault("RELAY_DEV_OUTBOX", "data/outbox")
    settings = load_settings(env)
    if not settings.tls_cert.exists() or not settings.tls_key.exists():
        certs.generate(settings.tls_cert.parent, "localhost", force=True)
        print(f"generated a self-signed certificate: {settings.tls_cert}")
    store = Store(settings.database)
    store.migrate()
    token = None
    if not store.list_accounts():
        store.create_account(DEMO_ACCOUNT)
        store.add_domain(DEMO_ACCOUNT, DEMO_DOMAIN)
        token = store.create_token(DEMO_ACCOUNT, name="make run demo")["token"]
    store.close()
    configure_logging(settings)
    host, port = settings.listen
    print(f"\nrelay (development) on smtps://{host}:{port}")
    if settings.dev_outbox:
        print(f"no upstream configured: messages are written to {settings.dev_outbox}/*.eml")
    if token:
        print(f"demo account {DEMO_ACCOUNT!r}, sender domain {DEMO_DOMAIN}, token (shown once):")
        print(f"  {token}\n\ntry it:")
        print(
            "  printf 'From: hello@demo.test\\r\\nTo: you@example.com\\r\\nSubject: Hi\\r\\n\\r\\n"
            "It works.\\r\\n' | \\\n"
            f"  curl --ssl-reqd --cacert {settings.tls_cert} --url smtps://localhost:{port} \\\n"
            f"    --user 'api_token:{token}' --mail-from hello@{DEMO_DOMAIN} \\\n"
            "    --mail-rcpt you@example.com --upload-file -\n"
        )
    else:
        print(
            "accounts exist already; make a new token with:"
            f"  .venv/bin/relay token create {DEMO_ACCOUNT}\n"
        )
    sys.stdout.flush()
    workers.run(settings)


def cmd_certs_generate(args: argparse.Namespace) -> None:
    crt, key = certs.generate(Path(args.dir), args.hostname, force=args.force)
    print(f"wrote {crt} and {key}")


def cmd_db_init(args: argparse.Namespace) -> None:
    location = load_settings().database
    existed = not isinstance(location, Path) or location.exists()
    store = Store(location)
    version = store.migrate()
    store.close()
    print(f"{'migrated' if existed else 'created'} {location} (schema version {version})")


def cmd_db_status(args: argparse.Namespace) -> None:
    """The schema version the database has, and the one this relay would migrate it to."""
    location = load_settings().database
    store = Store(location, create=False)
    try:
        version = store.schema_version()
    finally:
        store.close()
    value = {
        "database": str(location),
        "backend": "sqlite" if isinstance(location, Path) else "postgresql",
        "schema_version": version,
        "latest": len(MIGRATIONS),
        "pending_migrations": max(len(MIGRATIONS) - version, 0),
    }

    def text(v: dict[str, Any]) -> str:
        state = (
            "up to date"
            if not v["pending_migrations"]
            else (f"{v['pending_migrations']} migration(s) to apply: relay db migrate")
        )
        return f"{v['database']}: schema version {v['schema_version']} of {v['latest']} ({state})"

    emit(args, value, text)


def cmd_db_copy(args: argparse.Namespace) -> None:
    """Move this SQLite install into an empty PostgreSQL database (`--to`)."""
    from relay.config import PostgresUrl, database_location
    from relay.store import transfer

    source_location = load_settings().database
    target_location = database_location(args.to)
    if not isinstance(source_location, Path) or not isinstance(target_location, PostgresUrl):
        raise RelayError(
            "relay db copy: RELAY_DATABASE must be the SQLite database to copy, and --to"
            " a postgresql:// URL"
        )
    source, target = Store(source_location, create=False), Store(target_location)
    try:
        copied = transfer.copy(source, target)
    finally:
        source.close()
        target.close()
    value = {"from": str(source_location), "to": str(target_location), "rows": copied}

    def text(v: dict[str, Any]) -> str:
        counts = ", ".join(f"{name} {n}" for name, n in v["rows"].items())
        return f"copied {v['from']} into {v['to']}: {counts}"

    emit(args, value, text)


def configure_logging(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format)
