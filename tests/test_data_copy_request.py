"""A person asks for a copy of their data in the preference centre (obligation 10): the identity
check is a confirmation link mailed to the address; the copy is then a timed download link.

Through the app `mailer serve` runs (ASGI, in-process) and, for the mail, the real capture SMTP
server; the register is read with `mailer privacy requests`, as the privacy officer does.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select

from mailer import privacy
from mailer.models import ConsentStatus, PrivacyRequest
from mailer.service import Mailer
from mailer.tokens import ACCESS_CONFIRM_MAX_AGE, ACCESS_DOWNLOAD_MAX_AGE, TokenKind, Tokens
from mailer.tracking.app import create_app
from mailer.transport import MemoryTransport
from tests.conftest import CliResult
from tests.recipient_support import (
    TOKEN,
    Received,
    app_for,
    client_for,
    deliver,
    parse_mail,
    state,
)
from tests.smtp_server import CaptureServer

ANNA = "anna@example.org"
BOB = "bob@example.org"
CONFIRM_LINK = re.compile(rf"http://127\.0\.0\.1:8000(/privacy/confirm/{TOKEN})")
DOWNLOAD_LINK = re.compile(rf'href="(/privacy/download/{TOKEN})"')


async def _people(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> dict[str, Received]:
    mailer.record_consent(ANNA, "tracking", ConsentStatus.GRANTED, source="web")
    mailer.record_consent(BOB, "klustips", ConsentStatus.GRANTED, source="phone")
    arrived = await deliver(mailer, smtp_server, campaign_file, ANNA, BOB)
    smtp_server.clear()
    return arrived


@asynccontextmanager
async def site(mailer: Mailer, smtp_server: CaptureServer) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its own mails going to the capture SMTP server, as `mailer serve` sends."""
    served = Mailer(replace(mailer.settings, smtp_url=smtp_server.url), engine=mailer.engine)
    app = create_app(served)
    try:
        async with client_for(app) as http:
            yield http
    finally:
        await app.state.transport.close()


def confirm_link(data: bytes) -> str:
    message = parse_mail(data)
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    found = CONFIRM_LINK.search(text)
    assert found, text
    assert found[0] in html  # the same link in both parts
    return found[1]


def register(cli: Callable[..., CliResult]) -> list[dict[str, Any]]:
    result = cli("privacy", "requests", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def requests_rows(mailer: Mailer) -> list[dict[str, Any]]:
    with mailer.session() as session:
        rows = session.exec(select(PrivacyRequest).order_by(PrivacyRequest.id))  # type: ignore[arg-type]
        return [row.model_dump() for row in rows]


def age_requests(mailer: Mailer, by: timedelta) -> None:
    """Move every request's receipt back in time, as if it came in `by` earlier."""
    with mailer.session() as session:
        for row in session.exec(select(PrivacyRequest)):
            row.received_at = row.received_at - by
            session.add(row)


def signed_long_ago(
    mailer: Mailer, monkeypatch: pytest.MonkeyPatch, kind: TokenKind, payload: tuple[int, ...]
) -> str:
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 8 * 24 * 3600)
    try:
        return Tokens(mailer.settings.secret_keys).sign(kind, payload)
    finally:
        monkeypatch.setattr(time, "time", real_time)


async def ready_page(http: httpx.AsyncClient, link: str) -> str:
    """Confirm with the button; the path of the download link the page offers."""
    page = await http.post(link)
    assert page.status_code == 200, page.text
    found = DOWNLOAD_LINK.search(page.text)
    assert found, page.text
    return found[1]


