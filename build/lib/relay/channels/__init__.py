"""The upstreams: each channel a message can leave by, behind one interface.

`base` holds the interface (`Channel.deliver`) and the outcome (`Delivery`);
`resend`, `cloudflare` and `smtp_upstream` implement it (each with its
provider's error table), `httpapi` is what the two HTTP ones share, `pacing`
their token buckets; aiosmtplib's internals are touched only in
`aiosmtplib_compat`. `build_channels` makes the channels the settings
configure, each under the name the routing (`relay.policy`) chooses it by.

May import: the core only; never `relay.smtp`, `relay.store` or `relay.admin`
(tests/test_layers.py).
"""

from __future__ import annotations

from relay.channels.base import Channel, OutboxChannel
from relay.channels.smtp_upstream import SmtpChannel
from relay.config import Settings
from relay.policy import Channel as ChannelName


def build_channels(settings: Settings) -> dict[ChannelName, Channel]:
    channels: dict[ChannelName, Channel] = {}
    if settings.cloudflare:
        from relay.channels.cloudflare import CloudflareChannel

        channels[ChannelName.CLOUDFLARE] = CloudflareChannel(
            settings.cloudflare, timeout=settings.upstream_timeout
        )
    if settings.resend.configured:
        from relay.channels.resend import ResendChannel

        channels[ChannelName.RESEND] = ResendChannel(
            settings.resend,
            timeout=settings.upstream_timeout,
            budget=settings.forward_budget,
            workers=settings.workers,
        )
    if settings.smtp_config:
        channels[ChannelName.SMTP] = SmtpChannel(
            settings.smtp_config,
            timeout=settings.upstream_timeout,
            local_hostname=settings.hostname,
            budget=settings.forward_budget,
        )
    if settings.dev_outbox:
        channels[ChannelName.OUTBOX] = OutboxChannel(settings.dev_outbox)
    return channels
