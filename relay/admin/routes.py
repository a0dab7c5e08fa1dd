"""The admin API's route table: each route's method, path, parameters, body and answer,
which both check the request and make the OpenAPI document (relay.admin.openapi)."""

from __future__ import annotations

from relay.admin import events_api, handlers, overview
from relay.admin.openapi import PREFIX, Endpoint, Field, Param
from relay.store.deliveries import Outcome
from relay.store.queue import STATES as QUEUE_STATES

ACCOUNT_FIELDS = (
    "the account: `id`, `name`, `created`, `queue` (null: the relay's RELAY_QUEUE),"
    " `disabled` (unix seconds it was disabled; null: enabled)"
)
NO_ACCOUNT = {"404": "no such account (`no_such_account`)"}
BAD_BODY = {"400": "the body is not JSON (`bad_json`)", "422": "a field is missing or wrong"}
BAD_ADDRESS = {"422": "not a usable email address (`bad_address`)"}
PAGING = (
    Param("limit", "rows at most (default 100, at most 1000)", "integer"),
    Param("cursor", "the `next_cursor` of the previous page"),
)
SENDER_FIELDS = (
    "the sender: `address`, `balance`, `enabled`, `created`, `updated` (unix seconds, null"
    " when no row), `unlimited` (on the no-limit list: sends without balance), `stored`"
    " (whether the relay holds a row for it)"
)
ADDRESS = Field("address", "string", "an email address", required=True, max_length=320)
TOKEN_RULES = (
    Field(
        "senders",
        "array",
        "the senders it may use: addresses, `*@domain` or domains, all of the account's"
        " domains (none: any address of them)",
        max_length=100,
    ),
    Field(
        "networks",
        "array",
        "CIDR ranges (IPv4, IPv6) it may AUTH from (none: anywhere)",
        max_length=100,
    ),
    Field(
        "rates",
        "array",
        "messages per window: `60/minute`, `1000/day` (none: no limit)",
        max_length=3,
    ),
    Field("rcpt_rates", "array", "recipients per window, as `rates`", max_length=3),
)
RULES_ANSWER = (
    "the token, never its secret: `id`, `account`, `name`, `role`, `created`, `expires`,"
    " `revoked`, `status` (active, revoked, expired), and its rules: `senders`, `networks`,"
    " `rates`, `rcpt_rates` (each empty when it has none)"
)
BAD_RULE = (
    "a field is missing or wrong (`bad_body`), or a rule is (`bad_sender`: not an address,"
    " `*@domain` or domain of the account; `bad_network`; `bad_rate`: not N/minute, N/hour"
    " or N/day with N from 1)"
)
verified_list, verified_add, verified_remove = handlers.lists("verified")
nolimit_list, nolimit_add, nolimit_remove = handlers.lists("nolimit")
NO_QUEUED = {
    "404": "no such queued message (`no_such_message`)",
    "422": "not a queued message's id (`bad_id`)",
}
QUEUE_FIELDS = (
    "a queued message: `id`, `message_id`, `created`, `account`, `sender`, `recipients`,"
    " `done` (each finished recipient's reply), `size`, `state` (queued or held), `tries`,"
    " `next_try` (unix seconds), `last_code`, `last_text`, `lease_owner` and `lease_until`"
    " (an attempt runs), `attempts` (channel, code, enhanced code, text, seconds)"
)

ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", f"{PREFIX}/accounts", "list accounts", handlers.list_accounts),
    Endpoint(
        "POST",
        f"{PREFIX}/accounts",
        "create an account",
        handlers.create_account,
        201,
        body=(Field("name", "string", "the account's name", required=True, max_length=100),),
        errors={**BAD_BODY, "409": "an account of that name exists (`account_exists`)"},
    ),
    Endpoint(
        "PATCH",
        f"{PREFIX}/accounts/{{name}}",
        "set an account's own settings",
        handlers.set_account,
        returns=ACCOUNT_FIELDS,
        body=(
            Field(
                "queue",
                "string",
                "its own RELAY_QUEUE: off, on-failure, always, or default (the relay's)",
                max_length=20,
            ),
        ),
        errors={**NO_ACCOUNT, **BAD_BODY},
    ),
    *(
        Endpoint(
            "POST",
            f"{PREFIX}/accounts/{{name}}/{action}",
            summary,
            handlers.account_switch(action == "disable"),
            returns=ACCOUNT_FIELDS,
            errors=NO_ACCOUNT,
        )
        for action, summary in (
            (
                "disable",
                "disable an account: its tokens fail AUTH as unknown ones do, its open"
                " sessions stop at their next MAIL; what is queued is still delivered",
            ),
            ("enable", "enable a disabled account: its tokens work again"),
        )
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/accounts/{{name}}",
        "delete an account: its tokens, domains, webhooks, suppressions and limits go;"
        " its delivery records and audit entries stay",
        handlers.delete_account,
        returns="`name`, `tokens` (the ids gone), `domains`, `webhooks`, `suppressions`"
        " (how many went)",
        errors={
            **NO_ACCOUNT,
            "409": "the queue holds messages of the account: cancel them or let them"
            " finish first (`account_has_queued`)",
        },
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/domains/{{domain}}/move",
        "move a sender domain to another account: from the next MAIL FROM only that"
        " account's tokens may send as it",
        handlers.move_domain,
        returns="`domain`, `from` (the account it left), `account` (the one it is on)",
        body=(
            Field("account", "string", "the account to move it to", required=True, max_length=100),
        ),
        errors={
            **BAD_BODY,
            "404": "no such account (`no_such_account`), or the domain is on none"
            " (`no_such_domain`)",
            "409": "the domain is on that account already (`same_account`)",
        },
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/accounts/{{name}}/domains",
        "list an account's sender domains",
        handlers.list_domains,
        errors=NO_ACCOUNT,
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/accounts/{{name}}/domains",
        "onboard a sender domain on an account",
        handlers.add_domain,
        201,
        body=(Field("domain", "string", "a domain name", required=True, max_length=255),),
        errors={
            **NO_ACCOUNT,
            **BAD_BODY,
            "409": "the domain is onboarded on an account already (`domain_taken`)",
        },
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/accounts/{{name}}/domains/{{domain}}",
        "remove a sender domain from an account",
        handlers.remove_domain,
        errors={"404": "no such account or domain on it"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/accounts/{{name}}/tokens",
        "list an account's sending tokens (never their secrets)",
        handlers.list_tokens,
        errors=NO_ACCOUNT,
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/accounts/{{name}}/tokens",
        "issue a sending token: the answer holds `token`, shown this once",
        handlers.create_token,
        201,
        body=(
            Field("name", "string", "a label", max_length=100),
            Field("expires_in_days", "number", "days until it expires (none: never)"),
            Field("role", "string", "a role, see NO_LIMIT_SEND_ROLE", max_length=100),
            *TOKEN_RULES,
        ),
        errors={**NO_ACCOUNT, **BAD_BODY, "422": BAD_RULE},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/tokens/{{id}}",
        "show a sending token and its rules (never its secret)",
        handlers.show_token,
        returns=RULES_ANSWER,
        errors={"404": "no token with that id (`no_such_token`)"},
    ),
    Endpoint(
        "PATCH",
        f"{PREFIX}/tokens/{{id}}",
        "replace a token's senders, networks, rates or rcpt_rates (the fields given; an"
        " empty list clears one); its open sessions follow from their next MAIL FROM, the"
        " networks from their next AUTH",
        handlers.set_token,
        returns=RULES_ANSWER,
        body=TOKEN_RULES,
        errors={**BAD_BODY, "404": "no token with that id (`no_such_token`)", "422": BAD_RULE},
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/tokens/{{id}}",
        "revoke a sending token (its open sessions stop at their next MAIL or end of DATA)",
        handlers.revoke_token,
        errors={"404": "no active token with that id (`no_such_token`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/senders",
        "list sender rows by address, a page at a time",
        handlers.list_senders,
        query=(Param("prefix", "only addresses that start with this"), *PAGING),
        errors={"422": "a bad query parameter (`bad_query`, `bad_limit`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/senders/{{address}}",
        "show one sender's balance and state",
        handlers.show_sender,
        returns=SENDER_FIELDS + "; an address never charged shows DEFAULT_SEND_BALANCE,"
        " `enabled: true`, `stored: false`",
        errors=BAD_ADDRESS,
    ),
    Endpoint(
        "PATCH",
        f"{PREFIX}/senders/{{address}}",
        "set a sender's balance and/or enabled state (creates the row when missing)",
        handlers.set_sender,
        returns=SENDER_FIELDS,
        body=(
            Field("balance", "integer", "the new balance (0 or more)"),
            Field("enabled", "boolean", "whether the sender may send"),
        ),
        errors={**BAD_BODY, **BAD_ADDRESS},
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/senders/{{address}}",
        "delete a sender row (it starts again from DEFAULT_SEND_BALANCE)",
        handlers.delete_sender,
        errors={**BAD_ADDRESS, "404": "no sender row (`no_such_sender`)"},
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/senders/{{address}}/topup",
        "add to a sender's balance (negative: take away; creates the row when missing)",
        handlers.topup_sender,
        returns=SENDER_FIELDS,
        body=(Field("amount", "integer", "units to add", required=True),),
        errors={**BAD_BODY, "409": "the balance would go below 0 (`balance_negative`)"},
    ),
    Endpoint("GET", f"{PREFIX}/verified", "list verified recipients", verified_list),
    Endpoint(
        "POST",
        f"{PREFIX}/verified",
        "add a verified recipient (adding it twice is no error)",
        verified_add,
        201,
        body=(ADDRESS,),
        errors=BAD_BODY,
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/verified/{{address}}",
        "remove a verified recipient",
        verified_remove,
        errors={**BAD_ADDRESS, "404": "not on the list (`not_on_list`)"},
    ),
    Endpoint("GET", f"{PREFIX}/nolimit", "list senders that send without balance", nolimit_list),
    Endpoint(
        "POST",
        f"{PREFIX}/nolimit",
        "add a sender to the no-limit list (adding it twice is no error)",
        nolimit_add,
        201,
        body=(ADDRESS,),
        errors=BAD_BODY,
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/nolimit/{{address}}",
        "remove a sender from the no-limit list",
        nolimit_remove,
        errors={**BAD_ADDRESS, "404": "not on the list (`not_on_list`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/limits",
        "send limits, with the counts of the current UTC day and month and their resets",
        handlers.show_limits,
    ),
    Endpoint(
        "PUT",
        f"{PREFIX}/limits",
        "set the relay's (or one account's) daily and/or monthly limit",
        handlers.set_limits,
        body=(
            Field("daily", "integer", "-1 unlimited, 0 blocks sending, or a count"),
            Field("monthly", "integer", "-1 unlimited, 0 blocks sending, or a count"),
            Field("account", "string", "limit this account instead of the relay", max_length=100),
        ),
        errors={**BAD_BODY, **NO_ACCOUNT},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/log",
        "the delivery log, newest first (the filters of `relay log`)",
        handlers.find_log,
        query=(
            Param("since", "a duration back (2h, 1d) or an ISO 8601 time"),
            Param("until", "a duration back (2h, 1d) or an ISO 8601 time"),
            Param("sender", "the envelope sender"),
            Param("recipient", "one of the recipients"),
            Param("account", "the account's name"),
            Param("outcome", "the message's outcome", enum=tuple(str(o) for o in Outcome)),
            Param("channel", "the channel that answered (`none`: refused before any)"),
            Param("message_id", "the Message-ID, with or without its angle brackets"),
            Param("limit", "records at most (default 50)", "integer"),
            Param("cursor", "the `next_cursor` of the previous page", "integer"),
        ),
        errors={"422": "a bad filter (`bad_query`, `bad_time`, `bad_limit`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/log/{{message_id:path}}",
        "everything recorded for a Message-ID (a retried message has several records)",
        handlers.show_log,
        errors={
            "404": "no record (`no_such_message`)",
            "422": "a blank Message-ID (`bad_message_id`)",
        },
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/audit",
        "the audit log of changes, newest first",
        handlers.list_audit,
        query=(
            Param("limit", "records at most (default 100, at most 1000)", "integer"),
            Param("cursor", "the `next_cursor` of the previous page", "integer"),
        ),
        errors={"422": "a bad query parameter"},
    ),
    # --- the durable queue (docs/queue.md)
    Endpoint(
        "GET",
        f"{PREFIX}/queue",
        "queued messages, oldest first (`relay queue list`)",
        handlers.queue_list,
        query=(
            Param("state", "only messages in this state", enum=QUEUE_STATES),
            Param("account", "only this account's messages"),
        ),
        returns=QUEUE_FIELDS,
        errors={"422": "a bad filter (`bad_query`, `bad_state`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/queue/{{id}}",
        "one queued message with its attempts and next try (`relay queue show`)",
        handlers.queue_show,
        returns=QUEUE_FIELDS,
        errors=NO_QUEUED,
    ),
    *(
        Endpoint(
            "POST",
            f"{PREFIX}/queue/{{id}}/{action}",
            f"{summary}; `all` for every queued message (`relay queue {action}`)",
            handlers.queue_action(action),
            returns="`action`, `changed`: how many messages it changed",
            errors=NO_QUEUED,
        )
        for action, summary in (
            ("retry", "make a queued message due now"),
            ("hold", "hold a queued message: no attempt until released"),
            ("release", "release a held message"),
        )
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/queue/{{id}}/cancel",
        "end a queued message: the undelivered part refunded, a final record (`550 5.0.0`)",
        handlers.queue_cancel,
        returns="`id`, `cancelled`, `refunded`: the units given back",
        errors={**NO_QUEUED, "409": "an attempt holds it now (`attempt_running`)"},
    ),
    # --- the console's overview (relay.admin.overview, relay.store.stats)
    Endpoint(
        "GET",
        f"{PREFIX}/stats/overview",
        "what the relay did over a window, aggregated in the store: messages per bucket"
        " by outcome, refusals by reply, each channel's messages, errors and forward"
        " times, the top senders today, the senders running low, and the queue",
        handlers.stats_overview,
        query=(
            Param("window", "1h (minutes), 24h or 7d (hours)", enum=tuple(overview.WINDOWS)),
            Param("low", "a balance at or under this is running low (default 10)", "integer"),
        ),
        returns=(
            "`window`, `now`, `start`, `step` (seconds), `buckets`; `series`: per outcome"
            " a count per bucket; `totals`: per outcome; `refusals`: `outcome`, `code`,"
            " `enhanced`, `messages` (the 10 most frequent); `channels`: `channel`,"
            " `messages`, `errors` (refused or deferred), `error_rate`, `p50_ms`, `p90_ms`,"
            " `p99_ms` (the upper bound of the forward-time band, null past 60 s);"
            " `top_senders`: `sender`, `messages` (today, UTC); `low_balances`: `address`,"
            " `balance`; `queue`: `states`, `depth`, `oldest_age` (seconds)"
        ),
        errors={"422": "a bad query parameter (`bad_query`, `bad_window`)"},
    ),
]
ENDPOINTS += events_api.ENDPOINTS
