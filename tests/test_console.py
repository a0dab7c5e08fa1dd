"""The web console in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium), against the real relay."""

from __future__ import annotations

import os
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import DOMAIN, SENDER, message, missing_tool

from relay.replies import Reply
from relay.store.audit import Actor
from relay.store.deliveries import DeliveryRecord, Outcome, RecipientOutcome

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PROBE = '"<img src=x onerror=alert(1)>"@example.com'
PROBE_ID = "<script>alert(2)</script>"
# A deadline, not a pause: generous, as the browser shares two cores with the suite.
WAIT = 30


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing_tool("chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                 "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_console(relay_factory, sink, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
        RELAY_WEBHOOK_ALLOW_PRIVATE="true",  # the test's endpoint is on loopback
    )
    store = relay.store
    admin_token = store.create_admin_token(name="browser")["token"]
    with relay.login(relay.token()) as client:
        client.sendmail(
            SENDER, ["ok@dest.test"], message(extra="Message-ID: <console@example.com>\r\n")
        )
    store.set_sender(PROBE, balance=1)
    store.record_delivery(
        DeliveryRecord(
            time=1_800_000_000,
            message_id=PROBE_ID,
            account="acme",
            token_id="tok_x",
            sender=PROBE,
            recipients=(RecipientOutcome(PROBE, Outcome.REFUSED, 550, "5.1.1"),),
            size=1,
            channel="smtp",
            rule=3,
            outcome=Outcome.REFUSED,
            reply=Reply(550, "5.1.1", "<b>no</b>"),
        )
    )
    wait = WebDriverWait(browser, WAIT)
    find = browser.find_element

    def visible(selector: str) -> Any:
        return wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, selector)))

    def text_in(selector: str, text: str) -> None:
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, selector), text))

    base = f"http://127.0.0.1:{relay.relay.admin_port}"
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_token}"})
    browser.get(base + "/")
    visible("#token-input").send_keys(admin_token)
    find(By.ID, "sign-in").click()

    # The overview, the first page: a chart drawn, and the numbers the API gives.
    visible("#view-overview")
    text_in("#status-overview", "Signed in.")
    visible("#overview-chart canvas")
    wanted = http.get("/api/v1/stats/overview", params={"window": "1h"}).json()
    assert wanted["totals"] == {"delivered": 1}
    cell = '#overview-totals tr[data-outcome="{}"] td:nth-child(2)'
    text_in(cell.format("delivered"), "1")
    for outcome in ("delivered", "partial", "deferred", "refused"):
        shown = find(By.CSS_SELECTOR, cell.format(outcome)).text
        assert int(shown) == wanted["totals"].get(outcome, 0), outcome
    text_in('#overview-channels tr[data-channel="smtp"]', "smtp 1 0 (0.0%)")
    text_in("#overview-senders", SENDER)
    text_in("#overview-low", PROBE)  # its balance, 1, is under 10: shown as text

    # Accounts and domains: create one, add a domain, see both listed, and the API agrees.
    find(By.ID, "nav-accounts").click()
    visible("#view-accounts")
    assert find(By.ID, "status-overview").text == ""  # a message stays with its page
    find(By.ID, "create-account").click()  # blank: the form says so, nothing is sent
    text_in("#status-accounts", "Account: a name")
    find(By.ID, "account-name").send_keys("beta")
    find(By.ID, "create-account").click()
    text_in("#status-accounts", "Created the account beta.")
    text_in("#accounts-table", "beta")
    find(By.ID, "domain-name").send_keys("not a domain")
    find(By.ID, "add-domain").click()
    text_in("#status-accounts", "Domain: a name such as example.com.")
    find(By.ID, "domain-name").clear()
    find(By.ID, "domain-name").send_keys("beta.example")
    find(By.ID, "add-domain").click()
    text_in("#domains-table", "beta.example")
    domains = http.get("/api/v1/accounts/beta/domains").json()["domains"]
    assert "beta.example" in str(domains)
    # The API's own error text: a domain another account holds.
    find(By.ID, "domain-name").send_keys(DOMAIN)
    find(By.ID, "add-domain").click()
    wait.until(lambda _: "error" in find(By.ID, "status-accounts").get_attribute("class"))
    assert DOMAIN in find(By.ID, "status-accounts").text

    # The verified list: add, see listed.
    find(By.ID, "nav-lists").click()
    find(By.ID, "list-address").send_keys("friend@dest.test")
    find(By.ID, "list-add").click()
    text_in("#list-table", "friend@dest.test")
    assert "friend@dest.test" in str(http.get("/api/v1/verified").json())

    # Suppressions and webhooks of acme: add one of each; the secret is shown once.
    find(By.ID, "nav-events").click()
    visible("#view-events")
    text_in("#events-account", "acme")
    Select(find(By.ID, "events-account")).select_by_value("acme")
    find(By.ID, "suppression-address").send_keys("gone@dest.test")
    find(By.ID, "suppression-add").click()
    text_in("#suppressions-table", "gone@dest.test")
    assert "gone@dest.test" in str(http.get("/api/v1/accounts/acme/suppressions").json())
    find(By.ID, "webhook-url").send_keys("http://hooks.example/plain")
    find(By.ID, "webhook-add").click()
    text_in("#status-events", "URL: https://")
    find(By.ID, "webhook-url").clear()
    find(By.ID, "webhook-url").send_keys("https://127.0.0.1:9/relay")
    find(By.ID, "webhook-add").click()
    text_in("#webhooks-table", "https://127.0.0.1:9/relay")
    assert find(By.ID, "new-webhook-secret").text
    assert "127.0.0.1:9" in str(http.get("/api/v1/accounts/acme/webhooks").json())

    # Limits: set the relay's daily limit.
    find(By.ID, "nav-limits").click()
    visible("#view-limits")
    find(By.ID, "limits-daily").send_keys("500")
    find(By.ID, "limits-save").click()
    text_in("#limits-table", "1 / 500")

    find(By.ID, "nav-tokens").click()
    visible("#view-tokens")
    assert find(By.ID, "status-tokens").text == ""
    text_in("#account-select", "acme")

    # Tokens: create one, see it once with the client settings, see it listed.
    find(By.ID, "token-name").send_keys("from the console")
    find(By.ID, "create-token").click()
    text_in("#new-token", "rlt_")
    token = find(By.ID, "new-token").text
    assert find(By.ID, "client-host").text == "relay.test"
    assert find(By.ID, "client-port").text == str(relay.port)
    text_in("#tokens-table", "from the console")
    assert store.authenticate(token) is not None
    assert "from the console" in {t["name"] for t in store.list_tokens("acme")}

    # Senders: search, top up.
    find(By.ID, "nav-senders").click()
    visible("#view-senders")
    find(By.ID, "sender-prefix").send_keys("app@")
    find(By.ID, "sender-search").click()
    row = f'#senders-table tr[data-address="{SENDER}"]'
    text_in(f"{row} .balance", "9")  # 10, less the message sent
    find(By.CSS_SELECTOR, f"{row} input.amount").send_keys("7")
    find(By.CSS_SELECTOR, f"{row} button.topup").click()
    text_in(f"{row} .balance", "16")
    assert store.show_sender(SENDER)["balance"] == 16

    # The delivery log: find the message, open it.
    find(By.ID, "nav-log").click()
    visible("#view-log")
    find(By.ID, "log-sender").send_keys(SENDER)
    find(By.ID, "log-search").click()
    text_in("#log-table", "<console@example.com>")
    find(By.CSS_SELECTOR, "#log-table tbody tr").click()
    # The detail opens in place: right under the row, within the window.
    text_in("#log-table tr.detail", "ok@dest.test")
    detail = find(By.CSS_SELECTOR, "#log-table tr.detail")
    assert "250 2.0.0" in detail.text
    top, bottom = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.top, window.innerHeight];",
        detail,
    )
    assert 0 <= top < bottom
    find(By.CSS_SELECTOR, "#log-table tbody tr.clickable").click()  # closes it
    wait.until(lambda _: not browser.find_elements(By.CSS_SELECTOR, "#log-table tr.detail"))

    # The probes show as text: no alert, no element made from them.
    find(By.ID, "log-sender").clear()
    find(By.ID, "log-search").click()
    text_in("#log-table", PROBE_ID)
    find(By.CSS_SELECTOR, "#log-table tbody tr").click()  # the newest: the probe
    text_in("#log-table tr.detail", "<b>no</b>")
    # A Message-ID pasted without its angle brackets finds its record (of the two shown).
    rows = "#log-table tbody tr.clickable"
    assert len(browser.find_elements(By.CSS_SELECTOR, rows)) == 2
    find(By.ID, "log-message-id").send_keys("console@example.com")
    find(By.ID, "log-search").click()
    wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, rows)) == 1)
    assert "<console@example.com>" in find(By.ID, "log-table").text
    find(By.ID, "log-message-id").clear()
    find(By.ID, "nav-senders").click()
    find(By.ID, "sender-prefix").clear()
    find(By.ID, "sender-search").click()
    text_in("#senders-table", PROBE)
    assert PROBE in find(By.ID, "senders-table").text
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script, main b") == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it raises when none is open
    assert browser.get_cookies() == []
    http.close()


