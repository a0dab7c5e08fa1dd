"""The `relay` command line: every command, its arguments and its handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from relay.cli import events, manage
from relay.cli import log as deliveries
from relay.cli import queue as queued
from relay.cli import serve as running
from relay.config import QUEUE_MODES
from relay.store.deliveries import Outcome


def rules(p: argparse.ArgumentParser) -> None:
    """A token's rules (relay.tokenrules); each option repeats, and replaces its list."""
    p.add_argument(
        "--sender",
        action="append",
        metavar="ADDRESS|*@DOMAIN|DOMAIN",
        help="a sender it may use (repeat; none: any address of the account's domains)",
    )
    p.add_argument(
        "--network",
        action="append",
        metavar="CIDR",
        help="a range it may AUTH from, IPv4 or IPv6 (repeat; none: anywhere)",
    )
    p.add_argument(
        "--rate", action="append", metavar="N/UNIT", help="messages per minute, hour or day"
    )
    p.add_argument(
        "--rcpt-rate", action="append", metavar="N/UNIT", help="recipients per minute, hour or day"
    )


def build_parser() -> argparse.ArgumentParser:
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

    serve = command(commands, "serve", running.cmd_serve, "run the relay in the foreground")
    serve.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    command(commands, "dev", running.cmd_dev, "development start (make run): demo account, outbox")

    log = command(commands, "log", deliveries.cmd_log, "the delivery log, newest first", True)
    log.add_argument("--since", metavar="DURATION|TIME", help="e.g. 2h, 1d, 2026-11-22T10:00")
    log.add_argument("--until", metavar="DURATION|TIME")
    log.add_argument("--sender", metavar="ADDRESS")
    log.add_argument("--recipient", metavar="ADDRESS")
    log.add_argument("--account", metavar="NAME")
    log.add_argument("--outcome", choices=[str(o) for o in Outcome])
    log.add_argument(
        "--channel", metavar="NAME", help="the channel that answered; none: refused before any"
    )
    log.add_argument("--message-id", metavar="ID")
    log.add_argument("--limit", type=int, default=50, help="records at most (default 50)")
    log_actions = log.add_subparsers(metavar="ACTION")
    show = command(
        log_actions, "show", deliveries.cmd_log_show, "everything recorded for a Message-ID", True
    )
    show.add_argument("message_id", metavar="MESSAGE-ID")

    queue = group("queue", "the durable queue (RELAY_QUEUE)")
    qlist = command(queue, "list", queued.cmd_queue_list, "queued messages, oldest first", True)
    qlist.add_argument("--state", choices=["queued", "held"])
    qlist.add_argument("--account", metavar="NAME")
    command(queue, "show", queued.cmd_queue_show, "one queued message", True).add_argument(
        "id", type=int
    )
    for name, handler, help in (
        ("retry", queued.cmd_queue_retry, "make due now"),
        ("hold", queued.cmd_queue_hold, "hold: no attempt until released"),
        ("release", queued.cmd_queue_release, "release held messages"),
    ):
        p = command(queue, name, handler, help)
        p.add_argument("id", type=int, nargs="?")
        p.add_argument("--all", action="store_true", help="every queued message")
    command(
        queue, "cancel", queued.cmd_queue_cancel, "end one: refund the undelivered, record it"
    ).add_argument("id", type=int)

    certs_group = group("certs", "TLS certificates")
    gen = command(
        certs_group, "generate", running.cmd_certs_generate, "write a self-signed certificate"
    )
    gen.add_argument("--hostname", default="localhost")
    gen.add_argument("--dir", default="certs")
    gen.add_argument("--force", action="store_true", help="replace an existing certificate")

    db = group("db", "the database")
    command(db, "init", running.cmd_db_init, "create the database, or migrate an existing one")
    command(db, "migrate", running.cmd_db_init, "apply the schema migrations not applied yet")
    command(db, "status", running.cmd_db_status, "the database's schema version", True)
    copy = command(db, "copy", running.cmd_db_copy, "copy into an empty PostgreSQL database", True)
    copy.add_argument("--to", required=True, metavar="postgresql://...")

    account = group("account", "accounts")
    command(account, "create", manage.cmd_account_create, "create an account", True).add_argument(
        "name"
    )
    command(account, "list", manage.cmd_account_list, "list accounts", True)
    aset = command(account, "set", manage.cmd_account_set, "an account's own settings", True)
    aset.add_argument("name")
    aset.add_argument(
        "--queue",
        choices=[*QUEUE_MODES, "default"],
        help="its own RELAY_QUEUE (default: the relay's setting)",
    )

    for name, handler, what in (
        ("disable", manage.cmd_account_disable, "disable an account (its tokens stop working)"),
        ("enable", manage.cmd_account_enable, "enable a disabled account"),
    ):
        command(account, name, handler, what, True).add_argument("name")
    adelete = command(
        account,
        "delete",
        manage.cmd_account_delete,
        "delete an account, its tokens, domains, webhooks and suppressions",
        True,
    )
    adelete.add_argument("name")
    adelete.add_argument("--yes", action="store_true", help="do not ask: delete")

    domain = group("domain", "sender domains onboarded on an account")
    for name, handler in (("add", manage.cmd_domain_add), ("remove", manage.cmd_domain_remove)):
        p = command(domain, name, handler, f"{name} a domain", True)
        p.add_argument("account")
        p.add_argument("domain")
    command(domain, "list", manage.cmd_domain_list, "list domains", True).add_argument(
        "account", nargs="?"
    )
    move = command(domain, "move", manage.cmd_domain_move, "move a domain to another account", True)
    move.add_argument("domain")
    move.add_argument("account", help="the account it moves to")

    token = group("token", "API tokens (the SMTP password)")
    create = command(token, "create", manage.cmd_token_create, "issue a token (shown once)", True)
    create.add_argument("account")
    create.add_argument("--name", help="a label")
    create.add_argument("--expires-in", type=float, metavar="DAYS")
    create.add_argument("--role", help="a role; see NO_LIMIT_SEND_ROLE")
    rules(create)
    tset = command(
        token, "set", manage.cmd_token_set, "replace a token's senders, networks or rates", True
    )
    tset.add_argument("token_id")
    rules(tset)
    for what in ("senders", "networks", "rates", "rcpt-rates"):
        tset.add_argument(f"--clear-{what}", action="store_true", help=f"remove all its {what}")
    command(token, "show", manage.cmd_token_show, "show a token and its rules", True).add_argument(
        "token_id"
    )
    command(token, "list", manage.cmd_token_list, "list tokens (never secrets)", True).add_argument(
        "account", nargs="?"
    )
    command(token, "revoke", manage.cmd_token_revoke, "revoke a token").add_argument("token_id")

    for kind, title, help in (
        ("verified", "verified", "verified recipient addresses (free Cloudflare channel)"),
        ("nolimit", "nolimit", "senders that send without balance"),
    ):
        g = group(title, help)
        actions = manage._list_commands(kind)
        command(g, "add", actions["add"], "add an address").add_argument("address")
        command(g, "remove", actions["remove"], "remove an address").add_argument("address")
        command(g, "list", actions["list"], "list addresses", True)

    sender = group("sender", "send balances per sender address")
    command(sender, "list", manage.cmd_sender_list, "list sender rows", True).add_argument(
        "--prefix", help="only addresses that start with this"
    )
    command(sender, "show", manage.cmd_sender_show, "show one sender", True).add_argument("address")
    sset = command(sender, "set", manage.cmd_sender_set, "create or edit a sender row", True)
    sset.add_argument("address")
    sset.add_argument("--balance", type=int)
    state = sset.add_mutually_exclusive_group()
    state.add_argument("--enabled", dest="enabled", action="store_true", default=None)
    state.add_argument("--disabled", dest="enabled", action="store_false")
    topup = command(sender, "topup", manage.cmd_sender_topup, "add to a balance", True)
    topup.add_argument("address")
    topup.add_argument("amount", type=int)
    command(sender, "delete", manage.cmd_sender_delete, "delete a sender row", True).add_argument(
        "address"
    )

    limits = group("limits", "daily and monthly send limits (UTC windows)")
    lset = command(
        limits, "set", manage.cmd_limits_set, "set limits (-1 unlimited, 0 blocks)", True
    )
    lset.add_argument("--daily", type=int)
    lset.add_argument("--monthly", type=int)
    lset.add_argument("--account", help="limit one account instead of the whole relay")
    command(limits, "show", manage.cmd_limits_show, "limits and current counts", True)

    admin_token = group("admin-token", "admin API tokens (apart from the sending tokens)")
    acreate = command(
        admin_token,
        "create",
        manage.cmd_admin_token_create,
        "issue an admin token (shown once)",
        True,
    )
    acreate.add_argument("--name", help="a label")
    acreate.add_argument("--expires-in", type=float, metavar="DAYS")
    command(
        admin_token, "list", manage.cmd_admin_token_list, "list admin tokens (never secrets)", True
    )
    command(
        admin_token, "revoke", manage.cmd_admin_token_revoke, "revoke an admin token"
    ).add_argument("token_id")

    events.add_commands(command, group)

    audit = command(
        commands, "audit", manage.cmd_audit, "the audit log of changes, newest first", True
    )
    audit.add_argument("--limit", type=int, default=100, help="records at most (default 100)")
    return parser
