"""The admin API on the admin listener, against the real relay over HTTP."""

from __future__ import annotations

import json
import logging
import re
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import DOMAIN, SENDER, message

from relay import cli
from relay.admin.calls import MAX_BODY
from relay.admin.openapi import Endpoint, Field, check_body, check_query
from relay.admin.routes import ENDPOINTS
from relay.errors import Invalid
from relay.store.facade import Store

ROOT = Path(__file__).resolve().parent.parent


class Admin:
    """An HTTP client of one relay's admin listener, with an admin token."""

    def __init__(self, relay: Any, base: str, **client: Any) -> None:
        self.relay = relay
        self.base = base
        self.token = relay.store.create_admin_token(name="tests")["token"]
        self.http = httpx.Client(base_url=base, timeout=10, **client)

    def __call__(self, method: str, path: str, token: str | None = "", **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token or self.token}")
        return self.http.request(method, "/api/v1" + path, headers=headers, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = self(method, path, **kwargs)
        assert response.status_code == status, response.text
        return response.json()

    def fails(self, method: str, path: str, status: int, code: str, **kwargs: Any) -> None:
        response = self(method, path, **kwargs)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code, response.text
        assert "Traceback" not in response.text


@pytest.fixture
def admin_for() -> Any:
    """`admin_for(relay, base, **client)`: an `Admin`, closed at teardown."""
    made: list[Admin] = []

    def make(relay: Any, base: str, **client: Any) -> Admin:
        made.append(Admin(relay, base, **client))
        return made[-1]

    yield make
    for each in made:
        each.http.close()


@pytest.fixture
def admin(relay_factory: Callable[..., Any], sink: Any, admin_for: Any) -> Admin:
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="5",
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
        # The 401 tests fail often from 127.0.0.1; the throttle has its own test.
        RELAY_AUTH_FAILURE_LIMIT="100000",
    )
    return admin_for(relay, f"http://127.0.0.1:{relay.relay.admin_port}")


def audit_actions(admin: Admin) -> list[tuple[str, str, str]]:
    records = admin.ok("GET", "/audit")["records"]
    return [(r["action"], r["target"], r["actor"]) for r in reversed(records)]


def example_path(endpoint: Endpoint) -> str:
    values = {"name": "acme", "domain": DOMAIN, "id": "tok_none", "address": SENDER,
              "message_id": "<none@example.com>", "event_id": "evt_none"}  # fmt: skip
    return re.sub(r"{(\w+)(?::\w+)?}", lambda m: values[m.group(1)], endpoint.path)[
        len("/api/v1") :
    ]


# --- authentication ------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
def test_every_route_refuses_without_an_admin_token(admin, endpoint):
    sending = admin.relay.token()
    path = example_path(endpoint)
    body = {"json": {}} if endpoint.body is not None else {}
    for token, header in (
        (None, None),
        ("rla_wrong", None),
        (sending, None),
        (None, f"Basic {admin.token}"),
    ):
        headers = {"Authorization": header} if header else {}
        response = admin(endpoint.method, path, token=token, headers=headers, **body)
        assert response.status_code == 401, (token, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_revoked_and_expired_admin_tokens_are_refused(admin):
    store = admin.relay.store
    revoked = store.create_admin_token()
    store.revoke_admin_token(revoked["id"])
    admin.fails("GET", "/accounts", 401, "unauthorized", token=revoked["token"])
    expired = store.create_admin_token(expires_in_days=1)
    store.db.execute("UPDATE admin_tokens SET expires = 1 WHERE id = ?", (expired["id"],))
    admin.fails("GET", "/accounts", 401, "unauthorized", token=expired["token"])
    # An admin token is no SMTP password either.
    with admin.relay.connect() as client, pytest.raises(smtplib.SMTPAuthenticationError):
        client.login("api_token", admin.token)


def test_failed_attempts_share_the_smtp_throttle(relay_factory, sink, admin_for):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
        RELAY_AUTH_FAILURE_LIMIT="3",
    )
    admin = admin_for(relay, f"http://127.0.0.1:{relay.relay.admin_port}")
    admin.ok("GET", "/accounts")
    admin.fails("GET", "/accounts", 401, "unauthorized", token="rla_wrong")
    admin.fails("GET", "/accounts", 401, "unauthorized", token=None)
    # A failed SMTP AUTH from the same address is the third.
    with relay.connect() as client, pytest.raises(smtplib.SMTPAuthenticationError):
        client.login("api_token", "rlt_wrong")
    response = admin("GET", "/accounts")  # even the good token, until the window passes
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "throttled"
    assert int(response.headers["retry-after"]) > 0
    # And the SMTP side sees the API's failures: its greeting refuses the address.
    raw = relay.raw()
    assert raw.greeting.startswith("421 4.7.0")