def an_hour_of_history(store: Any) -> None:
    """Delivery records for each minute of the last hour, as an app's steady traffic
    with a burst and an upstream's bad quarter of an hour would leave them."""
    import random
    import time

    chance = random.Random(1042)
    now = int(time.time())
    senders = ["billing@example.com", "welcome@example.com", "alerts@example.com"]
    for minute in range(60, 0, -1):
        when = now - minute * 60
        count = 4 + chance.randrange(5) + (14 if 38 <= minute <= 41 else 0)
        for n in range(count):
            roll = chance.random()
            troubled = 20 <= minute <= 34  # the upstream's bad quarter of an hour
            if roll < (0.25 if troubled else 0.03):
                outcome, reply = Outcome.DEFERRED, Reply(451, "4.3.0", "Try again later")
            elif roll < (0.30 if troubled else 0.06):
                outcome, reply = Outcome.REFUSED, Reply(550, "5.1.1", "User unknown")
            else:
                outcome, reply = Outcome.DELIVERED, Reply(250, "2.0.0", "Ok")
            rcpt = f"user{n}@customer.example"
            store.record_delivery(
                DeliveryRecord(
                    time=when + n,
                    message_id=f"<history-{minute}-{n}@example.com>",
                    account="acme",
                    token_id="tok_history",
                    sender=chance.choice(senders),
                    recipients=(RecipientOutcome(rcpt, outcome, reply.code, reply.enhanced),),
                    size=2048,
                    channel="smtp" if n % 3 else "resend",
                    rule=3,
                    outcome=outcome,
                    reply=reply,
                    charged=1 if outcome is Outcome.DELIVERED else 0,
                    duration=0.04 + chance.random() * (0.4 if troubled else 0.08),
                )
            )