@pytest.mark.asyncio
async def test_a_person_confirms_by_mail_and_downloads_their_own_data(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Callable[..., CliResult],
) -> None:
    people = await _people(mailer, smtp_server, campaign_file)
    anna = people[ANNA]
    async with site(mailer, smtp_server) as http:
        asked = await http.post(anna.preferences, data={"action": "data_copy"})
        assert asked.status_code == 200
        assert "we have sent an e-mail with a confirmation link to a***@example.org" in asked.text

        (mail,) = smtp_server.wait_for(1)
        assert mail.recipients == (ANNA,)
        message = mail.parse()
        assert "copy of your data" in str(message["Subject"])
        assert message["Auto-Submitted"] == "auto-generated"
        assert message["List-Unsubscribe"] is None  # transactional: nothing to unsubscribe from
        link = confirm_link(mail.data)

        (entry,) = register(cli)
        assert (entry["email"], entry["kind"], entry["identity_check"]) == (
            ANNA,
            "access",
            "pending",
        )
        assert entry["completed_at"] is None

        # Opening the link (a scanner may) shows a button and changes nothing.
        before = (state(mailer), requests_rows(mailer))
        page = await http.get(link)
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        assert "a***@example.org" in page.text and "<button" in page.text
        assert (state(mailer), requests_rows(mailer)) == before

        download = await ready_page(http, link)
        (entry,) = register(cli)
        assert entry["identity_check"] == "verified" and entry["verified_at"] is not None
        head = await http.head(download)
        assert head.status_code == 200 and head.content == b""
        (entry,) = register(cli)
        assert entry["completed_at"] is None  # not answered until the person has the copy

        got = await http.get(download)
        assert got.status_code == 200
        assert got.headers["content-type"] == "application/json"
        assert got.headers["content-disposition"].startswith('attachment; filename="my-data-')
        assert got.headers["cache-control"] == "no-store"
        assert got.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" in got.headers
        copy = got.json()
        assert copy["contact"]["email"] == ANNA
        assert {(r["purpose"], r["status"]) for r in copy["consent"]} == {
            ("tracking", "granted"),
            ("marketing", "granted"),
        }
        assert [d["campaign"] for d in copy["deliveries"]] == ["autumn"]
        assert [r["identity_check"] for r in copy["requests"]] == ["verified"]
        assert BOB not in got.text and "klustips" not in got.text  # nothing of anyone else

        (entry,) = register(cli)
        assert entry["completed_at"] is not None
        assert entry["outcome"] == "answered: export (json) via download link"
        table = cli("privacy", "requests")
        assert "verified" in table.stdout and "done" in table.stdout

        # The link works again while it is valid; the answer stays the first download's.
        again = await http.get(download)
        assert again.status_code == 200 and again.json()["contact"]["email"] == ANNA
        assert [a["action"] for a in again.json()["audit"]].count("privacy.export") == 1
    (later,) = register(cli)
    assert later["completed_at"] == entry["completed_at"]


