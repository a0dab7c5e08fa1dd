"""Resend's events (POST /hooks/resend) on the delivery record of the message they
name: kept on the record (`relay log show`, the API), found by Resend's id for it
within the sending account; a forged event changes nothing (docs/events.md)."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from test_channels import MESSAGE_ID, RCPT, resend_env, send
from test_events import RESEND_SECRET, svix
from test_queue import records

from tests.fake_upstreams import FakeResend

pytestmark = pytest.mark.backends


def event(kind: str, email_id: str, to: str = RCPT, **extra: object) -> bytes:
    data = {
        "email_id": email_id,
        "from": "Alice <sender@example.com>",
        "to": [to],
        "subject": "hello",
        "created_at": "2026-03-01T12:00:00.000Z",
        **extra,
    }
    return json.dumps({"type": kind, "created_at": "2026-03-01T12:00:00Z", "data": data}).encode()


def test_resend_events_update_the_record_they_name(relay_factory):
    from test_cli import ok, relay_cli

    with FakeResend() as resend:
        relay = relay_factory(
            **resend_env(resend),
            DEFAULT_SEND_BALANCE="10",
            RELAY_ADMIN_LISTEN="127.0.0.1:0",
            RESEND_WEBHOOK_SECRET=RESEND_SECRET,
        )
        assert send(relay).startswith("250 2.0.0 Ok")
        [sent] = resend.sent
    [record] = records(relay)
    assert record.upstream_id == sent.id and record.provider_events == ()
    url = f"http://127.0.0.1:{relay.relay.admin_port}/hooks/resend"
    bounce = {"type": "Permanent", "subType": "Suppressed", "message": "mailbox does not exist"}
    bounced = event("email.bounced", sent.id, bounce=bounce)

    # Forged, stale and altered: refused, and the record is as it was.
    forged = svix(bounced, key="whsec_" + base64.b64encode(b"x" * 32).decode())
    for headers, body in ((forged, bounced), (svix(bounced, when=1), bounced)):
        assert httpx.post(url, content=body, headers=headers).status_code == 401
    assert httpx.post(url, content=bounced + b" ", headers=svix(bounced)).status_code == 401
    [record] = records(relay)
    assert record.provider_events == ()
    # An event naming another id changes no record either.
    other = event("email.delivered", "not-this-one")
    assert httpx.post(url, content=other, headers=svix(other, msg_id="m0")).status_code == 204

    delivered = event("email.delivered", sent.id)
    for body, msg_id in ((delivered, "m1"), (bounced, "m2"), (bounced, "m2")):  # m2 replayed
        assert httpx.post(url, content=body, headers=svix(body, msg_id=msg_id)).status_code == 204
    [record] = records(relay)
    assert [(e["provider"], e["type"], e["recipients"]) for e in record.provider_events] == [
        ("resend", "email.delivered", [RCPT]),
        ("resend", "email.bounced", [RCPT]),
    ]
    assert record.provider_events[1]["detail"] == ("Permanent Suppressed: mailbox does not exist")
    assert record.outcome == "delivered" and record.charged == 1  # what the relay did stays

    env = {"RELAY_DATABASE": str(relay.relay.settings.database)}
    shown = ok(relay_cli("log", "show", MESSAGE_ID, env=env))
    assert "provider events" in shown and "resend email.bounced" in shown
    assert "Permanent Suppressed: mailbox does not exist" in shown
    assert record.as_json()["provider_events"][0]["type"] == "email.delivered"