def test_the_delivery_log_screenshot(relay_factory, sink, browser, tmp_path):
    """The picture in the README: the delivery log after a few ordinary sends.

    `RELAY_CONSOLE_SCREENSHOT=docs/console.png` writes it there; the messages
    are real sends through the relay to the sink, which refuses one recipient
    for good and defers one message, as upstreams do.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="100", RELAY_ADMIN_LISTEN="127.0.0.1:0"
    )
    # The overview's charts need a past: an hour of records the test writes into
    # the relay's store, older than the real sends below.
    an_hour_of_history(relay.store)
    sink.recorder.rcpt_replies["old.contact@customer.example"] = "550 5.1.1 User unknown"
    sends = [
        ("billing@example.com", ["ana@customer.example"], "invoice-1042", "Invoice 1042"),
        ("welcome@example.com", ["sam@mail.example"], "welcome-7731", "Welcome aboard"),
        (
            "billing@example.com",
            ["ops@customer.example", "old.contact@customer.example"],
            "invoice-1043",
            "Invoice 1043",
        ),
        ("alerts@example.com", ["oncall@example.org"], "alert-5520", "Disk at 91%"),
        ("welcome@example.com", ["jo@mail.example"], "welcome-7732", "Welcome aboard"),
    ]
    with relay.login(relay.token()) as client:
        for sender, rcpts, message_id, subject in sends:
            sink.recorder.data_reply = (
                "451 4.3.0 Try again later" if "alert" in message_id else None
            )
            body = message(
                sender,
                ", ".join(rcpts),
                subject,
                extra=f"Message-ID: <{message_id}@example.com>\r\n",
            )
            try:
                client.sendmail(sender, rcpts, body)
            except smtplib.SMTPDataError as exc:
                assert exc.smtp_code == 451  # the deferred one
    sink.recorder.data_reply = None
    admin_token = relay.store.create_admin_token(name="screenshot")["token"]

    wait = WebDriverWait(browser, WAIT)
    browser.get(f"http://127.0.0.1:{relay.relay.admin_port}/")
    wait.until(ec.visibility_of_element_located((By.ID, "token-input"))).send_keys(admin_token)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#overview-chart canvas")))
    wait.until(ec.text_to_be_present_in_element((By.ID, "overview-senders"), "welcome@"))
    shot = Path(os.environ.get("RELAY_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    overview = shot.with_name("console-overview.png")
    browser.set_window_size(1280, 900)
    assert browser.save_screenshot(str(overview))
    browser.find_element(By.ID, "nav-log").click()
    browser.find_element(By.ID, "log-search").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "log-table"), "<welcome-7732@example.com>"))
    table = browser.find_element(By.ID, "log-table").text
    for outcome in ("delivered", "partial", "deferred"):
        assert outcome in table
    browser.find_element(By.CSS_SELECTOR, "#log-table tbody tr.clickable").click()
    wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#log-table tr.detail")))
    browser.set_window_size(1280, 900)
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- every admin task, at 390 px, and by keyboard ----------------------------------


class Receiver:
    """A webhook receiver on loopback that answers 500 with markup in its body."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = b"<b>nope</b> " + b"x" * 3000
                self.send_response(500)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Console:
    """The browser signed in to one relay's console, and an HTTP client of its API."""

    def __init__(self, relay: Any, browser: Any) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        self.by, self.ec, self.browser = By, ec, browser
        self.wait = WebDriverWait(browser, WAIT)
        token = relay.store.create_admin_token(name="browser")["token"]
        self.base = f"http://127.0.0.1:{relay.relay.admin_port}"
        self.http = httpx.Client(
            base_url=self.base + "/api/v1", headers={"Authorization": f"Bearer {token}"}
        )
        browser.get(self.base + "/")
        self.visible("#token-input").send_keys(token)
        self.find("#sign-in").click()
        self.visible("#overview-chart canvas")

    def find(self, selector: str) -> Any:
        return self.browser.find_element(self.by.CSS_SELECTOR, selector)

    def visible(self, selector: str) -> Any:
        return self.wait.until(
            self.ec.visibility_of_element_located((self.by.CSS_SELECTOR, selector))
        )

    def text_in(self, selector: str, text: str) -> None:
        self.wait.until(
            self.ec.text_to_be_present_in_element((self.by.CSS_SELECTOR, selector), text)
        )

    def page(self, name: str) -> None:
        self.find(f"#nav-{name}").click()
        self.visible(f"#view-{name}")

    def type(self, selector: str, text: str) -> None:
        field = self.find(selector)
        field.clear()
        field.send_keys(text)

    def choose(self, selector: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        self.wait.until(
            lambda _: (
                value in [o.get_attribute("value") for o in Select(self.find(selector)).options]
            )
        )
        Select(self.find(selector)).select_by_value(value)

    def get(self, path: str) -> Any:
        answer = self.http.get(path)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def until(self, check: Any) -> None:
        self.wait.until(lambda _: check())


def test_every_task_in_the_console(relay_factory, sink, browser):
    """An admin's walk through the tasks, each checked by what the API then holds:
    an account and a domain, a token with a scope, a top-up, a limit, a suppression,
    a webhook and its attempts, retrying a queued message, disabling, moving a domain,
    and deleting an account by typing its name."""
    from test_channels import wrap_hook

    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
        RELAY_WEBHOOK_ALLOW_PRIVATE="true",  # the receiver is on loopback
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",  # no retry but the console's
    )
    down = [1]  # the upstream defers the first MAIL: the message is queued

    def defer(server: Any) -> str | None:
        if down[0]:
            down[0] -= 1
            return "421 4.3.2 service not available"
        return None

    wrap_hook(sink, "MAIL", defer)
    with relay.login(relay.token()) as client:
        client.sendmail(SENDER, ["ok@dest.test"], message(extra="Message-ID: <q@example.com>\r\n"))
    assert len(relay.store.queue_list()) == 1 and sink.messages == []
    receiver = Receiver()
    c = Console(relay, browser)
    try:
        # An account and a domain.
        c.page("accounts")
        c.type("#account-name", "gamma")
        c.find("#create-account").click()
        c.text_in("#status-accounts", "Created the account gamma.")
        c.type("#domain-name", "gamma.example")
        c.find("#add-domain").click()
        c.text_in("#domains-table", "gamma.example")
        assert [d["domain"] for d in c.get("/accounts/gamma/domains")["domains"]] == [
            "gamma.example"
        ]

        # Its own queue mode (`relay account set gamma --queue always`), and back.
        gamma_mode = '#accounts-table tr[data-account="gamma"] select.queue-mode'

        def queue_of(name: str) -> str | None:
            return next(a["queue"] for a in c.get("/accounts")["accounts"] if a["name"] == name)

        c.choose(gamma_mode, "always")
        c.text_in("#status-accounts", "The queue mode of gamma: always.")
        assert queue_of("gamma") == "always"
        c.choose(gamma_mode, "default")
        c.text_in("#status-accounts", "The queue mode of gamma: the relay's.")
        assert queue_of("gamma") is None

        # A token with a scope: its senders and networks.
        c.page("tokens")
        c.choose("#account-select", "gamma")
        c.type("#token-name", "billing")
        c.type("#token-senders", "billing@gamma.example")
        c.type("#token-networks", "127.0.0.0/8")
        c.type("#token-rates", "60/minute")
        c.type("#token-role", "bulk")
        c.find("#create-token").click()
        c.text_in("#new-token", "rlt_")
        [token] = c.get("/accounts/gamma/tokens")["tokens"]
        assert (
            token["name"],
            token["senders"],
            token["networks"],
            token["rates"],
            token["role"],
        ) == ("billing", ["billing@gamma.example"], ["127.0.0.0/8"], ["60/minute"], "bulk")

        # A top-up.
        c.page("senders")
        c.type("#sender-prefix", "app@")
        c.find("#sender-search").click()
        row = f'#senders-table tr[data-address="{SENDER}"]'
        c.text_in(f"{row} .balance", "9")  # 10, less the queued message's charge
        c.type(f"{row} input.amount", "5")
        c.find(f"{row} button.topup").click()
        c.text_in(f"{row} .balance", "14")
        assert c.get(f"/senders/{SENDER}")["balance"] == 14
        # An exact balance (`relay sender set --balance`); a bad one is refused unsent.
        c.type(f"{row} input.exact", "-2")
        c.find(f"{row} button.set").click()
        c.text_in("#status-senders", "Set balance: a whole number, 0 or more.")
        c.type(f"{row} input.exact", "12")
        c.find(f"{row} button.set").click()
        c.text_in(f"{row} .balance", "12")
        assert c.get(f"/senders/{SENDER}")["balance"] == 12
        # A new sender row with its balance, then deleted (confirmed): the default again.
        c.type("#sender-new-address", "new@dest.test")
        c.type("#sender-new-balance", "42")
        c.find("#sender-create").click()
        new_row = '#senders-table tr[data-address="new@dest.test"]'
        c.text_in(f"{new_row} .balance", "42")
        made = c.get("/senders/new@dest.test")
        assert (made["balance"], made["stored"]) == (42, True)
        c.find(f"{new_row} button.delete").click()
        c.find(f"{new_row} button.delete").click()  # the confirmation
        c.text_in("#status-senders", "Deleted the sender row of new@dest.test")
        gone = c.get("/senders/new@dest.test")
        assert (gone["balance"], gone["stored"]) == (10, False)  # DEFAULT_SEND_BALANCE

        # A limit of the new account.
        c.page("limits")
        c.choose("#limits-account", "gamma")
        c.type("#limits-daily", "50")
        c.find("#limits-save").click()
        c.text_in("#limits-table", "0 / 50")
        [gamma] = [x for x in c.get("/limits")["limits"] if x["scope"] == "gamma"]
        assert (gamma["daily"], gamma["monthly"]) == (50, -1)
        # ... and reset: unlimited again.
        c.find('#limits-table tr[data-scope="gamma"] button').click()
        c.find('#limits-table tr[data-scope="gamma"] button').click()  # the confirmation
        c.text_in('#limits-table tr[data-scope="gamma"]', "0 / unlimited")
        [gamma] = [x for x in c.get("/limits")["limits"] if x["scope"] == "gamma"]
        assert (gamma["daily"], gamma["monthly"]) == (-1, -1)

        # A suppression and a webhook of the new account.
        c.page("events")
        c.choose("#events-account", "gamma")
        c.type("#suppression-address", "gone@dest.test")
        c.choose("#suppression-reason", "hard-bounce")
        c.type("#suppression-expires", "0")
        c.find("#suppression-add").click()
        c.text_in("#status-events", "Expires in days: more than 0")
        c.type("#suppression-expires", "2")
        c.find("#suppression-add").click()
        c.text_in("#suppressions-table", "gone@dest.test")
        [entry] = c.get("/accounts/gamma/suppressions")
        assert (entry["address"], entry["reason"]) == ("gone@dest.test", "hard-bounce")
        assert entry["expires"] - entry["created"] == 2 * 86400
        c.type("#webhook-url", "https://127.0.0.1:9/relay")
        c.find("#webhook-add").click()
        c.text_in("#webhooks-table", "https://127.0.0.1:9/relay")
        assert [w["url"] for w in c.get("/accounts/gamma/webhooks")] == [
            "https://127.0.0.1:9/relay"
        ]

        # A webhook's attempts: a test event to a receiver answering 500 with markup,
        # shown as text, cut to its first 1 KiB.
        made = c.http.post("/accounts/acme/webhooks", json={"url": receiver.url})
        assert made.status_code == 201, made.text
        hook = made.json()["id"]
        c.choose("#events-account", "acme")
        c.text_in("#webhooks-table", receiver.url)
        c.find(f'#webhooks-table tr[data-id="{hook}"] button.test').click()
        c.text_in("#status-events", "Queued a test event")
        c.until(lambda: c.get(f"/accounts/acme/webhooks/{hook}/attempts"))
        c.find(f'#webhooks-table tr[data-id="{hook}"] button.attempts').click()
        c.text_in("#webhooks-table tr.detail", "<b>nope</b>")
        c.text_in("#webhooks-table tr.detail .status-code", "500")
        answer = c.find("#webhooks-table tr.detail pre.answer").text
        assert answer.startswith("<b>nope</b> xxx") and len(answer) <= 1024
        assert c.browser.find_elements(c.by.CSS_SELECTOR, "main b") == []
        # Replay that event (`relay webhook replay`): it is tried again at once.
        attempts = c.get(f"/accounts/acme/webhooks/{hook}/attempts")
        event = attempts[0]["event_id"]
        c.find(f'#webhooks-table tr.detail tr[data-event-id="{event}"] button.replay').click()
        c.text_in("#status-events", f"Replayed webhook.test ({event}): 1 delivery(ies) queued.")
        newest = c.get("/audit?limit=1")["records"][0]
        assert (newest["action"], newest["detail"]) == ("webhook.replay", {"event_id": event})
        c.until(lambda: len(c.get(f"/accounts/acme/webhooks/{hook}/attempts")) > len(attempts))

        # Retry the queued message: delivered, the queue empty.
        c.page("queue")
        c.choose("#queue-account", "gamma")
        c.find("#queue-search").click()
        c.until(lambda: c.find("#queue-table tbody").text == "")  # none of gamma's
        # Hold every message (no filter: the API's `all` form), then release each of
        # acme's listed (filtered: one call per message).
        c.choose("#queue-account", "")
        c.find("#queue-search").click()
        c.text_in("#queue-table", SENDER)
        c.find("#queue-hold-all").click()
        c.text_in("#status-queue", "hold: 1 message(s) changed.")
        [held] = c.get("/queue")["messages"]
        assert held["state"] == "held"
        newest = c.get("/audit?limit=1")["records"][0]
        assert (newest["action"], newest["target"]) == ("queue.hold", "all")
        c.choose("#queue-account", "acme")
        c.find("#queue-search").click()
        c.text_in("#queue-table .state", "held")
        c.find("#queue-release-all").click()
        c.text_in("#status-queue", "release: 1 message(s) changed.")
        assert [m["state"] for m in c.get("/queue")["messages"]] == ["queued"]
        newest = c.get("/audit?limit=1")["records"][0]
        assert (newest["action"], newest["target"]) == ("queue.release", str(held["id"]))
        c.text_in("#queue-table .state", "queued")
        # Its detail (`relay queue show`): the recipient waiting, the upstream's 421.
        c.find("#queue-table tbody tr button.details").click()
        c.text_in("#queue-table tr.detail", "<q@example.com>")
        detail = c.find("#queue-table tr.detail").text
        assert "ok@dest.test waiting" in detail and "421 4.3.2" in detail, detail
        c.find("#queue-table tbody tr button.retry").click()
        c.until(lambda: c.get("/queue")["messages"] == [] and len(sink.messages) == 1)
        [record] = c.get("/log?message_id=q@example.com")["records"]
        assert record["outcome"] == "delivered"

        # Disable and enable the account; move its domain; delete it by its name.
        c.page("accounts")
        gamma_row = '#accounts-table tr[data-account="gamma"]'
        c.find(f"{gamma_row} button.toggle").click()
        c.text_in(f"{gamma_row} .state", "disabled since")
        assert [
            a["disabled"] is not None
            for a in c.get("/accounts")["accounts"]
            if a["name"] == "gamma"
        ] == [True]
        c.find(f"{gamma_row} button.toggle").click()
        c.text_in(f"{gamma_row} .state", "enabled")
        c.find(f"{gamma_row} button.domains").click()
        c.text_in("#domains-table", "gamma.example")
        domain_row = '#domains-table tr[data-domain="gamma.example"]'
        c.choose(f"{domain_row} select.move-to", "acme")
        c.find(f"{domain_row} button.move").click()
        c.text_in("#status-accounts", "Moved gamma.example from gamma to acme.")
        acme = [d["domain"] for d in c.get("/accounts/acme/domains")["domains"]]
        assert "gamma.example" in acme and c.get("/accounts/gamma/domains")["domains"] == []
        c.find(f"{gamma_row} button.delete").click()
        c.visible("#delete-form")
        c.type("#delete-confirm", "gamm")
        c.find("#delete-account").click()
        c.text_in("#status-accounts", "Type gamma exactly to delete it.")
        assert "gamma" in [a["name"] for a in c.get("/accounts")["accounts"]]
        c.type("#delete-confirm", "gamma")
        c.find("#delete-account").click()
        c.text_in(
            "#status-accounts",
            "Deleted the account gamma: 1 token(s), 0 domain(s), 1 webhook(s), 1 suppression(s).",
        )
        assert "gamma" not in [a["name"] for a in c.get("/accounts")["accounts"]]
        assert c.get("/audit")["records"][0]["action"] == "account.delete"

        # The audit log (`relay audit`): newest first, as text, a page at a time.
        for n in range(150):
            relay.store.record_audit(Actor("adm_x", "<i>here</i>"), "test.entry", f"<b>{n}</b>")
        c.page("audit")
        first = c.get("/audit?limit=100")
        c.text_in("#audit-table tbody tr:first-child .target", "<b>149</b>")
        rows = "#audit-table tbody tr"
        c.until(lambda: len(c.browser.find_elements(c.by.CSS_SELECTOR, rows)) == 100)
        c.find("#audit-more").click()
        second = c.get(f"/audit?limit=100&cursor={first['next_cursor']}")
        wanted = [str(r["id"]) for r in first["records"] + second["records"]]
        c.until(lambda: len(c.browser.find_elements(c.by.CSS_SELECTOR, rows)) == len(wanted))
        shown = [
            r.get_attribute("data-id") for r in c.browser.find_elements(c.by.CSS_SELECTOR, rows)
        ]
        assert shown == wanted
        assert c.find("#audit-more").is_displayed() == (second["next_cursor"] is not None)
        text = c.find("#audit-table").text
        for action in (
            "account.set",
            "sender.set",
            "sender.delete",
            "webhook.replay",
            "queue.hold",
        ):
            assert action in text, action
        assert c.browser.find_elements(c.by.CSS_SELECTOR, "main b, main i") == []
    finally:
        c.http.close()
        receiver.close()


