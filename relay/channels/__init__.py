"""The upstreams: each channel a message can leave by, behind one interface.

`base` holds the interface (`Channel.deliver`) and the outcome (`Delivery`);
`resend`, `cloudflare` and `smtp_upstream` implement it (each with its
provider's error table), `httpapi` is what the two HTTP ones share, `pacing`
their token buckets; aiosmtplib's internals are touched only in
`aiosmtplib_compat`.

May import: the core only; never `relay.smtp`, `relay.store.facade` or `relay.admin.app`
(tests/test_layers.py).
"""