def test_the_api_throttle_starts_at_exactly_the_limit(relay_factory, sink, admin_for):
    # API failures only: smtplib's login records two failures (PLAIN, then LOGIN),
    # which would hide an off-by-one at the limit.
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
        RELAY_AUTH_FAILURE_LIMIT="3",
    )
    admin = admin_for(relay, f"http://127.0.0.1:{relay.relay.admin_port}")
    for _ in range(2):
        admin.fails("GET", "/accounts", 401, "unauthorized", token="rla_wrong")
    admin.ok("GET", "/accounts")  # one fewer than the limit: the good token still works
    admin.fails("GET", "/accounts", 401, "unauthorized", token="rla_wrong")
    admin.fails("GET", "/accounts", 429, "throttled")  # exactly the limit


# --- resources -------------------------------------------------------------------------


def test_accounts_domains_and_their_errors(admin):
    assert admin.ok("GET", "/accounts") == {"accounts": []}
    created = admin.ok("POST", "/accounts", 201, json={"name": "acme"})
    assert created["name"] == "acme"
    admin.fails("POST", "/accounts", 409, "account_exists", json={"name": "acme"})
    admin.fails("POST", "/accounts", 422, "bad_name", json={"name": " "})
    admin.fails("POST", "/accounts", 422, "bad_name", json={"name": "a/b"})
    [row] = admin.ok("GET", "/accounts")["accounts"]
    assert row["name"] == "acme"

    added = admin.ok("POST", "/accounts/acme/domains", 201, json={"domain": "Example.COM"})
    assert added == {"account": "acme", "domain": DOMAIN}
    admin.ok("POST", "/accounts", 201, json={"name": "other"})
    admin.fails("POST", "/accounts/other/domains", 409, "domain_taken", json={"domain": DOMAIN})
    admin.fails(
        "POST", "/accounts/nobody/domains", 404, "no_such_account", json={"domain": "x.test"}
    )
    admin.fails(
        "POST", "/accounts/acme/domains", 422, "bad_domain", json={"domain": "not a domain"}
    )
    [domain] = admin.ok("GET", "/accounts/acme/domains")["domains"]
    assert (domain["account"], domain["domain"]) == ("acme", DOMAIN)
    admin.fails("GET", "/accounts/nobody/domains", 404, "no_such_account")
    admin.fails("DELETE", "/accounts/other/domains/example.com", 404, "no_such_domain")
    removed = admin.ok("DELETE", f"/accounts/acme/domains/{DOMAIN}")
    assert removed == {"account": "acme", "domain": DOMAIN, "removed": True}
    assert admin.ok("GET", "/accounts/acme/domains") == {"domains": []}

    who = admin.relay.store.list_admin_tokens()[0]["id"]
    assert audit_actions(admin) == [
        ("account.create", "acme", who),
        ("domain.add", "acme", who),
        ("account.create", "other", who),
        ("domain.remove", "acme", who),
    ]
    [last] = admin.ok("GET", "/audit", params={"limit": 1})["records"]
    assert (last["address"], last["detail"]) == ("127.0.0.1", {"domain": DOMAIN})


