"""The suppression and webhook commands: thin calls into `relay.events.manage`."""

from __future__ import annotations

import argparse
from typing import Any

from relay.cli.output import emit, open_store, table, when
from relay.config import load_settings
from relay.events import manage
from relay.store.audit import CLI_ACTOR


def cmd_suppression_add(args: argparse.Namespace) -> None:
    value = manage.add_suppression(
        open_store(),
        CLI_ACTOR,
        args.account,
        args.address,
        reason=args.reason,
        expires_in=args.expires_in,
    )
    emit(
        args,
        value,
        lambda v: f"suppressed {v['address']} ({v['reason']}, until {when(v['expires'])})",
    )


def cmd_suppression_remove(args: argparse.Namespace) -> None:
    value = manage.remove_suppression(open_store(), CLI_ACTOR, args.account, args.address)
    emit(args, value, lambda v: f"removed {v['address']}")


def cmd_suppression_list(args: argparse.Namespace) -> None:
    rows = manage.list_suppressions(open_store(), args.account)

    def text(v: list[dict[str, Any]]) -> str:
        shown = [{**r, "since": when(r["created"]), "until": when(r["expires"])} for r in v]
        return table(shown, ["address", "reason", "since", "until", "source"])

    emit(args, rows, text)


def cmd_webhook_add(args: argparse.Namespace) -> None:
    settings = load_settings()
    url = manage.check_url(args.url, allow_private=settings.webhook_allow_private)
    value = manage.add_webhook(open_store(), CLI_ACTOR, args.account, url, args.events)

    def text(v: dict[str, Any]) -> str:
        events = ", ".join(v["events"]) or "every event"
        return (
            f"webhook {v['id']} for account {v['account']} ({events});"
            f" its signing secret, shown once, store it now:\n{v['secret']}"
        )

    emit(args, value, text)


def cmd_webhook_list(args: argparse.Namespace) -> None:
    rows = manage.list_webhooks(open_store(), args.account)

    def text(v: list[dict[str, Any]]) -> str:
        shown = [
            {
                **r,
                "events": ",".join(r["events"]) or "*",
                "state": "enabled" if r["enabled"] else "disabled",
                "failing since": when(r["failing_since"]),
            }
            for r in v
        ]
        return table(shown, ["id", "url", "events", "state", "failing since"])

    emit(args, rows, text)


def cmd_webhook_remove(args: argparse.Namespace) -> None:
    manage.remove_webhook(open_store(), CLI_ACTOR, args.account, args.id)
    print(f"removed {args.id}")


def cmd_webhook_test(args: argparse.Namespace) -> None:
    value = manage.test_webhook(open_store(), CLI_ACTOR, args.account, args.id)
    emit(args, value, lambda v: f"queued test event {v['event_id']} for {v['id']}")


def cmd_webhook_replay(args: argparse.Namespace) -> None:
    value = manage.replay_event(open_store(), CLI_ACTOR, args.account, args.event_id)
    emit(args, value, lambda v: f"queued {v['event_id']} again ({v['queued']} endpoint(s))")


def cmd_webhook_attempts(args: argparse.Namespace) -> None:
    rows = manage.webhook_attempts(open_store(), args.account, args.id, args.limit)

    def text(v: list[dict[str, Any]]) -> str:
        shown = [{**r, "time": when(r["created"]), "status": r["status"] or "-"} for r in v]
        return table(shown, ["time", "event_id", "type", "status", "duration_ms", "state"])

    emit(args, rows, text)


def add_commands(command: Any, group: Any) -> None:
    """`relay suppression ...` and `relay webhook ...` (relay.cli.parser)."""
    suppression = group("suppression", "addresses an account's mail no longer goes to")
    add = command(suppression, "add", cmd_suppression_add, "suppress an address or *@domain", True)
    add.add_argument("account")
    add.add_argument("address", help="an address, or *@domain")
    add.add_argument(
        "--reason", default="manual", choices=["manual", "hard-bounce", "complaint", "provider"]
    )
    add.add_argument("--expires-in", type=int, metavar="SECONDS")
    remove = command(suppression, "remove", cmd_suppression_remove, "remove an entry", True)
    remove.add_argument("account")
    remove.add_argument("address")
    command(suppression, "list", cmd_suppression_list, "list active entries", True).add_argument(
        "account"
    )

    webhook = group("webhook", "signed event notifications to an account's application")
    wadd = command(webhook, "add", cmd_webhook_add, "add an endpoint (secret shown once)", True)
    wadd.add_argument("account")
    wadd.add_argument("--url", required=True, help="https://... (http:// to loopback for tests)")
    wadd.add_argument("--events", metavar="TYPE,TYPE", help="event types (default: all)")
    command(webhook, "list", cmd_webhook_list, "list endpoints (never secrets)", True).add_argument(
        "account"
    )
    for name, handler, help in (
        ("remove", cmd_webhook_remove, "remove an endpoint"),
        ("test", cmd_webhook_test, "send a webhook.test event (re-enables a disabled endpoint)"),
    ):
        p = command(webhook, name, handler, help, name == "test")
        p.add_argument("account")
        p.add_argument("id")
    replay = command(webhook, "replay", cmd_webhook_replay, "send one event again", True)
    replay.add_argument("account")
    replay.add_argument("event_id")
    attempts = command(webhook, "attempts", cmd_webhook_attempts, "an endpoint's attempts", True)
    attempts.add_argument("account")
    attempts.add_argument("id")
    attempts.add_argument("--limit", type=int, default=50)
