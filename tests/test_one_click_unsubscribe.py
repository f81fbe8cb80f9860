"""Invariant 4 (RFC 8058): GET /u/TOKEN shows a page and changes nothing; any POST to it
unsubscribes at once, idempotently, with evidence; the next campaign does not reach the person.

Every test follows the links of a real campaign that arrived at the capture SMTP server,
through the app `mailer serve` runs."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mailer.i18n import LANGUAGES, MESSAGES, negotiate
from mailer.models import ConsentStatus, SuppressionReason
from mailer.service import Mailer
from mailer.tokens import TokenKind, Tokens
from tests.recipient_support import (
    app_for,
    client_for,
    contact,
    deliver,
    ledger,
    recipients_of,
    state,
    suppressions,
)
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign

ONE_CLICK = {"content-type": "application/x-www-form-urlencoded"}


@pytest.mark.asyncio
async def test_get_shows_the_page_and_changes_nothing(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    arrived = await deliver(
        mailer, smtp_server, campaign_file, "anna@example.org", extra='list_name = "Klustips"\n'
    )
    link = arrived["anna@example.org"].unsubscribe
    before = state(mailer)
    async with client_for(app_for(mailer)) as http:
        page = await http.get(link, headers={"user-agent": "Mozilla/5.0 (link scanner)"})
        head = await http.head(link)
        again = await http.get(link)
    assert page.status_code == 200 and head.status_code == 200 and again.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "set-cookie" not in page.headers
    html = page.text
    assert "a***@example.org" in html and "anna@example.org" not in html
    assert "Klustips" in html
    assert '<form method="post"' in html and '<button type="submit">Unsubscribe</button>' in html
    assert '<html lang="en">' in html and html.count("<h1>") == 1
    assert state(mailer) == before  # a scanner's GET (or HEAD) unsubscribes nobody


@pytest.mark.asyncio
@pytest.mark.parametrize("encoding", ["urlencoded", "multipart", "empty"])
async def test_one_click_post_unsubscribes_and_the_next_campaign_skips_the_person(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    encoding: str,
) -> None:
    arrived = await deliver(
        mailer, smtp_server, campaign_file, "anna@example.org", "bert@example.org"
    )
    anna = arrived["anna@example.org"]
    headers = {"user-agent": "Gmail one-click/1.0"}
    async with client_for(app_for(mailer)) as http:
        if encoding == "urlencoded":
            answer = await http.post(
                anna.unsubscribe,
                content=b"List-Unsubscribe=One-Click",
                headers={**ONE_CLICK, **headers},
            )
        elif encoding == "multipart":
            answer = await http.post(
                anna.unsubscribe, files={"List-Unsubscribe": (None, "One-Click")}, headers=headers
            )
        else:
            answer = await http.post(anna.unsubscribe, headers=headers)
    assert answer.status_code == 200  # never a redirect (RFC 8058), no cookie needed
    assert "location" not in answer.headers and "set-cookie" not in answer.headers
    assert "You are unsubscribed" in answer.text

    anna_id = contact(mailer, "anna@example.org").id
    rows = [r for r in ledger(mailer) if r["contact_id"] == anna_id and r["status"] == "withdrawn"]
    assert len(rows) == 1  # the campaign's purpose is marketing: one row
    row = rows[0]
    assert row["purpose"] == "marketing"
    assert row["method"] == "one_click"
    assert row["evidence"] == f"campaign:{anna.campaign_id}:delivery:{anna.delivery_id}"
    assert row["ip_masked"] == "127.0.0.0"
    assert row["user_agent"] == "Gmail one-click/1.0"
    assert row["consent_at"] is not None
    assert [(s["reason"], s["lifted_at"]) for s in suppressions(mailer)] == [
        (SuppressionReason.UNSUBSCRIBED.value, None)
    ]

    smtp_server.clear()
    await send_campaign(mailer, campaign_file(name="winter"), smtp_server)
    assert recipients_of(smtp_server) == {"bert@example.org"}


@pytest.mark.asyncio
async def test_the_pages_button_records_an_unsubscribe_link_withdrawal(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    arrived = await deliver(mailer, smtp_server, campaign_file, "anna@example.org")
    link = arrived["anna@example.org"].unsubscribe
    async with client_for(app_for(mailer)) as http:
        answer = await http.post(link, data={"via": "page"})
    assert answer.status_code == 200
    (row,) = [r for r in ledger(mailer) if r["status"] == "withdrawn"]
    assert row["method"] == "unsubscribe_link"
    assert row["source"] == "unsubscribe page"
    assert len(suppressions(mailer)) == 1


@pytest.mark.asyncio
async def test_repeating_it_is_harmless(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    arrived = await deliver(mailer, smtp_server, campaign_file, "anna@example.org")
    link = arrived["anna@example.org"].unsubscribe
    async with client_for(app_for(mailer)) as http:
        first = await http.post(link, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
        after_first = state(mailer)
        second = await http.post(link, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
        button = await http.post(link, data={"via": "page"})
        page = await http.get(link)
    assert first.status_code == second.status_code == button.status_code == 200
    # No second withdrawal row (the latest row is a withdrawal already), no second suppression.
    assert state(mailer) == after_first
    assert len([r for r in ledger(mailer) if r["status"] == "withdrawn"]) == 1
    assert len(suppressions(mailer)) == 1
    assert "already unsubscribed" in page.text and "<button" not in page.text.split("<main")[1]


@pytest.mark.asyncio
async def test_a_campaign_with_its_own_purpose_withdraws_it_and_marketing(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    mailer.record_consent("anna@example.org", "klustips", ConsentStatus.GRANTED, source="webform")
    arrived = await deliver(
        mailer,
        smtp_server,
        campaign_file,
        "anna@example.org",
        extra='purpose = "klustips"\n',
        grant_marketing=True,
    )
    anna = arrived["anna@example.org"]
    async with client_for(app_for(mailer)) as http:
        await http.post(anna.unsubscribe, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
    withdrawn = {r["purpose"]: r for r in ledger(mailer) if r["status"] == "withdrawn"}
    assert set(withdrawn) == {"klustips", "marketing"}
    evidence = f"campaign:{anna.campaign_id}:delivery:{anna.delivery_id}"
    assert {r["evidence"] for r in withdrawn.values()} == {evidence}


@pytest.mark.asyncio
async def test_bad_tokens_are_a_plain_404_and_change_nothing(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    arrived = await deliver(mailer, smtp_server, campaign_file, "anna@example.org")
    anna = arrived["anna@example.org"]
    token = anna.unsubscribe.rsplit("/", 1)[1]
    tokens = Tokens(mailer.settings.secret_keys)
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    bad = [
        flipped,
        token[:-3],
        token + "x",
        "0" + token,
        tokens.sign(TokenKind.PREFERENCES, (anna.delivery_id,)),  # another kind's token
        tokens.sign(TokenKind.UNSUBSCRIBE, (anna.delivery_id + 1000,)),  # no such delivery
        tokens.sign(TokenKind.UNSUBSCRIBE, (anna.delivery_id, anna.campaign_id + 1)),
        Tokens(["another-key-0123456789abcdefghijklmnopqrstuvwxyz"]).sign(
            TokenKind.UNSUBSCRIBE, (anna.delivery_id,)
        ),
        "%00",
        "..%2F..%2Fetc",
        "x" * 5000,
    ]
    before = state(mailer)
    async with client_for(app_for(mailer)) as http:
        for candidate in bad:
            for method in ("GET", "POST"):
                answer = await http.request(
                    method,
                    f"/u/{candidate}",
                    content=b"List-Unsubscribe=One-Click",
                    headers=ONE_CLICK,
                )
                assert answer.status_code == 404, (candidate, method, answer.status_code)
                if "/" not in candidate.replace("%2F", "/"):  # else no route matches at all
                    assert "This link does not work" in answer.text
    assert state(mailer) == before


@pytest.mark.asyncio
async def test_an_oversized_body_is_refused_and_changes_nothing(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    arrived = await deliver(mailer, smtp_server, campaign_file, "anna@example.org")
    before = state(mailer)
    async with client_for(app_for(mailer)) as http:
        answer = await http.post(
            arrived["anna@example.org"].unsubscribe,
            content=b"List-Unsubscribe=One-Click&" + b"x" * 100_000,
            headers=ONE_CLICK,
        )
    assert answer.status_code == 413
    assert state(mailer) == before


@pytest.mark.asyncio
async def test_odd_bodies_still_unsubscribe_without_an_error(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    """A mail client's POST is a request to unsubscribe, whatever its body looks like."""
    emails = [f"p{i}@example.org" for i in range(4)]
    arrived = await deliver(mailer, smtp_server, campaign_file, *emails)
    bodies = [
        (b"\xff\xfe\x00garbage", "application/x-www-form-urlencoded"),
        (b"--nope\r\n\r\n", "multipart/form-data; boundary=abc"),
        (b'{"List-Unsubscribe": "One-Click"}', "application/json"),
        (b"List-Unsubscribe=One-Click", "text/plain"),
    ]
    async with client_for(app_for(mailer)) as http:
        for address, (body, kind) in zip(emails, bodies, strict=True):
            answer = await http.post(
                arrived[address].unsubscribe, content=body, headers={"content-type": kind}
            )
            assert answer.status_code == 200, (body, kind)
    rows = [r for r in ledger(mailer) if r["status"] == "withdrawn"]
    assert len(rows) == 4 and {r["method"] for r in rows} == {"one_click"}
    assert len(suppressions(mailer)) == 4