def test_a_token_made_by_the_api_sends_until_the_api_revokes_it(admin, sink):
    admin.ok("POST", "/accounts", 201, json={"name": "acme"})
    admin.ok("POST", "/accounts/acme/domains", 201, json={"domain": DOMAIN})
    created = admin.ok(
        "POST", "/accounts/acme/tokens", 201, json={"name": "app", "expires_in_days": 30}
    )
    assert created["token"].startswith("rlt_") and created["id"].startswith("tok_")
    [listed] = admin.ok("GET", "/accounts/acme/tokens")["tokens"]
    assert (listed["id"], listed["name"], listed["status"]) == (created["id"], "app", "active")
    assert "token" not in listed and "hash" not in listed
    assert created["token"] not in json.dumps(admin.ok("GET", "/audit"))

    with admin.relay.connect() as client:
        client.login("api_token", created["token"])
        client.sendmail(SENDER, ["rcpt@dest.test"], message())
    assert len(sink.messages) == 1

    assert admin.ok("DELETE", f"/tokens/{created['id']}") == {"id": created["id"], "revoked": True}
    admin.fails("DELETE", f"/tokens/{created['id']}", 404, "no_such_token")
    raw = admin.relay.raw()
    assert raw.login(created["token"]).startswith("535 5.7.8")
    [listed] = admin.ok("GET", "/accounts/acme/tokens")["tokens"]
    assert listed["status"] == "revoked"

    admin.fails("POST", "/accounts/nobody/tokens", 404, "no_such_account", json={})
    for bad in ({"expires_in_days": 0}, {"expires_in_days": -1}, {"expires_in_days": 1e300}):
        admin.fails("POST", "/accounts/acme/tokens", 422, "bad_expiry", json=bad)
    admin.fails("POST", "/accounts/acme/tokens", 422, "bad_body", json={"expires_in_days": "1"})
    assert [a[0] for a in audit_actions(admin)][-2:] == ["token.create", "token.revoke"]


