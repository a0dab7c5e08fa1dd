"""The `relay` command: a thin mapping from arguments onto the settings, the store and the server.

Every listing and creating command takes `--json`. Errors print one line
(`relay: ...`) and exit 1; a bad setting exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relay import certs, logs
from relay.admin import operations
from relay.config import Settings, load_settings, max_workers
from relay.errors import ConfigError, RelayError
from relay.store.audit import CLI_ACTOR
from relay.store.deliveries import DeliveryRecord, Outcome
from relay.store.facade import Store
from relay.store.schema import MIGRATIONS

DEMO_ACCOUNT = "demo"
DEMO_DOMAIN = "demo.test"
DEV_LISTEN = "127.0.0.1:2465"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        handler: Callable[[argparse.Namespace], int | None] = args.handler
        return handler(args) or 0
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


# --- output --------------------------------------------------------------------


def _emit(args: argparse.Namespace, value: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(value, indent=2, sort_keys=True, default=str))
    else:
        print(text(value))


def _when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _store() -> Store:
    """The database an admin command works on: it must exist (`relay db init` creates it).

    Creating one silently would hide a wrong `RELAY_DATABASE`: the command would
    succeed on an empty database the relay never reads.
    """
    store = Store(load_settings().database, create=False)
    store.migrate()
    return store


# --- commands ------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from relay import workers

    settings = load_settings()
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
        if args.workers > max_workers():
            raise ConfigError(f"--workers: must be at most {max_workers()}, got {args.workers}")
        settings = dataclasses.replace(settings, workers=args.workers)
    _logging(settings)
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
    _logging(settings)
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

    _emit(args, value, text)


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

    _emit(args, value, text)


def cmd_account_create(args: argparse.Namespace) -> None:
    value = operations.create_account(_store(), CLI_ACTOR, args.name)
    _emit(args, value, lambda v: f"created account {v['name']}")


def cmd_account_list(args: argparse.Namespace) -> None:
    rows = operations.list_accounts(_store())
    _emit(args, rows, lambda v: _table(v, ["id", "name"]))


def cmd_domain_add(args: argparse.Namespace) -> None:
    value = operations.add_domain(_store(), CLI_ACTOR, args.account, args.domain)
    _emit(args, value, lambda v: f"onboarded {v['domain']} on account {v['account']}")


def cmd_domain_remove(args: argparse.Namespace) -> None:
    value = operations.remove_domain(_store(), CLI_ACTOR, args.account, args.domain)
    _emit(args, value, lambda v: f"removed {v['domain']} from account {v['account']}")


def cmd_domain_list(args: argparse.Namespace) -> None:
    rows = operations.list_domains(_store(), args.account)
    _emit(args, rows, lambda v: _table(v, ["account", "domain"]))


def cmd_token_create(args: argparse.Namespace) -> None:
    value = operations.create_token(
        _store(),
        CLI_ACTOR,
        args.account,
        name=args.name or "",
        role=args.role or "",
        expires_in_days=args.expires_in,
    )

    def text(v: dict[str, Any]) -> str:
        return (
            f"token {v['id']} for account {v['account']}"
            f" (expires {_when(v['expires'])}); shown once, store it now:\n{v['token']}"
        )

    _emit(args, value, text)


def cmd_token_list(args: argparse.Namespace) -> None:
    rows = operations.list_tokens(_store(), args.account)

    def text(v: list[dict[str, Any]]) -> str:
        shown = [{**r, "created": _when(r["created"]), "expires": _when(r["expires"])} for r in v]
        return _table(shown, ["id", "account", "name", "role", "status", "created", "expires"])

    _emit(args, rows, text)


def cmd_token_revoke(args: argparse.Namespace) -> None:
    operations.revoke_token(_store(), CLI_ACTOR, args.token_id)
    print(f"revoked {args.token_id}")


def _list_commands(kind: str) -> dict[str, Callable[[argparse.Namespace], None]]:
    def add(args: argparse.Namespace) -> None:
        value = operations.add_to_list(_store(), CLI_ACTOR, kind, args.address)
        print(f"added {value['address']}")

    def remove(args: argparse.Namespace) -> None:
        value = operations.remove_from_list(_store(), CLI_ACTOR, kind, args.address)
        print(f"removed {value['address']}")

    def listing(args: argparse.Namespace) -> None:
        rows = operations.list_addresses(_store(), kind)
        _emit(args, rows, lambda v: "\n".join(r["address"] for r in v) or "(none)")

    return {"add": add, "remove": remove, "list": listing}


def _sender_text(v: dict[str, Any]) -> str:
    state = "enabled" if v["enabled"] else "disabled"
    line = f"{v['address']}  balance={v['balance']}  {state}"
    if v["unlimited"]:
        line += "  unlimited (on the nolimit list: sends without balance)"
    if not v["stored"]:
        line += "  (nothing charged yet: the DEFAULT_SEND_BALANCE it starts with)"
    return line


def cmd_sender_list(args: argparse.Namespace) -> None:
    rows, _ = operations.list_senders(_store(), prefix=args.prefix or "")
    _emit(args, rows, lambda v: _table(v, ["address", "balance", "enabled"]))


def cmd_sender_show(args: argparse.Namespace) -> None:
    default = load_settings().default_send_balance
    value = operations.show_sender(_store(), args.address, default_balance=default)
    _emit(args, value, _sender_text)


def cmd_sender_set(args: argparse.Namespace) -> None:
    value = operations.set_sender(
        _store(), CLI_ACTOR, args.address, balance=args.balance, enabled=args.enabled
    )
    _emit(args, value, _sender_text)


def cmd_sender_topup(args: argparse.Namespace) -> None:
    value = operations.topup_sender(_store(), CLI_ACTOR, args.address, args.amount)
    _emit(args, value, _sender_text)


def cmd_sender_delete(args: argparse.Namespace) -> None:
    value = operations.delete_sender(_store(), CLI_ACTOR, args.address)
    _emit(args, value, lambda v: f"deleted the sender row of {v['address']}")


def cmd_limits_set(args: argparse.Namespace) -> None:
    if args.daily is None and args.monthly is None:
        raise RelayError("give --daily N and/or --monthly N (-1 unlimited, 0 blocks sending)")
    value = operations.set_limits(
        _store(), CLI_ACTOR, account=args.account, daily=args.daily, monthly=args.monthly
    )
    _emit(args, value, lambda v: _limits_text([v]))


def cmd_limits_show(args: argparse.Namespace) -> None:
    _emit(args, operations.show_limits(_store()), _limits_text)


def cmd_admin_token_create(args: argparse.Namespace) -> None:
    value = operations.create_admin_token(
        _store(), CLI_ACTOR, name=args.name or "", expires_in_days=args.expires_in
    )

    def text(v: dict[str, Any]) -> str:
        return (
            f"admin token {v['id']} (expires {_when(v['expires'])});"
            f" shown once, store it now:\n{v['token']}"
        )

    _emit(args, value, text)


def cmd_admin_token_list(args: argparse.Namespace) -> None:
    rows = operations.list_admin_tokens(_store())

    def text(v: list[dict[str, Any]]) -> str:
        shown = [{**r, "created": _when(r["created"]), "expires": _when(r["expires"])} for r in v]
        return _table(shown, ["id", "name", "status", "created", "expires"])

    _emit(args, rows, text)


def cmd_admin_token_revoke(args: argparse.Namespace) -> None:
    operations.revoke_admin_token(_store(), CLI_ACTOR, args.token_id)
    print(f"revoked {args.token_id}")


def cmd_audit(args: argparse.Namespace) -> None:
    """The audit log, newest first: a table, or one JSON object per line."""
    rows, _ = operations.audit(_store(), limit=args.limit)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return
    shown = [
        {
            **r,
            "time": _when(r["created"]),
            "detail": json.dumps(r["detail"], sort_keys=True) if r["detail"] else "",
        }
        for r in rows
    ]
    print(_table(shown, ["time", "actor", "address", "action", "target", "detail"]))


def _limits_text(rows: list[dict[str, Any]]) -> str:
    def limit(n: int) -> str:
        return "unlimited" if n == -1 else str(n)

    shown = [
        {
            "scope": r["scope"],
            "daily": f"{r['daily_count']}/{limit(r['daily'])}",
            "monthly": f"{r['monthly_count']}/{limit(r['monthly'])}",
            "daily resets": r["daily_resets_at"],
            "monthly resets": r["monthly_resets_at"],
        }
        for r in rows
    ]
    return _table(shown, ["scope", "daily", "monthly", "daily resets", "monthly resets"])


def cmd_log(args: argparse.Namespace) -> None:
    """The delivery log, newest first: a table, or one JSON object per line."""
    query = operations.log_query(
        since=args.since,
        until=args.until,
        sender=args.sender,
        recipient=args.recipient,
        account=args.account,
        outcome=args.outcome,
        message_id=args.message_id,
        limit=args.limit,
    )
    records, _ = operations.find_log(_store(), query)
    if args.json:
        for record in records:
            print(json.dumps(record.as_json(), sort_keys=True))
        return
    print(_table([_log_row(r) for r in records], LOG_COLUMNS))


LOG_COLUMNS = ["time", "message-id", "sender", "rcpts", "channel", "outcome", "reply", "upstream"]


def _log_row(record: DeliveryRecord) -> dict[str, Any]:
    return {
        "time": _when(record.time),
        "message-id": record.message_id or "-",
        "sender": record.sender,
        "rcpts": record.total_recipients,
        "channel": record.channel or "-",
        "outcome": record.outcome,
        "reply": f"{record.reply.code} {record.reply.enhanced}",
        "upstream": record.upstream_id or "-",
    }


def cmd_log_show(args: argparse.Namespace) -> None:
    """Everything recorded for a Message-ID (a retried message has several records)."""
    records = operations.show_log(_store(), args.message_id)
    if args.json:
        for record in records:
            print(json.dumps(record.as_json(), sort_keys=True))
        return
    print("\n\n".join(_record_text(r) for r in records))


def _record_text(record: DeliveryRecord) -> str:
    lines = [
        f"message-id  {record.message_id or '-'}",
        f"time        {_when(record.time)}",
        f"account     {record.account} (token {record.token_id})",
        f"client      {record.client}",
        f"sender      {record.sender}",
        f"size        {record.size} octets",
        f"channel     {record.channel or '-'}"
        + (f" (rule {record.rule})" if record.rule is not None else ""),
        f"outcome     {record.outcome}" + (" (replay, not charged)" if record.replay else ""),
        f"reply       {record.reply}",
        f"upstream id {record.upstream_id or '-'}",
        f"charged     {record.charged}",
        f"forward     {record.duration:.3f} s",
        "recipients"
        + (
            f"  ({len(record.recipients)} of {record.total_recipients} kept)"
            if record.total_recipients > len(record.recipients)
            else ""
        ),
    ]
    lines += [f"  {r.address}  {r.outcome} {r.code} {r.enhanced}" for r in record.recipients]
    return "\n".join(lines)


# --- the parser ----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="SMTPS submission relay")
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(
        group: Any,
        name: str,
        handler: Callable[[argparse.Namespace], Any],
        help: str,
        json: bool = False,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help)
        p.set_defaults(handler=handler)
        if json:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    def group(name: str, help: str) -> Any:
        return commands.add_parser(name, help=help).add_subparsers(metavar="ACTION", required=True)

    serve = command(commands, "serve", cmd_serve, "run the relay in the foreground")
    serve.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    command(commands, "dev", cmd_dev, "development start (make run): demo account, outbox")

    log = command(commands, "log", cmd_log, "the delivery log, newest first", True)
    log.add_argument("--since", metavar="DURATION|TIME", help="e.g. 2h, 1d, 2026-11-22T10:00")
    log.add_argument("--until", metavar="DURATION|TIME")
    log.add_argument("--sender", metavar="ADDRESS")
    log.add_argument("--recipient", metavar="ADDRESS")
    log.add_argument("--account", metavar="NAME")
    log.add_argument("--outcome", choices=[str(o) for o in Outcome])
    log.add_argument("--message-id", metavar="ID")
    log.add_argument("--limit", type=int, default=50, help="records at most (default 50)")
    log_actions = log.add_subparsers(metavar="ACTION")
    show = command(log_actions, "show", cmd_log_show, "everything recorded for a Message-ID", True)
    show.add_argument("message_id", metavar="MESSAGE-ID")

    certs_group = group("certs", "TLS certificates")
    gen = command(certs_group, "generate", cmd_certs_generate, "write a self-signed certificate")
    gen.add_argument("--hostname", default="localhost")
    gen.add_argument("--dir", default="certs")
    gen.add_argument("--force", action="store_true", help="replace an existing certificate")

    db = group("db", "the database")
    command(db, "init", cmd_db_init, "create the database, or migrate an existing one")
    command(db, "migrate", cmd_db_init, "apply the schema migrations not applied yet")
    command(db, "status", cmd_db_status, "the database's schema version", True)
    copy = command(db, "copy", cmd_db_copy, "copy into an empty PostgreSQL database", True)
    copy.add_argument("--to", required=True, metavar="postgresql://...")

    account = group("account", "accounts")
    command(account, "create", cmd_account_create, "create an account", True).add_argument("name")
    command(account, "list", cmd_account_list, "list accounts", True)

    domain = group("domain", "sender domains onboarded on an account")
    for name, handler in (("add", cmd_domain_add), ("remove", cmd_domain_remove)):
        p = command(domain, name, handler, f"{name} a domain", True)
        p.add_argument("account")
        p.add_argument("domain")
    command(domain, "list", cmd_domain_list, "list domains", True).add_argument(
        "account", nargs="?"
    )

    token = group("token", "API tokens (the SMTP password)")
    create = command(token, "create", cmd_token_create, "issue a token (shown once)", True)
    create.add_argument("account")
    create.add_argument("--name", help="a label")
    create.add_argument("--expires-in", type=float, metavar="DAYS")
    create.add_argument("--role", help="a role; see NO_LIMIT_SEND_ROLE")
    command(token, "list", cmd_token_list, "list tokens (never secrets)", True).add_argument(
        "account", nargs="?"
    )
    command(token, "revoke", cmd_token_revoke, "revoke a token").add_argument("token_id")

    for kind, title, help in (
        ("verified", "verified", "verified recipient addresses (free Cloudflare channel)"),
        ("nolimit", "nolimit", "senders that send without balance"),
    ):
        g = group(title, help)
        actions = _list_commands(kind)
        command(g, "add", actions["add"], "add an address").add_argument("address")
        command(g, "remove", actions["remove"], "remove an address").add_argument("address")
        command(g, "list", actions["list"], "list addresses", True)

    sender = group("sender", "send balances per sender address")
    command(sender, "list", cmd_sender_list, "list sender rows", True).add_argument(
        "--prefix", help="only addresses that start with this"
    )
    command(sender, "show", cmd_sender_show, "show one sender", True).add_argument("address")
    sset = command(sender, "set", cmd_sender_set, "create or edit a sender row", True)
    sset.add_argument("address")
    sset.add_argument("--balance", type=int)
    state = sset.add_mutually_exclusive_group()
    state.add_argument("--enabled", dest="enabled", action="store_true", default=None)
    state.add_argument("--disabled", dest="enabled", action="store_false")
    topup = command(sender, "topup", cmd_sender_topup, "add to a balance", True)
    topup.add_argument("address")
    topup.add_argument("amount", type=int)
    command(sender, "delete", cmd_sender_delete, "delete a sender row", True).add_argument(
        "address"
    )

    limits = group("limits", "daily and monthly send limits (UTC windows)")
    lset = command(limits, "set", cmd_limits_set, "set limits (-1 unlimited, 0 blocks)", True)
    lset.add_argument("--daily", type=int)
    lset.add_argument("--monthly", type=int)
    lset.add_argument("--account", help="limit one account instead of the whole relay")
    command(limits, "show", cmd_limits_show, "limits and current counts", True)

    admin_token = group("admin-token", "admin API tokens (apart from the sending tokens)")
    acreate = command(
        admin_token, "create", cmd_admin_token_create, "issue an admin token (shown once)", True
    )
    acreate.add_argument("--name", help="a label")
    acreate.add_argument("--expires-in", type=float, metavar="DAYS")
    command(admin_token, "list", cmd_admin_token_list, "list admin tokens (never secrets)", True)
    command(admin_token, "revoke", cmd_admin_token_revoke, "revoke an admin token").add_argument(
        "token_id"
    )

    audit = command(commands, "audit", cmd_audit, "the audit log of changes, newest first", True)
    audit.add_argument("--limit", type=int, default=100, help="records at most (default 100)")
    return parser


def _logging(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format)