@pytest.mark.asyncio
async def test_the_page_speaks_the_persons_language(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    write_csv: Callable[..., Path],
) -> None:
    mailer.import_contacts(write_csv("email,locale\nnoor@example.nl,nl-NL\nemma@example.org,\n"))
    arrived = await deliver(
        mailer, smtp_server, campaign_file, "noor@example.nl", "emma@example.org"
    )
    async with client_for(app_for(mailer)) as http:
        noor = await http.get(
            arrived["noor@example.nl"].unsubscribe, headers={"accept-language": "en"}
        )
        emma_nl = await http.get(
            arrived["emma@example.org"].unsubscribe,
            headers={"accept-language": "de-DE, nl;q=0.8, en;q=0.5"},
        )
        emma = await http.get(arrived["emma@example.org"].unsubscribe)
        done = await http.post(arrived["noor@example.nl"].unsubscribe)
    assert '<html lang="nl">' in noor.text and ">Afmelden</button>" in noor.text
    assert '<html lang="nl">' in emma_nl.text
    assert '<html lang="en">' in emma.text
    assert "U bent afgemeld" in done.text


@pytest.mark.asyncio
async def test_simultaneous_posts_record_one_unsubscribe(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    """A mail client's one-click and the person's own click arriving at the same moment."""
    arrived = await deliver(mailer, smtp_server, campaign_file, "anna@example.org")
    link = arrived["anna@example.org"].unsubscribe
    async with client_for(app_for(mailer)) as http:
        answers = await asyncio.gather(
            *(
                http.post(link, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
                for _ in range(6)
            )
        )
    assert [a.status_code for a in answers] == [200] * 6
    assert len([r for r in ledger(mailer) if r["status"] == "withdrawn"]) == 1
    assert len(suppressions(mailer)) == 1


def test_every_message_exists_in_both_languages() -> None:
    for key, texts in MESSAGES.items():
        assert set(texts) == set(LANGUAGES), key
        fields = {lang: set(re.findall(r"{(\w+)}", text)) for lang, text in texts.items()}
        assert fields["en"] == fields["nl"], key  # the same placeholders in both


def test_language_negotiation() -> None:
    assert negotiate("nl-NL", "en") == "nl"
    assert negotiate("de", "nl-BE,en;q=0.5") == "nl"
    assert negotiate(None, "fr, en-GB;q=0.9, nl;q=0.95") == "nl"
    assert negotiate(None, "nl;q=0, en") == "en"
    assert negotiate(None, "da, fr") == "en"
    assert negotiate(None, ";;;q=abc, ,nl;q=2") == "en"  # malformed ranges are skipped
    assert negotiate(None, "nl" + ",x" * 1000) == "en"  # absurdly long: ignored
