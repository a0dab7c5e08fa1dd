"""A load benchmark for the relay: `python -m bench`, or `make bench`.

On loopback it starts an upstream sink, the relay forwarding to it, and a bare
aiosmtpd TLS server with AUTH as the ceiling, then drives both with the same
client and reports the relay as a fraction of that ceiling, side by side.
`python -m bench --help` lists the knobs; `--target HOST:PORT --token T` points
the client at any SMTPS server on this host instead.

Modules: `client` (the SMTPS load client), `servers` (sink and ceiling, run as
their own processes), `stack` (starting and stopping those and the relay),
`proc` (CPU and memory from /proc), `run` (the phases), `report` (figures,
targets, table), `cli` (arguments).
"""
