"""The web console in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium), against the real relay."""

from __future__ import annotations

import os
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import SENDER, message, missing_tool

from relay.replies import Reply
from relay.store.deliveries import DeliveryRecord, Outcome, RecipientOutcome

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PROBE = '"<img src=x onerror=alert(1)>"@example.com'
PROBE_ID = "<script>alert(2)</script>"


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
    from selenium.webdriver.support.ui import WebDriverWait

    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", RELAY_ADMIN_LISTEN="127.0.0.1:0"
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
    wait = WebDriverWait(browser, 15)
    find = browser.find_element

    def visible(selector: str) -> Any:
        return wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, selector)))

    def text_in(selector: str, text: str) -> None:
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, selector), text))

    browser.get(f"http://127.0.0.1:{relay.relay.admin_port}/")
    visible("#token-input").send_keys(admin_token)
    find(By.ID, "sign-in").click()
    visible("#view-tokens")
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

    # Limits: counts against the day and the month, with their resets.
    find(By.ID, "nav-limits").click()
    text_in("#limits-table", "1 / unlimited")

    # The delivery log: find the message, open it.
    find(By.ID, "nav-log").click()
    visible("#view-log")
    find(By.ID, "log-sender").send_keys(SENDER)
    find(By.ID, "log-search").click()
    text_in("#log-table", "<console@example.com>")
    find(By.CSS_SELECTOR, "#log-table tbody tr").click()
    text_in("#log-detail", "ok@dest.test")
    assert "250 2.0.0" in find(By.ID, "log-detail").text

    # The probes show as text: no alert, no element made from them.
    find(By.ID, "log-sender").clear()
    find(By.ID, "log-search").click()
    text_in("#log-table", PROBE_ID)
    find(By.CSS_SELECTOR, "#log-table tbody tr").click()  # the newest: the probe
    text_in("#log-detail", "<b>no</b>")
    # A Message-ID pasted without its angle brackets finds its record (of the two shown).
    rows = "#log-table tbody tr"
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

    wait = WebDriverWait(browser, 15)
    browser.get(f"http://127.0.0.1:{relay.relay.admin_port}/")
    wait.until(ec.visibility_of_element_located((By.ID, "token-input"))).send_keys(admin_token)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(ec.visibility_of_element_located((By.ID, "view-tokens")))
    browser.find_element(By.ID, "nav-log").click()
    browser.find_element(By.ID, "log-search").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "log-table"), "<welcome-7732@example.com>"))
    table = browser.find_element(By.ID, "log-table").text
    for outcome in ("delivered", "partial", "deferred"):
        assert outcome in table
    shot = Path(os.environ.get("RELAY_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    browser.set_window_size(1280, 680)  # the table, without a blank half-page
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
