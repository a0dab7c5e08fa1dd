"""The admin API's handlers: each turns one checked request (`Call`) into a call of
`relay.admin.operations`, the functions the CLI calls too, on the store's thread."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from relay.admin import accounts, balances, operations, overview
from relay.admin import queue as queue_ops
from relay.admin.calls import DEFAULT_PAGE, Call

# The fields of a token's rules (relay.tokenrules) in a request's body.
RULE_KEYS = ("senders", "networks", "rates", "rcpt_rates")


def _page(call: Call) -> int:
    limit = call.query.get("limit", DEFAULT_PAGE)
    assert isinstance(limit, int)
    return limit


async def list_accounts(call: Call) -> Any:
    return {"accounts": await call.run(operations.list_accounts)}


async def create_account(call: Call) -> Any:
    return await call.run(operations.create_account, call.actor, call.body["name"])


async def set_account(call: Call) -> Any:
    return await call.run(
        operations.set_account, call.actor, call.path["name"], queue=call.body.get("queue")
    )


def account_switch(disabled: bool) -> Callable[[Call], Awaitable[Any]]:
    async def handler(call: Call) -> Any:
        return await call.run(accounts.set_disabled, call.actor, call.path["name"], disabled)

    return handler


async def delete_account(call: Call) -> Any:
    return await call.run(accounts.delete_account, call.actor, call.path["name"])


async def move_domain(call: Call) -> Any:
    return await call.run(
        accounts.move_domain, call.actor, call.path["domain"], call.body["account"]
    )


async def list_domains(call: Call) -> Any:
    return {"domains": await call.run(operations.list_domains, call.path["name"])}


async def add_domain(call: Call) -> Any:
    return await call.run(operations.add_domain, call.actor, call.path["name"], call.body["domain"])


async def remove_domain(call: Call) -> Any:
    return await call.run(
        operations.remove_domain, call.actor, call.path["name"], call.path["domain"]
    )


async def list_tokens(call: Call) -> Any:
    return {"tokens": await call.run(operations.list_tokens, call.path["name"])}


async def create_token(call: Call) -> Any:
    return await call.run(
        operations.create_token,
        call.actor,
        call.path["name"],
        name=call.body.get("name", ""),
        role=call.body.get("role", ""),
        expires_in_days=call.body.get("expires_in_days"),
        **{k: call.body[k] for k in RULE_KEYS if k in call.body},
    )


async def show_token(call: Call) -> Any:
    return await call.run(operations.show_token, call.path["id"])


async def set_token(call: Call) -> Any:
    return await call.run(
        operations.set_token,
        call.actor,
        call.path["id"],
        **{k: call.body[k] for k in RULE_KEYS if k in call.body},
    )


async def revoke_token(call: Call) -> Any:
    return await call.run(operations.revoke_token, call.actor, call.path["id"])


async def list_senders(call: Call) -> Any:
    rows, cursor = await call.run(
        balances.list_senders,
        prefix=call.query.get("prefix", ""),
        limit=_page(call),
        cursor=call.query.get("cursor"),
    )
    return {"senders": rows, "next_cursor": cursor}


async def show_sender(call: Call) -> Any:
    return await call.run(
        balances.show_sender,
        call.path["address"],
        default_balance=call.context.default_send_balance,
    )


async def set_sender(call: Call) -> Any:
    return await call.run(
        balances.set_sender,
        call.actor,
        call.path["address"],
        balance=call.body.get("balance"),
        enabled=call.body.get("enabled"),
    )


async def delete_sender(call: Call) -> Any:
    return await call.run(balances.delete_sender, call.actor, call.path["address"])


async def topup_sender(call: Call) -> Any:
    return await call.run(
        balances.topup_sender, call.actor, call.path["address"], call.body["amount"]
    )


def lists(kind: str) -> tuple[Callable[[Call], Awaitable[Any]], ...]:
    async def listing(call: Call) -> Any:
        return {"addresses": await call.run(operations.list_addresses, kind)}

    async def add(call: Call) -> Any:
        return await call.run(operations.add_to_list, call.actor, kind, call.body["address"])

    async def remove(call: Call) -> Any:
        return await call.run(operations.remove_from_list, call.actor, kind, call.path["address"])

    return listing, add, remove


async def show_limits(call: Call) -> Any:
    return {"limits": await call.run(balances.show_limits)}


async def set_limits(call: Call) -> Any:
    return await call.run(
        balances.set_limits,
        call.actor,
        account=call.body.get("account"),
        daily=call.body.get("daily"),
        monthly=call.body.get("monthly"),
    )


async def find_log(call: Call) -> Any:
    query = operations.log_query(**{"limit": 50, **call.query})
    records, cursor = await call.run(operations.find_log, query)
    return {"records": [r.as_json() for r in records], "next_cursor": cursor}


async def show_log(call: Call) -> Any:
    records = await call.run(operations.show_log, call.path["message_id"])
    return {"records": [r.as_json() for r in records]}


async def list_audit(call: Call) -> Any:
    rows, cursor = await call.run(
        operations.audit, limit=_page(call), cursor=call.query.get("cursor")
    )
    return {"records": rows, "next_cursor": cursor}


# --- the durable queue (docs/queue.md) ------------------------------------------------


async def queue_list(call: Call) -> Any:
    return {
        "messages": await call.run(
            queue_ops.queue_list,
            state=call.query.get("state"),
            account=call.query.get("account"),
        )
    }


async def queue_show(call: Call) -> Any:
    return await call.run(queue_ops.queue_show, call.path["id"])


def queue_action(action: str) -> Callable[[Call], Awaitable[Any]]:
    async def handler(call: Call) -> Any:
        return await call.run(queue_ops.queue_set, call.actor, call.path["id"], action)

    return handler


async def queue_cancel(call: Call) -> Any:
    return await call.run(queue_ops.queue_cancel, call.actor, call.path["id"])


# --- the console's overview (relay.admin.overview) ------------------------------------


async def stats_overview(call: Call) -> Any:
    return await call.run(
        overview.overview,
        window=call.query.get("window", "1h"),
        low=call.query.get("low", overview.LOW_BALANCE),
    )