@pytest.mark.asyncio
async def test_an_unsubscribed_person_gets_the_mail_in_their_language(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    """The mail is the person's request, not marketing: an unsubscribe does not stop it."""
    anna = (await _people(mailer, smtp_server, campaign_file))[ANNA]
    async with site(mailer, smtp_server) as http:
        assert (await http.post(anna.unsubscribe)).status_code == 200
        asked = await http.post(
            anna.preferences, data={"action": "data_copy"}, headers={"accept-language": "nl"}
        )
    assert "bevestigingslink gestuurd naar a***@example.org" in asked.text
    (mail,) = smtp_server.wait_for(1)
    message = mail.parse()
    assert mail.recipients == (ANNA,)
    assert str(message["Subject"]).startswith("Bevestig uw verzoek om een kopie")
    assert message["Content-Language"] == "nl"


@pytest.mark.asyncio
async def test_the_mail_is_limited_per_address(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    anna = (await _people(mailer, smtp_server, campaign_file))[ANNA]
    transport = MemoryTransport()
    app = app_for(mailer, transport)
    async with client_for(app) as http:
        await http.post(anna.preferences, data={"action": "data_copy"})
    # from another connection, at once: held back all the same (it is the address that counts)
    async with client_for(app, client=("192.0.2.7", 50000)) as http:
        repeat = await http.post(anna.preferences, data={"action": "data_copy"})
    assert repeat.status_code == 200
    assert "We recently sent an e-mail with a confirmation link" in repeat.text
    assert len(transport.messages) == 1 and len(requests_rows(mailer)) == 1

    async with client_for(app) as http:
        for _ in range(4):  # every ten minutes: three a day, then no more
            age_requests(mailer, timedelta(minutes=11))
            await http.post(anna.preferences, data={"action": "data_copy"})
    assert len(transport.messages) == 3 and len(requests_rows(mailer)) == 3
    assert {m.recipient for m in transport.messages} == {ANNA}


@pytest.mark.asyncio
async def test_a_link_opens_its_own_request_only(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    people = await _people(mailer, smtp_server, campaign_file)
    transport = MemoryTransport()
    tokens = Tokens(mailer.settings.secret_keys)
    async with client_for(app_for(mailer, transport)) as http:
        for person in (ANNA, BOB):
            await http.post(people[person].preferences, data={"action": "data_copy"})
        anna_mail, bob_mail = transport.messages
        assert (anna_mail.recipient, bob_mail.recipient) == (ANNA, BOB)
        anna_link = confirm_link(anna_mail.data)
        anna_download = await ready_page(http, anna_link)
        anna_request, bob_request = requests_rows(mailer)
        bob_contact = bob_request["contact_id"]

        before = requests_rows(mailer)
        for bad in (
            anna_download[:-1],  # tampered
            "/privacy/download/" + anna_link.rsplit("/", 1)[1],  # a confirm link's token
            "/privacy/confirm/" + anna_download.rsplit("/", 1)[1],  # and the other way round
            # anna's request with bob's id, and bob's unconfirmed request, signed right
            "/privacy/download/"
            + tokens.sign(TokenKind.ACCESS_DOWNLOAD, (anna_request["id"], bob_contact)),
            "/privacy/download/"
            + tokens.sign(TokenKind.ACCESS_DOWNLOAD, (bob_request["id"], bob_contact)),
            "/privacy/confirm/"
            + tokens.sign(TokenKind.ACCESS_CONFIRM, (bob_request["id"] + 99, bob_contact)),
            "/privacy/download/" + tokens.sign(TokenKind.PREFERENCES, (anna_request["id"],)),
        ):
            answer = await http.get(bad)
            assert answer.status_code == 404, bad
            assert ANNA not in answer.text and BOB not in answer.text
        assert (await http.post(anna_download)).status_code == 405
        assert requests_rows(mailer) == before

        mine = await http.get(anna_download)
    assert mine.json()["contact"]["email"] == ANNA and BOB not in mine.text


@pytest.mark.asyncio
async def test_expired_links_are_refused_with_a_clear_page(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ACCESS_CONFIRM_MAX_AGE == ACCESS_DOWNLOAD_MAX_AGE == 7 * 24 * 3600
    anna = (await _people(mailer, smtp_server, campaign_file))[ANNA]
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        await http.post(anna.preferences, data={"action": "data_copy"})
        (request,) = requests_rows(mailer)
        payload = (request["id"], request["contact_id"])
        stale_confirm = signed_long_ago(mailer, monkeypatch, TokenKind.ACCESS_CONFIRM, payload)
        before = requests_rows(mailer)
        page = await http.get(f"/privacy/confirm/{stale_confirm}")
        post = await http.post(
            f"/privacy/confirm/{stale_confirm}", headers={"accept-language": "nl"}
        )
        assert page.status_code == 410 and post.status_code == 410
        assert "Links for a copy of your data are valid for 7 days" in page.text
        assert "Deze link is verlopen" in post.text
        assert requests_rows(mailer) == before  # still waiting for the identity check

        await ready_page(http, confirm_link(transport.messages[0].data))
        stale_download = signed_long_ago(mailer, monkeypatch, TokenKind.ACCESS_DOWNLOAD, payload)
        late = await http.get(f"/privacy/download/{stale_download}")
    assert late.status_code == 410 and "content-disposition" not in late.headers
    assert "This link has expired" in late.text
    (request,) = requests_rows(mailer)
    assert request["completed_at"] is None  # nothing was handed over


@pytest.mark.asyncio
async def test_after_erasure_or_closing_the_links_lead_nowhere(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Callable[..., CliResult],
) -> None:
    people = await _people(mailer, smtp_server, campaign_file)
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        for person in (ANNA, BOB):
            await http.post(people[person].preferences, data={"action": "data_copy"})
        anna_link, bob_link = (confirm_link(m.data) for m in transport.messages)
        anna_download = await ready_page(http, anna_link)

        privacy.erase(mailer, ANNA)
        for method, path in (("GET", anna_link), ("POST", anna_link), ("GET", anna_download)):
            gone = await http.request(method, path)
            assert gone.status_code == 404, (method, path)
            assert "No data for this link" in gone.text and ANNA not in gone.text
        as_json = await http.get(anna_download, headers={"accept": "application/json"})
        assert as_json.status_code == 404 and as_json.json()["error"] == "not_found"

        bob_request = next(r for r in register(cli) if r["email"] == BOB)
        closed = cli("privacy", "complete", str(bob_request["id"]), "--outcome", "answered by post")
        assert closed.exit_code == 0, closed.stdout + closed.stderr
        refused = await http.get(bob_link)
        assert refused.status_code == 410 and "This request is closed" in refused.text