PAGES = (
    "overview",
    "accounts",
    "tokens",
    "senders",
    "limits",
    "lists",
    "queue",
    "events",
    "log",
    "audit",
)


def test_every_page_is_readable_at_390_px_wide(relay_factory, sink, browser):
    """At a phone's 390 px the page never scrolls sideways; a table may, in its box."""
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", RELAY_ADMIN_LISTEN="127.0.0.1:0"
    )
    with relay.login(relay.token()) as client:
        client.sendmail(
            SENDER,
            [f"r{i}@a-rather-long-recipient-domain.example" for i in range(3)],
            message(extra="Message-ID: <a-long-message-id-0123456789abcdef@example.com>\r\n"),
        )
    browser.set_window_size(390, 844)
    c = Console(relay, browser)
    try:
        width = "return [document.documentElement.scrollWidth, window.innerWidth];"
        for name in PAGES:
            c.page(name)
            if name == "log":
                c.find("#log-search").click()
                c.text_in("#log-table", "a-long-message-id")
                c.find("#log-table tbody tr.clickable td.time").click()
                c.visible("#log-table tr.detail")
            if name == "tokens":
                c.find("#create-token").click()
                c.text_in("#new-token", "rlt_")
            scroll, inner = c.browser.execute_script(width)
            assert inner <= 390 and scroll <= inner, (name, scroll, inner)
    finally:
        c.http.close()


