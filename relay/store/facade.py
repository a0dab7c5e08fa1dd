"""The store: one `Store` over the relay's database (`AsyncStore`, in `relay.store.loop`,
is the same for the event loop).

Each concept has its own module, which states its guarantees:

- `relay.store.db`: the connection, write transactions, migrations, checkpoints
  (`relay.store.postgres`: the same on PostgreSQL, for a store many relays share)
- `relay.store.accounts`: accounts, their domains, the verified and no-limit lists
- `relay.store.tokens`: API tokens, stored only as SHA-256 hashes, and their rules
- `relay.store.rates`: each token's rate windows, counted by the charge
- `relay.store.senders`: senders' balances; `relay.store.limits`: the send-limit windows
- `relay.store.ledger`: the atomic, never-negative charge (`reserve`), its
  `settle`, and the sweep of charges a dead process left (`relay.store.charge`:
  the statements they share with MAIL FROM's check)
- `relay.store.journal`: settles the database could not take, fsync'd to a file so
  they outlive the process, applied before any sweep
- `relay.store.idempotency`: messages an idempotent upstream took, so a retry is not
  charged twice
- `relay.store.throttle`: failed AUTH attempts per client address, across processes
- `relay.store.refusals`: messages refused at the end of DATA per token, across processes
- `relay.store.deliveries`: the delivery log, written with each settle
- `relay.store.admins`: the admin API's tokens, apart from the sending tokens
- `relay.store.audit`: the audit log of operators' changes
- `relay.store.browse`: paged reads for the admin API (senders by prefix)
- `relay.store.suppressions`: each account's suppression list, fed by upstream refusals
- `relay.store.outbox`: each account's webhook endpoints and the outbox of their events
- `relay.store.stats`: the console's overview, aggregated by time bucket in the database

`Store` combines them, so admin commands and tests use one object. The runtime
calls go through `AsyncStore`, so a slow disk or a lock held by another
process never stalls the loop.
"""

from __future__ import annotations

from relay.errors import Refused, StoreBusy
from relay.store.accounts import Accounts
from relay.store.admins import AdminTokens
from relay.store.audit import Audit
from relay.store.browse import Browse
from relay.store.deliveries import Deliveries
from relay.store.idempotency import IDEMPOTENCY_WINDOW
from relay.store.ledger import Ledger, MailCheck, Reservation
from relay.store.limits import RELAY_SCOPE, SendLimits
from relay.store.outbox import Webhooks
from relay.store.queue import Queue
from relay.store.refusals import Refusals
from relay.store.senders import Senders
from relay.store.stats import Stats
from relay.store.suppressions import Suppressions
from relay.store.throttle import Throttle
from relay.store.tokens import TOKEN_PREFIX, Principal, Tokens, hash_token

__all__ = [
    "IDEMPOTENCY_WINDOW",
    "RELAY_SCOPE",
    "TOKEN_PREFIX",
    "MailCheck",
    "Principal",
    "Refused",
    "Reservation",
    "Store",
    "StoreBusy",
    "hash_token",
]


class Store(
    Accounts,
    Tokens,
    Senders,
    Ledger,
    SendLimits,
    Deliveries,
    Throttle,
    Refusals,
    AdminTokens,
    Audit,
    Browse,
    Queue,
    Suppressions,
    Webhooks,
    Stats,
):
    """The synchronous store. Admin commands use it directly; the server via `AsyncStore`."""
