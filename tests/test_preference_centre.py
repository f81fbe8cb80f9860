"""The preference centre (GET|POST /p/TOKEN): per-purpose choices as ledger rows, unsubscribe
from everything, name and language, a request for a copy of one's data; a suppressed address
that asks for mail again gets a double opt-in, never a lifted suppression."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from mailer import audit, privacy
from mailer.addresses import address_hash
from mailer.branding import contrast
from mailer.models import ConsentStatus, SuppressionReason, as_utc
from mailer.recipients import PREFERENCE_OPERATOR
from mailer.service import Mailer
from mailer.tokens import TokenKind, Tokens
from mailer.transport import MemoryTransport
from tests.recipient_support import (
    Received,
    app_for,
    client_for,
    confirm_path,
    contact,
    deliver,
    ledger,
    recipients_of,
    state,
    subscriptions,
    suppressions,
)
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign

CHECKBOX = re.compile(r'<input type="checkbox"[^>]*value="([^"]+)"([^>]*)>')


def checked(html: str) -> dict[str, bool]:
    return {purpose: " checked" in rest for purpose, rest in CHECKBOX.findall(html)}


def save(
    shown: list[str], wanted: list[str], name: str = "", language: str = "en"
) -> dict[str, object]:
    return {
        "action": "save",
        "shown_in": "en",
        "shown": shown,
        "purpose": wanted,
        "name": name,
        "language": language,
    }


async def _anna(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> Received:
    mailer.record_consent("anna@example.org", "tracking", ConsentStatus.GRANTED, source="web")
    mailer.record_consent("anna@example.org", "klustips", ConsentStatus.WITHDRAWN, source="phone")
    arrived = await deliver(mailer, smtp_server, campaign_file, "anna@example.org")
    return arrived["anna@example.org"]


@pytest.mark.asyncio
async def test_the_page_shows_each_purpose_and_changes_nothing(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    anna = await _anna(mailer, smtp_server, campaign_file)
    before = state(mailer)
    async with client_for(app_for(mailer)) as http:
        page = await http.get(anna.preferences)
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert checked(page.text) == {"marketing": True, "klustips": False, "tracking": True}
    html = page.text
    assert "a***@example.org" in html and html.count("<h1>") == 1
    for label in ('for="purpose-1"', 'for="name"', 'for="language"'):
        assert label in html  # every control has a label
    assert html.count("<button") == 3 and "<script" not in html and "style=" not in html
    assert state(mailer) == before


@pytest.mark.asyncio
async def test_every_change_is_a_ledger_row(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    anna = await _anna(mailer, smtp_server, campaign_file)
    rows_before = len(ledger(mailer))
    async with client_for(app_for(mailer)) as http:
        answer = await http.post(
            anna.preferences,
            data=save(["marketing", "klustips", "tracking"], ["marketing", "klustips"]),
            headers={"user-agent": "Firefox"},
        )
    assert answer.status_code == 200 and "Your preferences are saved." in answer.text
    assert checked(answer.text) == {"marketing": True, "klustips": True, "tracking": False}
    new = ledger(mailer)[rows_before:]
    assert [(r["purpose"], r["status"], r["method"]) for r in new] == [
        ("klustips", "granted", "preference_centre"),
        ("tracking", "withdrawn", "preference_centre"),
    ]
    evidence = f"preferences:campaign:{anna.campaign_id}:delivery:{anna.delivery_id}"
    assert {r["evidence"] for r in new} == {evidence}  # not counted as an unsubscribe
    assert new[0]["wording"] == "E-mail about: klustips"
    assert {r["ip_masked"] for r in new} == {"127.0.0.0"}
    assert {r["user_agent"] for r in new} == {"Firefox"}
    assert suppressions(mailer) == []

    async with client_for(app_for(mailer)) as http:  # saving the same again changes nothing
        again = await http.post(
            anna.preferences,
            data=save(["marketing", "klustips", "tracking"], ["marketing", "klustips"]),
        )
    assert "Nothing needed changing." in again.text
    assert len(ledger(mailer)) == rows_before + 2


@pytest.mark.asyncio
async def test_name_and_language(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    anna = await _anna(mailer, smtp_server, campaign_file)
    rows_before = ledger(mailer)
    async with client_for(app_for(mailer)) as http:
        answer = await http.post(
            anna.preferences,
            data=save(["marketing", "tracking"], ["marketing", "tracking"], "Anna de Vries", "nl"),
        )
        bad = await http.post(
            anna.preferences, data=save(["marketing"], ["marketing"], "Anna\x00", "en")
        )
    assert '<html lang="nl">' in answer.text and "Uw voorkeuren zijn opgeslagen." in answer.text
    assert 'value="Anna de Vries"' in answer.text
    person = contact(mailer, "anna@example.org")
    assert (person.name, person.locale) == ("Anna de Vries", "nl")
    assert ledger(mailer) == rows_before  # a name is not consent
    assert bad.status_code == 400 and "name" in bad.text
    assert contact(mailer, "anna@example.org").name == "Anna de Vries"

    # ... but it is a change to personal data: audited, as `mailer privacy correct` is, by the
    # keyed hash and field names only (the log outlives an erasure). The refused form is not.
    hashed = address_hash("anna@example.org", mailer.settings.suppression_key)
    with mailer.session() as session:
        entries = audit.listing(session, subject=hashed, action="preferences.")
    (entry,) = entries
    assert (entry.operator, entry.action) == (PREFERENCE_OPERATOR, "preferences.profile")
    assert entry.details == {"fields": ["name", "locale"], "delivery_id": anna.delivery_id}
    details = json.dumps(entry.details).lower()
    for personal in ("anna", "vries", "example.org", "127.0.0"):
        assert personal not in details and personal not in entry.operator.lower()

    # The person's export shows it: the audit list is selected by their keyed hash.
    exported = privacy.export(mailer, "anna@example.org")["audit"]
    shown = [(a["operator"], a["details"]) for a in exported if a["action"] == entry.action]
    assert shown == [(PREFERENCE_OPERATOR, entry.details)]


@pytest.mark.asyncio
async def test_withdrawing_every_mail_purpose_unsubscribes(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    anna = await _anna(mailer, smtp_server, campaign_file)
    async with client_for(app_for(mailer)) as http:
        answer = await http.post(
            anna.preferences, data=save(["marketing", "klustips", "tracking"], ["tracking"])
        )
    assert "We will not send marketing e-mail" in answer.text
    (withdrawal,) = [r for r in ledger(mailer) if r["status"] == "withdrawn" and r["id"] > 3]
    assert withdrawal["purpose"] == "marketing"
    assert withdrawal["evidence"] == f"campaign:{anna.campaign_id}:delivery:{anna.delivery_id}"
    assert [s["reason"] for s in suppressions(mailer)] == ["unsubscribed"]
    smtp_server.clear()
    await send_campaign(mailer, campaign_file(name="winter"), smtp_server)
    assert recipients_of(smtp_server) == set()


@pytest.mark.asyncio
async def test_unsubscribe_from_everything(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    anna = await _anna(mailer, smtp_server, campaign_file)
    rows_before = len(ledger(mailer))
    async with client_for(app_for(mailer)) as http:
        answer = await http.post(anna.preferences, data={"action": "unsubscribe_all"})
        again = await http.post(anna.preferences, data={"action": "unsubscribe_all"})
    assert answer.status_code == again.status_code == 200
    assert "You are unsubscribed" in answer.text
    new = ledger(mailer)[rows_before:]
    assert sorted((r["purpose"], r["status"], r["method"]) for r in new) == [
        ("marketing", "withdrawn", "preference_centre"),
        ("tracking", "withdrawn", "preference_centre"),
    ]  # klustips was withdrawn already; the repeat added nothing
    assert len(suppressions(mailer)) == 1


@pytest.mark.asyncio
async def test_a_suppressed_address_asking_again_gets_a_double_opt_in(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    anna = await _anna(mailer, smtp_server, campaign_file)
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        await http.post(anna.unsubscribe, content=b"List-Unsubscribe=One-Click")
        rows_before = len(ledger(mailer))
        answer = await http.post(
            anna.preferences, data=save(["marketing", "klustips", "tracking"], ["marketing"])
        )
        assert "we have sent a confirmation e-mail to a***@example.org" in answer.text
        assert checked(answer.text)["marketing"] is False
        assert "waiting for your confirmation" in answer.text
        new = ledger(mailer)[rows_before:]
        assert [(r["purpose"], r["status"], r["method"]) for r in new] == [
            ("tracking", "withdrawn", "preference_centre"),
            ("marketing", "pending", "preference_centre"),
        ]
        (unsubscribed,) = suppressions(mailer)
        assert unsubscribed["lifted_at"] is None  # asking again lifts nothing
        (sub,) = subscriptions(mailer)
        assert sub["source"] == "preference centre" and sub["purposes"] == ["marketing"]
        (mail,) = transport.messages
        assert mail.recipient == "anna@example.org"

        # Asking once more within ten minutes sends no second mail, and says so.
        repeat = await http.post(
            anna.preferences, data=save(["marketing", "klustips", "tracking"], ["marketing"])
        )
        assert "We recently sent a confirmation e-mail" in repeat.text
        assert len(transport.messages) == 1

        assert (await http.post(confirm_path(mail.data))).status_code == 200
    (lifted,) = suppressions(mailer)
    assert lifted["lifted_at"] is not None
    smtp_server.clear()
    await send_campaign(mailer, campaign_file(name="winter"), smtp_server)
    assert recipients_of(smtp_server) == {"anna@example.org"}


@pytest.mark.asyncio
async def test_a_request_for_a_copy_of_ones_data(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    anna = await _anna(mailer, smtp_server, campaign_file)
    before = state(mailer)
    with caplog.at_level(logging.WARNING, logger="mailer.privacy"):
        async with client_for(app_for(mailer)) as http:
            answer = await http.post(anna.preferences, data={"action": "data_copy"})
    assert answer.status_code == 200 and "within 30 days" in answer.text
    (record,) = [r for r in caplog.records if r.name == "mailer.privacy"]
    message = record.getMessage()
    assert f"contact {contact(mailer, 'anna@example.org').id}" in message
    assert "anna@example.org" not in message
    assert state(mailer) == before
    # the request is in the register, due within 30 days, waiting for the identity check
    (entry,) = privacy.list_requests(mailer, open_only=True)
    assert entry.email == "anna@example.org"
    assert entry.request.kind == "access"
    assert (as_utc(entry.request.due_at) - as_utc(entry.request.received_at)).days == 30
    assert "127.0.0.0" in (entry.request.note or "")


@pytest.mark.asyncio
async def test_bad_tokens_and_bad_actions(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    anna = await _anna(mailer, smtp_server, campaign_file)
    tokens = Tokens(mailer.settings.secret_keys)
    before = state(mailer)
    async with client_for(app_for(mailer)) as http:
        for bad in (
            anna.preferences[:-1],
            "/p/" + tokens.sign(TokenKind.UNSUBSCRIBE, (anna.delivery_id,)),
            "/p/" + tokens.sign(TokenKind.PREFERENCES, (anna.delivery_id + 99,)),
        ):
            assert (await http.get(bad)).status_code == 404
            assert (await http.post(bad, data={"action": "unsubscribe_all"})).status_code == 404
        unknown = await http.post(anna.preferences, data={"action": "delete_everything"})
        tampered = await http.post(
            anna.preferences, data=save(["Not a purpose"], ["Not a purpose"])
        )
    assert unknown.status_code == 400 and tampered.status_code == 400
    assert state(mailer) == before


@pytest.mark.asyncio
async def test_only_shown_purposes_change(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    """A purpose the form did not show (or made up) is neither withdrawn nor granted."""
    anna = await _anna(mailer, smtp_server, campaign_file)
    rows_before = len(ledger(mailer))
    async with client_for(app_for(mailer)) as http:
        await http.post(anna.preferences, data=save(["marketing"], ["marketing", "invented"]))
    assert len(ledger(mailer)) == rows_before
    assert mailer.show_contact("anna@example.org").states["tracking"].allows
    assert SuppressionReason.UNSUBSCRIBED.value not in {s["reason"] for s in suppressions(mailer)}


@pytest.mark.asyncio
async def test_the_stylesheet_keeps_any_brand_colour_readable(mailer: Mailer) -> None:
    dark = Mailer(replace(mailer.settings, brand_color="#0B6E4F"), engine=mailer.engine)
    light = Mailer(replace(mailer.settings, brand_color="#ffe600"), engine=mailer.engine)
    async with client_for(app_for(dark)) as http:
        dark_css = await http.get("/assets/pages.css")
    async with client_for(app_for(light)) as http:
        light_css = await http.get("/assets/pages.css")
    assert dark_css.headers["content-type"].startswith("text/css")
    assert "--brand: #0b6e4f;" in dark_css.text and "--on-brand: #ffffff;" in dark_css.text
    assert "--brand: #ffe600;" in light_css.text and "--on-brand: #1a1a1a;" in light_css.text
    assert "--link: #1a1a1a;" in light_css.text  # yellow links on white would be unreadable
    assert contrast("#0b6e4f", "#ffffff") >= 4.5 and contrast("#ffe600", "#1a1a1a") >= 4.5
    assert "url(" not in dark_css.text and "@import" not in dark_css.text  # nothing third-party
