"""Delivery: a message's way from the charge to its upstream, across its route chain.

`chain` walks the routes a message may take (failover); `forward` is the
session's forward around it (the walk, the settle, the record, the log line);
`submitted` is what a delivery record names of a message.
"""
