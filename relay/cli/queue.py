"""`relay queue`: the durable queue's messages (docs/queue.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from relay.cli.output import open_store, table, when
from relay.errors import NotFound


def cmd_queue_list(args: argparse.Namespace) -> None:
    rows = open_store().queue_list(args.state, args.account)
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
    row = _one(args.id)
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


def _one(queue_id: int) -> dict[str, Any]:
    row = open_store().queue_get(queue_id)
    if row is None:
        raise NotFound(f"no queued message {queue_id}")
    return row


def _ids(args: argparse.Namespace) -> list[int] | None:
    if args.all:
        return None
    if args.id is None:
        raise NotFound("name a queued message's ID, or --all")
    return [args.id]


def cmd_queue_retry(args: argparse.Namespace) -> None:
    print(f"{open_store().queue_set(_ids(args), due_now=True)} message(s) due now")


def cmd_queue_hold(args: argparse.Namespace) -> None:
    print(f"{open_store().queue_set(_ids(args), state='held')} message(s) held")


def cmd_queue_release(args: argparse.Namespace) -> None:
    print(f"{open_store().queue_set(_ids(args), state='queued')} message(s) released")


def cmd_queue_cancel(args: argparse.Namespace) -> None:
    refund = open_store().cancel(args.id)
    if refund is None:
        raise NotFound(f"no queued message {args.id} free to cancel (an attempt may hold it)")
    print(f"cancelled {args.id}; refunded {refund}")
