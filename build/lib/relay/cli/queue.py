"""`relay queue`: the durable queue's messages (docs/queue.md)."""

from __future__ import annotations

import argparse
import json

from relay.admin import queue as queue_ops
from relay.cli.output import open_store, table, when
from relay.errors import NotFound
from relay.store.audit import CLI_ACTOR


def cmd_queue_list(args: argparse.Namespace) -> None:
    rows = queue_ops.queue_list(open_store(), state=args.state, account=args.account)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return
    shown = [
        {
            "id": r["id"],
            "queued": when(r["created"]),
            "message-id": r["message_id"],
            "sender": r["sender"],
            "rcpts": len(r["recipients"]),
            "state": r["state"],
            "tries": r["tries"],
            "next": when(r["next_try"]),
            "last": r["last_text"] or "-",
        }
        for r in rows
    ]
    columns = ["id", "queued", "message-id", "sender", "rcpts", "state", "tries", "next", "last"]
    print(table(shown, columns))


def cmd_queue_show(args: argparse.Namespace) -> None:
    row = queue_ops.queue_show(open_store(), args.id)
    if args.json:
        print(json.dumps(row, sort_keys=True))
        return
    lines = [
        f"id          {row['id']}",
        f"message-id  {row['message_id']}",
        f"queued      {when(row['created'])}",
        f"account     {row['account']}",
        f"sender      {row['sender']}",
        f"state       {row['state']}" + (" (an attempt runs)" if row["lease_owner"] else ""),
        f"next try    {when(row['next_try'])}",
        "recipients",
        *(
            f"  {r}  " + (" ".join(map(str, row["done"][r][:2])) if r in row["done"] else "waiting")
            for r in row["recipients"]
        ),
        "attempts",
        *(
            f"  {n}. {a[0]}  {a[1]} {a[2]} {a[3]}  ({a[4]:.3f} s)"
            for n, a in enumerate(row["attempts"], 1)
        ),
    ]
    print("\n".join(lines))


def _set(args: argparse.Namespace, action: str) -> int:
    if not args.all and args.id is None:
        raise NotFound("name a queued message's ID, or --all")
    target = None if args.all else args.id
    return int(queue_ops.queue_set(open_store(), CLI_ACTOR, target, action)["changed"])


def cmd_queue_retry(args: argparse.Namespace) -> None:
    print(f"{_set(args, 'retry')} message(s) due now")


def cmd_queue_hold(args: argparse.Namespace) -> None:
    print(f"{_set(args, 'hold')} message(s) held")


def cmd_queue_release(args: argparse.Namespace) -> None:
    print(f"{_set(args, 'release')} message(s) released")


def cmd_queue_cancel(args: argparse.Namespace) -> None:
    value = queue_ops.queue_cancel(open_store(), CLI_ACTOR, args.id)
    print(f"cancelled {value['id']}; refunded {value['refunded']}")