def test_a_topup_through_the_api_is_what_the_cli_shows(admin, monkeypatch, capsys):
    address = "Payer@Example.com"
    # Never charged: the DEFAULT_SEND_BALANCE (5 here) it would send with, no row yet.
    assert admin.ok("GET", f"/senders/{address}") == {
        "address": "payer@example.com", "balance": 5, "enabled": True, "created": None,
        "updated": None, "unlimited": False, "stored": False,
    }  # fmt: skip
    admin.ok("POST", "/nolimit", 201, json={"address": address})
    assert admin.ok("GET", f"/senders/{address}")["unlimited"] is True
    admin.ok("DELETE", f"/nolimit/{address}")
    topped = admin.ok("POST", f"/senders/{address}/topup", json={"amount": 25})
    assert (topped["address"], topped["balance"], topped["enabled"], topped["stored"]) == (
        "payer@example.com",
        25,
        True,
        True,
    )
    monkeypatch.setenv("RELAY_DATABASE", str(admin.relay.relay.settings.database))
    assert cli.main(["sender", "show", address, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == admin.ok("GET", f"/senders/{address}")
    assert shown["balance"] == 25

    admin.fails("POST", f"/senders/{address}/topup", 409, "balance_negative", json={"amount": -26})
    admin.fails("POST", f"/senders/{address}/topup", 422, "bad_body", json={"amount": "5"})
    admin.fails("POST", f"/senders/{address}/topup", 422, "bad_body", json={"amount": True})
    admin.fails("POST", f"/senders/{address}/topup", 422, "bad_body", json={})
    admin.fails("POST", "/senders/not-an-address/topup", 422, "bad_address", json={"amount": 1})
    edited = admin.ok("PATCH", f"/senders/{address}", json={"balance": 3, "enabled": False})
    assert (edited["balance"], edited["enabled"]) == (3, False)
    admin.fails("PATCH", f"/senders/{address}", 422, "bad_balance", json={"balance": -1})
    admin.fails("PATCH", f"/senders/{address}", 422, "bad_body", json={"enabled": "no"})
    assert admin.ok("DELETE", f"/senders/{address}") == {
        "address": "payer@example.com",
        "deleted": True,
    }
    admin.fails("DELETE", f"/senders/{address}", 404, "no_such_sender")
    assert admin.ok("GET", f"/senders/{address}")["stored"] is False
    actions = [a[0] for a in audit_actions(admin)]
    assert actions == ["nolimit.add", "nolimit.remove", "sender.topup", "sender.set",
                       "sender.delete"]  # fmt: skip
    assert cli.main(["audit", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["action"], r["detail"]) for r in lines][-3] == ("sender.topup", {"amount": 25})


def test_senders_are_paged_by_prefix(admin):
    for n in range(5):
        admin.relay.store.set_sender(f"a{n}@example.com", balance=n)
    admin.relay.store.set_sender("b@example.com", balance=9)
    first = admin.ok("GET", "/senders", params={"prefix": "A", "limit": 2})
    assert [s["address"] for s in first["senders"]] == ["a0@example.com", "a1@example.com"]
    rest: list[str] = []
    cursor = first["next_cursor"]
    while cursor:
        page = admin.ok("GET", "/senders", params={"prefix": "a", "limit": 2, "cursor": cursor})
        rest += [s["address"] for s in page["senders"]]
        cursor = page["next_cursor"]
    assert rest == ["a2@example.com", "a3@example.com", "a4@example.com"]
    assert len(admin.ok("GET", "/senders")["senders"]) == 6
    admin.fails("GET", "/senders", 422, "bad_limit", params={"limit": 0})
    admin.fails("GET", "/senders", 422, "bad_query", params={"limit": "many"})
    admin.fails("GET", "/senders", 422, "bad_query", params={"prefx": "a"})


@pytest.mark.parametrize("kind", ["verified", "nolimit"])
def test_address_lists(admin, kind):
    assert admin.ok("GET", f"/{kind}") == {"addresses": []}
    added = admin.ok("POST", f"/{kind}", 201, json={"address": "Who@Dest.test"})
    assert added == {"address": "who@dest.test", "added": True}
    admin.ok("POST", f"/{kind}", 201, json={"address": "who@dest.test"})  # twice: no error
    [row] = admin.ok("GET", f"/{kind}")["addresses"]
    assert row["address"] == "who@dest.test"
    admin.fails("POST", f"/{kind}", 422, "bad_address", json={"address": "nope"})
    admin.fails("POST", f"/{kind}", 422, "bad_body", json={"address": ["x@y.test"]})
    assert admin.ok("DELETE", f"/{kind}/who@dest.test")["removed"] is True
    admin.fails("DELETE", f"/{kind}/who@dest.test", 404, "not_on_list")
    assert [a[0] for a in audit_actions(admin)] == [f"{kind}.add", f"{kind}.add", f"{kind}.remove"]


def test_limits_show_counts_and_resets(admin):
    admin.relay.store.create_account("acme")
    admin.relay.store.add_domain("acme", DOMAIN)
    [relay_scope] = admin.ok("GET", "/limits")["limits"]
    assert relay_scope["scope"] == "relay" and relay_scope["daily"] == -1
    set_ = admin.ok("PUT", "/limits", json={"daily": 10, "monthly": 100, "account": "acme"})
    assert (set_["scope"], set_["daily"], set_["monthly"]) == ("acme", 10, 100)
    admin.ok("PUT", "/limits", json={"daily": 50})
    with admin.relay.login() as client:
        client.sendmail(SENDER, ["a@dest.test", "b@dest.test"], message())
    limits = {row["scope"]: row for row in admin.ok("GET", "/limits")["limits"]}
    assert (limits["relay"]["daily"], limits["relay"]["daily_count"]) == (50, 2)
    assert (limits["acme"]["monthly_count"], limits["acme"]["monthly"]) == (2, 100)
    assert limits["acme"]["daily_resets_at"].endswith("+00:00")
    admin.fails("PUT", "/limits", 422, "bad_limits", json={})
    admin.fails("PUT", "/limits", 422, "bad_daily", json={"daily": -2})
    admin.fails("PUT", "/limits", 404, "no_such_account", json={"daily": 1, "account": "x"})
    assert [a[:2] for a in audit_actions(admin)] == [
        ("limits.set", "acme"),
        ("limits.set", "relay"),
    ]


def test_the_delivery_log_with_filters_and_pages(admin, sink):
    sink.recorder.rcpt_replies["bad@dest.test"] = "550 5.1.1 No such user"
    token = admin.relay.token()
    with admin.relay.login(token) as client:
        for n in range(3):
            client.sendmail(SENDER, ["ok@dest.test"], message(extra=f"Message-ID: <m{n}@x>\r\n"))
        client.sendmail(
            SENDER, ["ok@dest.test", "bad@dest.test"], message(extra="Message-ID: <p@x>\r\n")
        )
    records = admin.ok("GET", "/log")["records"]
    assert [r["message_id"] for r in records] == ["<p@x>", "<m2@x>", "<m1@x>", "<m0@x>"]
    [partial] = admin.ok("GET", "/log", params={"outcome": "partial"})["records"]
    assert {(r["address"], r["code"]) for r in partial["recipients"]} == {
        ("ok@dest.test", 250),
        ("bad@dest.test", 550),
    }
    assert admin.ok("GET", "/log", params={"recipient": "bad@dest.test"})["records"] == [partial]
    assert admin.ok("GET", "/log", params={"sender": SENDER.upper(), "since": "1h"})["records"]
    assert admin.ok("GET", "/log", params={"account": "other"})["records"] == []
    page = admin.ok("GET", "/log", params={"limit": 3})
    assert len(page["records"]) == 3
    nxt = admin.ok("GET", "/log", params={"limit": 3, "cursor": page["next_cursor"]})
    assert [r["message_id"] for r in nxt["records"]] == ["<m0@x>"]
    shown = admin.ok("GET", "/log/<m1@x>")["records"]
    assert [r["message_id"] for r in shown] == ["<m1@x>"]
    assert shown[0]["reply"]["code"] == 250 and shown[0]["upstream_id"]
    admin.fails("GET", "/log/<nothing@x>", 404, "no_such_message")
    # A Message-ID with or without its angle brackets, as people paste it.
    for written in ("<m1@x>", "m1@x", " m1@x "):
        [found] = admin.ok("GET", "/log", params={"message_id": written})["records"]
        assert found["message_id"] == "<m1@x>"
        assert admin.ok("GET", f"/log/{written.strip()}")["records"] == shown
    admin.fails("GET", "/log/%20", 422, "bad_message_id")
    admin.fails("GET", "/log", 422, "bad_time", params={"since": "yesterday"})
    # Past year 1: the same answer, never a 500.
    for name, value in (
        ("since", "1000000d"),
        ("until", "999999999w"),
        ("since", "9" * 5000 + "s"),
    ):
        admin.fails("GET", "/log", 422, "bad_time", params={name: value})
    admin.fails("GET", "/log", 422, "bad_query", params={"outcome": "lost"})
    admin.fails("GET", "/log", 422, "bad_query", params={"cursor": "x"})
    # By channel: the one that answered, or `none` for messages refused before any.
    assert len(admin.ok("GET", "/log", params={"channel": "smtp"})["records"]) == 4
    assert admin.ok("GET", "/log", params={"channel": "resend"})["records"] == []
    with admin.relay.login(token) as client:
        with pytest.raises(smtplib.SMTPDataError):  # From: a domain not the account's
            client.sendmail(SENDER, ["ok@dest.test"], message(sender="app@elsewhere.test"))
    refused = admin.ok("GET", "/log", params={"channel": "none", "account": "acme"})["records"]
    assert [(r["channel"], r["outcome"]) for r in refused] == [("", "refused")]
    two = admin.ok("GET", "/log", params={"channel": "smtp", "limit": 2})
    rest = admin.ok("GET", "/log", params={"channel": "smtp", "cursor": two["next_cursor"]})
    assert [r["message_id"] for r in rest["records"]] == ["<m1@x>", "<m0@x>"]


# --- bad input -----------------------------------------------------------------------


def test_bad_bodies_are_json_errors_never_500(admin):
    admin.fails("POST", "/accounts", 400, "bad_json", content=b"{not json")
    admin.fails("POST", "/accounts", 400, "bad_json", content=b"[" * 60_000)  # deeper than json can
    admin.fails("POST", "/accounts", 422, "bad_body", json=["acme"])
    admin.fails("POST", "/accounts", 422, "bad_body", json={"name": 5})
    admin.fails("POST", "/accounts", 422, "bad_body", json={"name": "a", "extra": 1})
    admin.fails("POST", "/accounts", 422, "bad_body", content=b"")
    admin.fails("POST", "/accounts", 422, "bad_body", json={"name": "x" * 101})
    admin.fails("POST", "/accounts", 400, "bad_json", content=b"\xff\xfe")
    admin.fails("POST", "/accounts", 413, "body_too_large", content=b" " * (MAX_BODY + 1))
    huge = iter([b" " * 65536] * 4)  # chunked: no Content-Length to judge by
    admin.fails("POST", "/accounts", 413, "body_too_large", content=huge)
    admin.fails("PATCH", "/senders/a@b.test", 422, "bad_balance", json={"balance": 2**70})
    admin.fails("PATCH", "/senders/a@b.test", 422, "bad_balance", json={"balance": 2**63})
    admin.fails("GET", "/nothing", 404, "not_found")
    admin.fails("PUT", "/accounts", 405, "method_not_allowed")
    for endpoint in ENDPOINTS:
        for body in (
            b"null",
            b"1e999",
            b'{"a":',
            b'"x"',
            b"{}",
            json.dumps({"amount": -1}).encode(),
        ):
            response = admin(endpoint.method, example_path(endpoint), content=body)
            assert response.status_code < 500, (endpoint.path, body, response.text)


def test_headers_keep_the_console_and_api_safe(admin):
    vendored = ("/console/vendor/uPlot.iife.min.js", "/console/vendor/uPlot.min.css")
    scripts = tuple(f"/console/{n}.js" for n in ("app", "overview", "accounts", "log"))
    for path in ("/", *scripts, *vendored, "/api/v1/accounts", "/metrics"):
        response = admin.http.get(path, headers={"Authorization": f"Bearer {admin.token}"})
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "set-cookie" not in response.headers
    # What comes from outside is set as text: no script builds markup from a string.
    markup = re.compile(
        r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|\beval\(|new Function"
    )
    for path in scripts:
        assert not markup.search(admin.http.get(path).text), path
    page = admin.http.get("/").text
    assert "<script>" not in page and "<script " not in page.replace('<script src="/console/', "")
    assert 'content="relay.test"' in page  # the SMTP host for the client settings


# --- the OpenAPI document --------------------------------------------------------------


def test_the_openapi_document_matches_the_routes(admin):
    spec = admin.http.get("/api/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    implemented = {(e.method, e.openapi_path) for e in ENDPOINTS}
    assert implemented <= documented
    public = {("GET", "/api/v1/openapi.json"), ("GET", "/metrics"), ("GET", "/healthz"),
              ("GET", "/readyz"), ("POST", "/hooks/resend")}  # fmt: skip
    assert documented == implemented | public
    # A sender's fields are the ones its document names; one never charged is no 404.
    sender = spec["paths"]["/api/v1/senders/{address}"]["get"]["responses"]
    assert "404" not in sender
    assert all(
        f"`{key}`" in sender["200"]["description"] for key in admin.ok("GET", f"/senders/{SENDER}")
    )
    for route in admin.relay.relay._admin._server.config.app.routes:  # every served route
        path = re.sub(r"{(\w+)(?::\w+)?}", r"{\1}", route.path)
        if path.startswith("/api/"):
            assert {(m, path) for m in route.methods - {"HEAD"}} <= documented, path
    # Each documented route answers (whatever the resource says, the route exists).
    values = {"name": "acme", "domain": DOMAIN, "id": "tok_none", "address": SENDER,
              "message_id": "<none@example.com>", "event_id": "evt_none"}  # fmt: skip
    for path, operations in spec["paths"].items():
        for method in operations:
            url = re.sub(r"{(\w+)}", lambda m: values[m.group(1)], path)
            response = admin.http.request(
                method, url, headers={"Authorization": f"Bearer {admin.token}"}, json={}
            )
            assert response.status_code not in (405, 500), (method, path)
            if response.status_code == 404:
                assert response.json()["error"]["code"] != "not_found", (method, path)


# --- TLS off loopback -----------------------------------------------------------------


def test_off_loopback_the_listener_serves_tls_only(
    relay_factory, sink, cert_dir, caplog, admin_for
):
    caplog.set_level(logging.INFO, "relay")
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_ADMIN_LISTEN="0.0.0.0:0")
    port = relay.relay.admin_port
    trust = ssl.create_default_context(cafile=str(cert_dir / "relay.crt"))
    admin = admin_for(relay, f"https://localhost:{port}", verify=trust)
    assert admin.ok("GET", "/accounts") == {"accounts": []}
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert any(
        "https://0.0.0.0" in r.getMessage() and "TLS" in r.getMessage() for r in caplog.records
    )


def test_a_missing_admin_certificate_stops_the_start(relay_factory, sink, tmp_path):
    with pytest.raises(Exception, match="RELAY_ADMIN_TLS_CERT"):
        relay_factory(
            SMTP_CONFIG=sink.smtp_config(),
            RELAY_ADMIN_LISTEN="0.0.0.0:0",
            RELAY_ADMIN_TLS_CERT=str(tmp_path / "none.crt"),
        )


# --- the CLI's admin tokens and audit ---------------------------------------------------


def test_admin_token_commands(tmp_path):
    database = tmp_path / "relay.db"
    Store(database).migrate()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RELAY_DATABASE": str(database)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay", *args], env=env, capture_output=True, text=True
        )

    made = run("admin-token", "create", "--name", "ops", "--expires-in", "7")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("rla_")
    as_json = json.loads(run("admin-token", "create", "--json").stdout)
    assert as_json["token"].startswith("rla_") and as_json["id"].startswith("adm_")
    listed = json.loads(run("admin-token", "list", "--json").stdout)
    assert sorted(t["name"] for t in listed) == ["", "ops"]
    assert token not in json.dumps(listed) and "hash" not in listed[0]
    [ops] = [t for t in listed if t["name"] == "ops"]
    assert run("admin-token", "revoke", as_json["id"]).returncode == 0
    again = run("admin-token", "revoke", as_json["id"])
    assert again.returncode == 1 and "no active admin token" in again.stderr
    assert run("admin-token", "create", "--expires-in", "0").returncode == 1
    store = Store(database)
    assert store.authenticate_admin(token) == ops["id"]
    assert store.authenticate_admin(as_json["token"]) is None
    assert run("account", "create", "acme").returncode == 0
    audit = run("audit")
    assert audit.returncode == 0
    lines = audit.stdout.splitlines()
    assert lines[0].split()[:5] == ["TIME", "ACTOR", "ADDRESS", "ACTION", "TARGET"]
    assert [line.split()[4] for line in lines[1:]] == [
        "account.create",
        "admin_token.revoke",
        "admin_token.create",
        "admin_token.create",
    ]
    assert all(line.split()[2:4] == ["cli", "local"] for line in lines[1:])
    assert token not in audit.stdout


# --- the pure checks -------------------------------------------------------------------

BODY = Endpoint(
    "POST",
    "/x",
    "x",
    lambda call: None,
    body=(
        Field("name", "string", "", required=True, max_length=3),
        Field("n", "integer", ""),
        Field("f", "number", ""),
        Field("b", "boolean", ""),
    ),
)


@pytest.mark.parametrize(
    ("raw", "result"),
    [
        (b'{"name": "ab"}', {"name": "ab"}),
        (
            b'{"name": "ab", "n": 2, "f": 1.5, "b": false}',
            {"name": "ab", "n": 2, "f": 1.5, "b": False},
        ),
        (b'{"name": "ab", "n": null}', {"name": "ab"}),
        (b'{"name": "ab", "f": 2}', {"name": "ab", "f": 2}),
        (b'{"name": "abcd"}', "bad_body"),
        (b'{"name": null}', "bad_body"),
        (b'{"name": "a", "n": 1.5}', "bad_body"),
        (b'{"name": "a", "n": true}', "bad_body"),
        (b'{"name": "a", "f": true}', "bad_body"),
        (b'{"name": "a", "b": 1}', "bad_body"),
        (b'{"name": "a", "zz": 1}', "bad_body"),
        (b"{}", "bad_body"),
        (b"[]", "bad_body"),
        (b"", "bad_body"),
        (b"{", "bad_json"),
        (b"NaN", "bad_body"),
    ],
)
def test_check_body(raw, result):
    if isinstance(result, str):
        with pytest.raises(Invalid) as caught:
            check_body(BODY, raw)
        assert caught.value.code == result
    else:
        assert check_body(BODY, raw) == result


def test_check_query():
    [senders] = [e for e in ENDPOINTS if e.path.endswith("/senders") and e.method == "GET"]
    assert check_query(senders, {"prefix": "a", "limit": "5", "cursor": ""}) == {
        "prefix": "a",
        "limit": 5,
    }
    for bad in ({"limit": "5.0"}, {"limit": "9" * 30}, {"other": "1"}):
        with pytest.raises(Invalid):
            check_query(senders, bad)
