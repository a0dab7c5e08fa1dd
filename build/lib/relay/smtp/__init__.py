"""The wire: one client connection from accept to QUIT.

The accept loop and its connection caps (`listener`, `admission`), the SMTP
protocol narrowed to the documented endpoint with the AUTH exchange
(`protocol`), the MAIL, RCPT and DATA hooks (`session`), and the DATA upload
(`upload`, a pure state machine; `spool`, where a large one waits). aiosmtpd's
private names are touched only in `aiosmtpd_compat`.

May import: the core (`relay.config`, `errors`, `replies`, `policy`, `message`,
`metrics`, `logs`, `network`), `relay.store` and `relay.channels`; never
`relay.admin` (tests/test_layers.py).
"""
