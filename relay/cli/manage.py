"""The admin commands: accounts, domains, tokens, address lists, senders, limits, audit.

Each is a thin call into `relay.admin.operations`, which the admin API calls too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from relay.admin import accounts, balances, operations
from relay.cli.output import emit, open_store, table, when
from relay.config import load_settings
from relay.errors import RelayError
from relay.store.audit import CLI_ACTOR


def cmd_account_create(args: argparse.Namespace) -> None:
    value = operations.create_account(open_store(), CLI_ACTOR, args.name)
    emit(args, value, lambda v: f"created account {v['name']}")


def cmd_account_list(args: argparse.Namespace) -> None:
    rows = operations.list_accounts(open_store())
    shown = lambda v: table(  # noqa: E731
        [
            {
                **a,
                "queue": a["queue"] or "default",
                "state": "disabled" if a["disabled"] else "enabled",
            }
            for a in v
        ],
        ["id", "name", "queue", "state"],
    )
    emit(args, rows, shown)


def cmd_account_set(args: argparse.Namespace) -> None:
    value = operations.set_account(open_store(), CLI_ACTOR, args.name, queue=args.queue)
    emit(args, value, lambda v: f"account {v['name']}: queue {v['queue'] or 'default'}")


def cmd_account_disable(args: argparse.Namespace) -> None:
    value = accounts.set_disabled(open_store(), CLI_ACTOR, args.name, True)
    emit(args, value, lambda v: f"account {v['name']}: disabled (its tokens no longer work)")


def cmd_account_enable(args: argparse.Namespace) -> None:
    value = accounts.set_disabled(open_store(), CLI_ACTOR, args.name, False)
    emit(args, value, lambda v: f"account {v['name']}: enabled")


def cmd_account_delete(args: argparse.Namespace) -> None:
    if not args.yes:
        # Deleting drops its tokens, domains, webhooks and suppressions: ask for the
        # name, as the console does; no terminal (a script) must say --yes.
        if not sys.stdin.isatty():
            raise RelayError("deleting an account: add --yes, or run it in a terminal")
        typed = input(f"Delete account {args.name!r}? Type its name to confirm: ")
        if typed.strip() != args.name:
            raise RelayError("not deleted: the name did not match")
    value = accounts.delete_account(open_store(), CLI_ACTOR, args.name)
    emit(
        args,
        value,
        lambda v: (
            f"deleted account {v['name']}: {len(v['tokens'])} token(s),"
            f" {len(v['domains'])} domain(s), {v['webhooks']} webhook(s),"
            f" {v['suppressions']} suppression(s); its delivery records stay"
        ),
    )


def cmd_domain_move(args: argparse.Namespace) -> None:
    value = accounts.move_domain(open_store(), CLI_ACTOR, args.domain, args.account)
    emit(args, value, lambda v: f"moved {v['domain']} from account {v['from']} to {v['account']}")


def cmd_domain_add(args: argparse.Namespace) -> None:
    value = operations.add_domain(open_store(), CLI_ACTOR, args.account, args.domain)
    emit(args, value, lambda v: f"onboarded {v['domain']} on account {v['account']}")


def cmd_domain_remove(args: argparse.Namespace) -> None:
    value = operations.remove_domain(open_store(), CLI_ACTOR, args.account, args.domain)
    emit(args, value, lambda v: f"removed {v['domain']} from account {v['account']}")


def cmd_domain_list(args: argparse.Namespace) -> None:
    rows = operations.list_domains(open_store(), args.account)
    emit(args, rows, lambda v: table(v, ["account", "domain"]))


def cmd_token_create(args: argparse.Namespace) -> None:
    value = operations.create_token(
        open_store(),
        CLI_ACTOR,
        args.account,
        name=args.name or "",
        role=args.role or "",
        expires_in_days=args.expires_in,
        senders=args.sender,
        networks=args.network,
        rates=args.rate,
        rcpt_rates=args.rcpt_rate,
    )

    def text(v: dict[str, Any]) -> str:
        head = f"token {v['id']} for account {v['account']} (expires {when(v['expires'])})"
        rules = "".join(f"\n  {line}" for line in _rules_lines(v))
        return f"{head}{rules}{chr(10) if rules else '; '}shown once, store it now:\n{v['token']}"

    emit(args, value, text)


_RULES = (
    ("senders", "senders"),
    ("networks", "networks"),
    ("rates", "rates"),
    ("rcpt_rates", "recipient rates"),
)


def _rules_lines(v: dict[str, Any]) -> list[str]:
    return [f"{label}: {', '.join(v[key])}" for key, label in _RULES if v[key]]


def _token_text(v: dict[str, Any]) -> str:
    lines = [
        f"token {v['id']} for account {v['account']}: {v['status']}",
        f"  name: {v['name'] or '-'}  role: {v['role'] or '-'}",
        f"  created {when(v['created'])}, expires {when(v['expires'])}",
    ]
    for key, label in _RULES:
        fallback = {
            "senders": "any address of the account's domains",
            "networks": "anywhere",
        }.get(key, "no limit")
        lines.append(f"  {label}: {', '.join(v[key]) or fallback}")
    return "\n".join(lines)


def cmd_token_show(args: argparse.Namespace) -> None:
    emit(args, operations.show_token(open_store(), args.token_id), _token_text)


def cmd_token_set(args: argparse.Namespace) -> None:
    def given(values: list[str] | None, clear: bool, option: str) -> list[str] | None:
        if clear and values:
            raise RelayError(f"--{option} and --clear-{option}s: give one of them")
        return [] if clear else values

    options = (args.sender, args.network, args.rate, args.rcpt_rate)
    clears = (args.clear_senders, args.clear_networks, args.clear_rates, args.clear_rcpt_rates)
    if all(o is None for o in options) and not any(clears):
        raise RelayError(
            "give --sender, --network, --rate or --rcpt-rate (each repeats), or --clear-senders,"
            " --clear-networks, --clear-rates, --clear-rcpt-rates"
        )
    value = operations.set_token(
        open_store(),
        CLI_ACTOR,
        args.token_id,
        senders=given(args.sender, args.clear_senders, "sender"),
        networks=given(args.network, args.clear_networks, "network"),
        rates=given(args.rate, args.clear_rates, "rate"),
        rcpt_rates=given(args.rcpt_rate, args.clear_rcpt_rates, "rcpt-rate"),
    )
    emit(args, value, _token_text)


def cmd_token_list(args: argparse.Namespace) -> None:
    rows = operations.list_tokens(open_store(), args.account)

    def text(v: list[dict[str, Any]]) -> str:
        shown = [
            {
                **r,
                "created": when(r["created"]),
                "expires": when(r["expires"]),
                "rules": "; ".join(_rules_lines(r)) or "-",
            }
            for r in v
        ]
        return table(
            shown, ["id", "account", "name", "role", "status", "created", "expires", "rules"]
        )

    emit(args, rows, text)


def cmd_token_revoke(args: argparse.Namespace) -> None:
    operations.revoke_token(open_store(), CLI_ACTOR, args.token_id)
    print(f"revoked {args.token_id}")


def _list_commands(kind: str) -> dict[str, Callable[[argparse.Namespace], None]]:
    def add(args: argparse.Namespace) -> None:
        value = operations.add_to_list(open_store(), CLI_ACTOR, kind, args.address)
        print(f"added {value['address']}")

    def remove(args: argparse.Namespace) -> None:
        value = operations.remove_from_list(open_store(), CLI_ACTOR, kind, args.address)
        print(f"removed {value['address']}")

    def listing(args: argparse.Namespace) -> None:
        rows = operations.list_addresses(open_store(), kind)
        emit(args, rows, lambda v: "\n".join(r["address"] for r in v) or "(none)")

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
    rows, _ = balances.list_senders(open_store(), prefix=args.prefix or "")
    emit(args, rows, lambda v: table(v, ["address", "balance", "enabled"]))


def cmd_sender_show(args: argparse.Namespace) -> None:
    default = load_settings().default_send_balance
    value = balances.show_sender(open_store(), args.address, default_balance=default)
    emit(args, value, _sender_text)


def cmd_sender_set(args: argparse.Namespace) -> None:
    value = balances.set_sender(
        open_store(), CLI_ACTOR, args.address, balance=args.balance, enabled=args.enabled
    )
    emit(args, value, _sender_text)


def cmd_sender_topup(args: argparse.Namespace) -> None:
    value = balances.topup_sender(open_store(), CLI_ACTOR, args.address, args.amount)
    emit(args, value, _sender_text)


def cmd_sender_delete(args: argparse.Namespace) -> None:
    value = balances.delete_sender(open_store(), CLI_ACTOR, args.address)
    emit(args, value, lambda v: f"deleted the sender row of {v['address']}")


def cmd_limits_set(args: argparse.Namespace) -> None:
    if args.daily is None and args.monthly is None:
        raise RelayError("give --daily N and/or --monthly N (-1 unlimited, 0 blocks sending)")
    value = balances.set_limits(
        open_store(), CLI_ACTOR, account=args.account, daily=args.daily, monthly=args.monthly
    )
    emit(args, value, lambda v: _limits_text([v]))


def cmd_limits_show(args: argparse.Namespace) -> None:
    emit(args, balances.show_limits(open_store()), _limits_text)


def cmd_admin_token_create(args: argparse.Namespace) -> None:
    value = operations.create_admin_token(
        open_store(), CLI_ACTOR, name=args.name or "", expires_in_days=args.expires_in
    )

    def text(v: dict[str, Any]) -> str:
        return (
            f"admin token {v['id']} (expires {when(v['expires'])});"
            f" shown once, store it now:\n{v['token']}"
        )

    emit(args, value, text)


def cmd_admin_token_list(args: argparse.Namespace) -> None:
    rows = operations.list_admin_tokens(open_store())

    def text(v: list[dict[str, Any]]) -> str:
        shown = [{**r, "created": when(r["created"]), "expires": when(r["expires"])} for r in v]
        return table(shown, ["id", "name", "status", "created", "expires"])

    emit(args, rows, text)


def cmd_admin_token_revoke(args: argparse.Namespace) -> None:
    operations.revoke_admin_token(open_store(), CLI_ACTOR, args.token_id)
    print(f"revoked {args.token_id}")


def cmd_audit(args: argparse.Namespace) -> None:
    """The audit log, newest first: a table, or one JSON object per line."""
    rows, _ = operations.audit(open_store(), limit=args.limit)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return
    shown = [
        {
            **r,
            "time": when(r["created"]),
            "detail": json.dumps(r["detail"], sort_keys=True) if r["detail"] else "",
        }
        for r in rows
    ]
    print(table(shown, ["time", "actor", "address", "action", "target", "detail"]))


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
    return table(shown, ["scope", "daily", "monthly", "daily resets", "monthly resets"])