def test_the_log_by_keyboard_and_a_shared_link(relay_factory, sink, browser):
    """Tab reaches the actions; Enter on a focused row opens its record in place,
    Escape closes it; the record's link (#log/<Message-ID>, no token in it) opens the
    same record in another signed-in tab."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", RELAY_ADMIN_LISTEN="127.0.0.1:0"
    )
    with relay.login(relay.token()) as client:
        for n in (1, 2):
            client.sendmail(
                SENDER, ["ok@dest.test"], message(extra=f"Message-ID: <k{n}@example.com>\r\n")
            )
    c = Console(relay, browser)
    try:
        focused = "return document.activeElement;"
        # Tab from the page's start walks the nav, each a button: every page is reachable.
        c.browser.execute_script("document.activeElement.blur(); window.focus();")
        reached = set()
        for _ in range(30):
            ActionChains(c.browser).send_keys(Keys.TAB).perform()
            element = c.browser.execute_script(focused)
            reached.add(element.get_attribute("id"))
        assert {f"nav-{p}" for p in PAGES} <= reached, reached
        # On the accounts page, Tab reaches each row's and each domain's actions.
        relay.store.create_account("beta")
        c.page("accounts")
        c.text_in("#domains-table", DOMAIN)
        classes = set()
        for _ in range(40):
            ActionChains(c.browser).send_keys(Keys.TAB).perform()
            classes.update(c.browser.execute_script(focused).get_attribute("class").split())
        assert {
            "domains",
            "toggle",
            "delete",
            "move-to",
            "move",
            "danger",
            "queue-mode",
        } <= classes, classes
        # Enter on the focused nav button opens the log; Tab to its Search, Enter.
        c.find("#nav-log").send_keys(Keys.ENTER)
        c.visible("#view-log")
        c.find("#log-search").send_keys(Keys.ENTER)
        c.text_in("#log-table", "<k2@example.com>")
        # Tab through the filters and the search reaches the first row.
        c.find("#log-search").click()
        c.text_in("#log-table", "<k2@example.com>")
        for _ in range(5):
            ActionChains(c.browser).send_keys(Keys.TAB).perform()
            if c.browser.execute_script(focused).get_attribute("class") == "clickable":
                break
        row = c.browser.execute_script(focused)
        assert row.get_attribute("data-message-id") == "<k2@example.com>"
        ActionChains(c.browser).send_keys(Keys.ENTER).perform()
        c.text_in("#log-table tr.detail", "ok@dest.test")
        link = c.find("#log-table tr.detail a.permalink").get_attribute("href")
        assert link.endswith("#log/%3Ck2%40example.com%3E")
        assert c.browser.current_url == link  # the address bar holds it while open
        ActionChains(c.browser).send_keys(Keys.ESCAPE).perform()
        c.until(lambda: not c.browser.find_elements(c.by.CSS_SELECTOR, "#log-table tr.detail"))
        assert (
            c.browser.execute_script(focused).get_attribute("data-message-id") == "<k2@example.com>"
        )
        assert "#" not in c.browser.current_url

        # The link of the older message, opened in a new tab: sign in, and it opens.
        shared = c.base + "/#log/" + "%3Ck1%40example.com%3E"
        assert "rla_" not in shared
        c.browser.switch_to.new_window("tab")
        c.browser.get(shared)
        token = relay.store.create_admin_token(name="second")["token"]
        c.visible("#token-input").send_keys(token)
        c.find("#sign-in").click()
        c.visible("#view-log")
        c.text_in("#log-table tr.detail", "<k1@example.com>")
        assert len(c.browser.find_elements(c.by.CSS_SELECTOR, "#log-table tbody tr.clickable")) == 1
        assert c.find("#log-message-id").get_attribute("value") == "<k1@example.com>"
    finally:
        c.http.close()
