"""The recipient pages in a real headless Chromium (Playwright), on a phone-sized screen,
against the app served by uvicorn: a person unsubscribes, signs up and confirms, changes
preferences, and the database shows it. Each page is screenshotted into the test's tmp_path.

Debian's chromium is used (/usr/bin/chromium); Playwright never downloads a browser. Without
it these tests skip with the reason, except in CI (the CI variable is set), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import uvicorn

from mailer.branding import contrast
from mailer.service import Mailer
from mailer.tracking.app import create_app
from tests.recipient_support import (
    POLICY,
    WORDING,
    contact,
    deliver,
    ledger,
    suppressions,
)
from tests.smtp_server import CaptureServer

if TYPE_CHECKING:  # playwright is imported lazily, so a missing browser is a clean skip
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE = {"width": 390, "height": 844}
T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion in its own thread: Playwright's sync API owns this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        reason = (
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run "
            "the browser tests"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Site:
    url: str
    mailer: Mailer  # the served app's Mailer: its base_url is `url`


@pytest.fixture
def site(mailer: Mailer, smtp_server: CaptureServer) -> Iterator[Site]:
    """The app as `mailer serve` runs it (uvicorn, lifespan on), on a free loopback port, in a
    background thread; its confirmation mails go to the capture SMTP server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = replace(
        mailer.settings,
        base_url=url,
        smtp_url=smtp_server.url,
        sender_name="Actief Klussenservice",
        postal_address="Industrieweg 48, 5145 PW Waalwijk",
        brand_color="#0b6e4f",
        company_url="https://actief-klussenservice.example",
    )
    served = Mailer(settings, engine=mailer.engine)
    config = uvicorn.Config(
        create_app(served), lifespan="on", log_level="warning", ws="none", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Site(url, served)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def phone(browser: Browser, locale: str = "en-GB") -> tuple[Page, list[str]]:
    """A phone-sized page, and the console errors it logs (a CSP violation is one)."""
    context = browser.new_context(
        viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True, locale=locale
    )
    page = context.new_page()
    errors: list[str] = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


def looks_right(page: Page, shot: Path) -> None:
    """What every page must be on a phone: no sideways scrolling, one h1, big enough buttons
    whose text is readable on the brand colour, and a screenshot to look at."""
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.locator("h1").count() == 1
    assert page.locator("html").get_attribute("lang") in ("en", "nl")
    for button in page.locator("button").all():
        box = button.bounding_box()
        assert box is not None and box["height"] >= 44
        colours = button.evaluate(
            "b => [getComputedStyle(b).color, getComputedStyle(b).backgroundColor]"
        )
        foreground, background = (_hex(c) for c in colours)
        if background != "#ffffff" or foreground != "#ffffff":
            assert contrast(foreground, background) >= 4.5, colours
    page.screenshot(path=str(shot), full_page=True)


def _hex(css: str) -> str:
    numbers = [int(float(n)) for n in css[css.index("(") + 1 : css.index(")")].split(",")[:3]]
    return "#" + "".join(f"{n:02x}" for n in numbers)


def local(link: str, site: Site) -> str:
    return site.url + link


def test_a_person_unsubscribes_with_the_button(
    browser: Browser,
    site: Site,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    arrived = run(deliver(site.mailer, smtp_server, campaign_file, "anna@example.org"))
    anna = arrived["anna@example.org"]
    page, errors = phone(browser)
    page.goto(local(anna.unsubscribe, site))
    assert page.locator("h1").inner_text() == "Unsubscribe"
    assert "a***@example.org" in page.locator("main").inner_text()
    looks_right(page, tmp_path / "unsubscribe.png")
    assert ledger(site.mailer)[-1]["status"] == "granted"  # opening the page changed nothing

    page.get_by_role("button", name="Unsubscribe").click()
    page.wait_for_url(local(anna.unsubscribe, site))
    assert page.locator("h1").inner_text() == "You are unsubscribed"
    looks_right(page, tmp_path / "unsubscribed.png")
    assert errors == []

    withdrawal = ledger(site.mailer)[-1]
    assert (withdrawal["status"], withdrawal["method"]) == ("withdrawn", "unsubscribe_link")
    assert withdrawal["evidence"] == f"campaign:{anna.campaign_id}:delivery:{anna.delivery_id}"
    assert "Chrome" in (withdrawal["user_agent"] or "")
    assert [s["reason"] for s in suppressions(site.mailer)] == ["unsubscribed"]


SIGNUP_FORM = """<!doctype html><html lang="nl"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Nieuwsbrief</title></head>
<body><form method="post" action="{url}/subscribe">
<label for="email">E-mailadres</label> <input id="email" name="email" type="email" required>
<label for="name">Naam</label> <input id="name" name="name">
<label><input type="checkbox" name="purposes" value="marketing" checked> Klustips</label>
<label><input type="checkbox" name="purposes" value="tracking"> Meten</label>
<input type="hidden" name="policy_version" value="{policy}">
<input type="hidden" name="wording" value="{wording}">
<input type="text" name="website" tabindex="-1" autocomplete="off" hidden>
<button type="submit">Aanmelden</button></form></body></html>"""


def test_a_person_signs_up_and_confirms(
    browser: Browser, site: Site, smtp_server: CaptureServer, tmp_path: Path
) -> None:
    page, errors = phone(browser, locale="nl-NL")
    page.set_content(SIGNUP_FORM.format(url=site.url, policy=POLICY, wording=WORDING))
    page.get_by_label("E-mailadres").fill("noor@example.nl")
    page.get_by_label("Naam").fill("Noor Jansen")
    page.get_by_label("Meten").check()
    page.get_by_role("button", name="Aanmelden").click()
    page.wait_for_url(f"{site.url}/subscribe")
    assert page.locator("h1").inner_text() == "Kijk in uw mailbox"
    looks_right(page, tmp_path / "subscribed.png")

    (mail,) = smtp_server.wait_for(1)
    text = mail.parse().get_body(("plain",)).get_content()  # type: ignore[union-attr]
    link = text[text.index(site.url) :].split()[0]
    assert link.startswith(f"{site.url}/confirm/")
    page.goto(link)
    assert page.locator("h1").inner_text() == "Bevestig uw aanmelding"
    looks_right(page, tmp_path / "confirm.png")
    assert {r["status"] for r in ledger(site.mailer)} == {"pending"}  # the GET confirmed nothing

    page.get_by_role("button", name="Bevestigen").click()
    page.wait_for_url(link)
    assert page.locator("h1").inner_text() == "Bedankt, u bent aangemeld"
    looks_right(page, tmp_path / "confirmed.png")
    assert errors == []

    confirmed = [r for r in ledger(site.mailer) if r["status"] == "confirmed"]
    assert sorted((r["purpose"], r["method"]) for r in confirmed) == [
        ("marketing", "double_opt_in"),
        ("tracking", "double_opt_in"),
    ]
    assert {r["policy_version"] for r in confirmed} == {POLICY}
    assert contact(site.mailer, "noor@example.nl").name == "Noor Jansen"


def test_a_person_changes_preferences(
    browser: Browser,
    site: Site,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    from mailer.models import ConsentStatus

    site.mailer.record_consent("anna@example.org", "tracking", ConsentStatus.GRANTED, source="web")
    site.mailer.record_consent(
        "anna@example.org", "klustips", ConsentStatus.WITHDRAWN, source="phone"
    )
    arrived = run(deliver(site.mailer, smtp_server, campaign_file, "anna@example.org"))
    anna = arrived["anna@example.org"]
    page, errors = phone(browser)
    page.goto(local(anna.preferences, site))
    assert page.locator("h1").inner_text() == "Your e-mail preferences"
    looks_right(page, tmp_path / "preferences.png")

    page.get_by_label("E-mail about: klustips").check()
    page.get_by_label("Let you see whether I open").uncheck()
    page.get_by_label("Name").fill("Anna de Vries")
    page.get_by_label("Language").select_option("nl")
    page.get_by_role("button", name="Save preferences").click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "Uw e-mailvoorkeuren"
    assert "Uw voorkeuren zijn opgeslagen." in page.locator("main").inner_text()
    looks_right(page, tmp_path / "preferences-saved.png")

    changes = [r for r in ledger(site.mailer) if r["method"] == "preference_centre"]
    assert [(r["purpose"], r["status"]) for r in changes] == [
        ("klustips", "granted"),
        ("tracking", "withdrawn"),
    ]
    person = contact(site.mailer, "anna@example.org")
    assert (person.name, person.locale) == ("Anna de Vries", "nl")

    page.get_by_role("button", name="Afmelden voor alles").click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "U bent afgemeld"
    looks_right(page, tmp_path / "preferences-unsubscribed.png")
    assert errors == []
    assert [s["reason"] for s in suppressions(site.mailer)] == ["unsubscribed"]
    assert not site.mailer.show_contact("anna@example.org").states["marketing"].allows


def test_a_person_gets_a_copy_of_their_data(
    browser: Browser,
    site: Site,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """Preference centre -> the confirmation mail -> the button -> the download, in Chromium."""
    import json

    from mailer import privacy

    arrived = run(deliver(site.mailer, smtp_server, campaign_file, "anna@example.org"))
    smtp_server.clear()
    page, errors = phone(browser)
    page.goto(local(arrived["anna@example.org"].preferences, site))
    page.get_by_role("button", name="Send me a copy of my data").click()
    page.wait_for_load_state()
    assert "we have sent an e-mail with a confirmation link" in page.locator("main").inner_text()
    looks_right(page, tmp_path / "data-copy-asked.png")

    (mail,) = smtp_server.wait_for(1)
    assert mail.recipients == ("anna@example.org",)
    text = mail.parse().get_body(("plain",)).get_content()  # type: ignore[union-attr]
    link = text[text.index(site.url) :].split()[0]
    assert link.startswith(f"{site.url}/privacy/confirm/")
    page.goto(link)
    assert page.locator("h1").inner_text() == "Get a copy of your data"
    looks_right(page, tmp_path / "data-copy-confirm.png")
    (request,) = privacy.list_requests(site.mailer)
    assert request.request.identity_check == "pending"  # opening the link verified nothing

    page.get_by_role("button", name="Confirm and get my copy").click()
    page.wait_for_url(link)
    assert page.locator("h1").inner_text() == "Your copy is ready"
    looks_right(page, tmp_path / "data-copy-ready.png")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download my data").click()
    download = download_info.value
    assert download.suggested_filename.startswith("my-data-")
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    copy = json.loads(saved.read_text(encoding="utf-8"))
    assert copy["contact"]["email"] == "anna@example.org"
    assert [(r["purpose"], r["status"]) for r in copy["consent"]] == [("marketing", "granted")]
    assert errors == []

    (request,) = privacy.list_requests(site.mailer)
    assert request.request.identity_check == "verified"
    assert request.request.completed_at is not None
