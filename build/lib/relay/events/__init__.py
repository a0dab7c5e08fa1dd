"""What happens after the reply, told to the account's application: webhooks, and
the operators' side of the suppression list.

`urls` decides which endpoint a webhook may reach (SSRF), `signing` signs as the
Standard Webhooks specification says, `sender` sends the store's outbox
(`relay.store.outbox`) with retries, and `manage` holds the operations the CLI
and the admin API both call. The events themselves are written by the store,
in the transaction of the record they describe.

May import: the core and `relay.store`; `relay.admin` and the top import it
(tests/test_layers.py).
"""
