"""`relay log` and `relay log show`: the delivery log, as a table, text or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from relay.admin import operations
from relay.cli.output import open_store, table, when
from relay.store.deliveries import DeliveryRecord


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
        channel=args.channel,
        limit=args.limit,
    )
    records, _ = operations.find_log(open_store(), query)
    if args.json:
        for record in records:
            print(json.dumps(record.as_json(), sort_keys=True))
        return
    print(table([_log_row(r) for r in records], LOG_COLUMNS))


LOG_COLUMNS = ["time", "message-id", "sender", "rcpts", "channel", "outcome", "reply", "upstream"]


def _log_row(record: DeliveryRecord) -> dict[str, Any]:
    return {
        "time": when(record.time),
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
    records = operations.show_log(open_store(), args.message_id)
    if args.json:
        for record in records:
            print(json.dumps(record.as_json(), sort_keys=True))
        return
    print("\n\n".join(_record_text(r) for r in records))


def _record_text(record: DeliveryRecord) -> str:
    lines = [
        f"message-id  {record.message_id or '-'}",
        f"time        {when(record.time)}",
        f"account     {record.account} (token {record.token_id})",
        f"client      {record.client}",
        f"port        {record.listener}",
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
    tries = record.tries
    if tries:
        lines.append("attempts")
        lines += [
            f"  {n}. {a.channel}  {a.code} {a.enhanced} {a.text}  ({a.duration:.3f} s,"
            f" {a.accepted} taken)"
            for n, a in enumerate(tries, 1)
        ]
    if record.provider_events:
        lines.append("provider events")
        lines += [
            f"  {when(int(e.get('time', 0)))}  {e.get('provider')} {e.get('type')}"
            f"  {', '.join(e.get('recipients') or []) or '-'}"
            + (f"  ({e['detail']})" if e.get("detail") else "")
            for e in record.provider_events
        ]
    return "\n".join(lines)
