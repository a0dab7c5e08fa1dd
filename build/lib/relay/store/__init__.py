"""The state: the relay's database behind one typed interface.

`facade` holds `Store` (the synchronous calls, one class composed of a mixin
per concept) and `AsyncStore` (the same calls for the event loop, awaited:
which connection, which thread and the group commit stay inside it). One
module per concept: `ledger` (balances and the charge), `windows` (send-limit
windows), `rates` (token rate windows), `accounts`, `tokens`, `admins`, `audit`,
`deliveries` (the delivery log), `idempotency`, `throttle` (failed AUTH),
`refusals`, `journal` (settles kept on disk), `browse` (paged reads); `db`,
`postgres` and `schema` are the connection, the PostgreSQL backend and the
migrations; `transfer` copies a SQLite install to PostgreSQL.

May import: the core only; never `relay.smtp`, `relay.channels` or
`relay.admin` (tests/test_layers.py).
"""
