"""Human or machine (invariant 6): scanners and privacy proxies are recorded but flagged, and
reports count people apart. By user agent, HEAD, a click seconds after delivery, every link of
a mail clicked within a second, and the hidden honeypot link."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from mailer.engagement import (
    BURST_WINDOW,
    CLICK_GRACE,
    HONEYPOT_POSITION,
    HONEYPOT_WINDOW,
    EngagementRecorder,
    Hit,
)
from mailer.models import ConsentStatus, utcnow
from mailer.service import CampaignService, Mailer
from mailer.tokens import TokenKind, Tokens
from mailer.tracking.classify import MachineReason, agent_reason, request_reason
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign
from tests.test_tracking_pixel_and_click import (
    HUMAN,
    SentMail,
    client_for,
    events,
    make_app,
    path_of,
    send_tracked,
)

PEOPLE = [
    HUMAN,
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17726; Pro)",
    "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.12.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.6478.71 Mobile Safari/537.36",
]
MACHINES = [
    ("Mozilla/5.0", MachineReason.APPLE_MAIL_PRIVACY),
    (
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
        MachineReason.GOOGLE_IMAGE_PROXY,
    ),
    ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "yahoo"),
    ("Mozilla/5.0 (compatible; BingPreview/1.0b)", MachineReason.MICROSOFT_SAFE_LINKS),
    ("Microsoft SafeLinks Scanner", MachineReason.MICROSOFT_SAFE_LINKS),
    ("Mimecast-Link-Checker/1.0", MachineReason.MIMECAST),
    ("Mozilla/5.0 Proofpoint URL Defense", MachineReason.PROOFPOINT),
    ("Barracuda Sentinel (EE)", MachineReason.BARRACUDA),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
    ("python-requests/2.32.3", MachineReason.BOT),
    ("curl/8.5.0", MachineReason.BOT),
    ("Go-http-client/1.1", MachineReason.BOT),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/126.0", "bot"),
    ("", MachineReason.NO_USER_AGENT),
]


@pytest.mark.parametrize("agent", PEOPLE)
def test_browsers_and_mail_clients_are_people(agent: str) -> None:
    assert agent_reason(agent) is None
    assert request_reason("GET", agent, "192.0.2.7", None, is_open=True) is None


@pytest.mark.parametrize(("agent", "reason"), MACHINES)
def test_proxies_scanners_and_bots_are_machines(agent: str, reason: str) -> None:
    found = agent_reason(agent)
    assert found is not None
    if reason in ("yahoo", "bot"):
        assert found in (MachineReason.YAHOO_MAIL_PROXY, MachineReason.BOT)
    else:
        assert found is reason


def test_what_one_request_shows() -> None:
    assert request_reason("HEAD", HUMAN, "192.0.2.7") is MachineReason.HEAD_REQUEST
    # Apple's network: a proxied open, but a person's click from an Apple address is a person's
    assert request_reason("GET", HUMAN, "17.58.0.1", is_open=True) is (
        MachineReason.APPLE_MAIL_PRIVACY
    )
    assert request_reason("GET", HUMAN, "17.58.0.1", is_open=False) is None
    safelinks = "https://eur01.safelinks.protection.outlook.com/?url=https%3A%2F%2Fx"
    assert request_reason("GET", HUMAN, "192.0.2.7", safelinks) is (
        MachineReason.MICROSOFT_SAFE_LINKS
    )


# -- through the app ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_proxied_and_scanned_opens_are_flagged_and_counted_apart(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    pixel = path_of(sent.opens[0])
    async with client_for(app) as http:
        await http.get(pixel)  # the person
        await http.get(pixel, headers={"user-agent": "Mozilla/5.0"})  # Apple MPP
        await http.get(pixel, headers={"user-agent": MACHINES[1][0]})  # Gmail's proxy
        await http.get(pixel, headers={"user-agent": "Mimecast-Link-Checker/1.0"})
        await http.get(pixel, headers={"user-agent": ""})
    async with client_for(app, client=("17.58.0.1", 443)) as http:
        await http.get(pixel)  # from Apple's network
    await app.state.recorder.flush()
    assert [(e.machine, e.machine_reason) for e in events(mailer)] == [
        (False, None),
        (True, "apple_mail_privacy"),
        (True, "google_image_proxy"),
        (True, "mimecast"),
        (True, "no_user_agent"),
        (True, "apple_mail_privacy"),
    ]
    report = CampaignService(mailer).report("autumn")
    assert (report["opens"], report["unique_opens"]) == (1, 1)
    assert (report["machine_opens"], report["machine_unique_opens"]) == (5, 1)


@pytest.mark.asyncio
async def test_a_click_seconds_after_delivery_is_a_scanners(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    # delivered just now: a gateway scanning the mail on arrival clicks at once
    sent = await send_tracked(mailer, smtp_server, campaign_file, age=None)
    mail = sent["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        response = await http.get(path_of(mail.clicks[0]))
        assert response.status_code == 302  # the redirect works all the same
        await http.get(path_of(mail.opens[0]))  # an open is not judged by this rule
    await app.state.recorder.flush()
    assert [(e.kind, e.machine_reason) for e in events(mailer)] == [
        ("click", "click_seconds_after_delivery"),
        ("open", None),
    ]


@pytest.mark.asyncio
async def test_a_click_after_the_grace_period_is_a_persons(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = await send_tracked(mailer, smtp_server, campaign_file, age=CLICK_GRACE * 2)
    mail = sent["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        await http.get(path_of(mail.clicks[1]))
    await app.state.recorder.flush()
    assert [(e.kind, e.machine) for e in events(mailer)] == [("click", False)]


def click(mail: SentMail, position: int, seconds: float, agent: str = HUMAN) -> Hit:
    """A click at a chosen moment (seconds from ten minutes ago; the mail was delivered an
    hour ago), as the app would queue it."""
    reason = MachineReason.HONEYPOT.value if position == HONEYPOT_POSITION else None
    at = utcnow() - timedelta(minutes=10) + timedelta(seconds=seconds)
    return Hit("click", mail.delivery_id, mail.campaign_id, position, at, None, agent, reason)


async def record(mailer: Mailer, *batches: list[Hit]) -> None:
    """Write each batch in its own flush, as separate workers would."""
    recorder = EngagementRecorder(mailer.engine)
    for batch in batches:
        for hit in batch:
            recorder.record(hit)
        assert await recorder.flush() == len(batch)


@pytest.mark.asyncio
async def test_every_link_of_a_mail_clicked_within_a_second_is_a_scanner(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = ("fast@example.org", "slow@example.org", "split@example.org", "one@example.org")
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    fast, slow, split, one = (sent[e] for e in emails)
    window = BURST_WINDOW.total_seconds()
    await record(
        mailer,
        [
            click(fast, 0, 0),
            click(fast, 1, window * 0.6),  # both links within the window: a scanner
            click(slow, 0, 0),
            click(slow, 1, window * 5),  # a person reading on
            click(one, 1, 0),
            click(one, 1, 0.1),  # the same link twice: a double click
            click(split, 0, 100),
        ],
        [click(split, 1, 100.5)],  # written by another flush (another worker): still seen
    )
    flagged = {
        (e.delivery_id, e.link_position): e.machine_reason
        for e in events(mailer)
        if e.machine_reason
    }
    assert flagged == {
        (fast.delivery_id, 0): "all_links_within_a_second",
        (fast.delivery_id, 1): "all_links_within_a_second",
        (split.delivery_id, 0): "all_links_within_a_second",
        (split.delivery_id, 1): "all_links_within_a_second",
    }
    report = CampaignService(mailer).report("autumn")
    assert (report["clicks"], report["unique_clicks"]) == (4, 2)
    assert (report["machine_clicks"], report["machine_unique_clicks"]) == (4, 2)


@pytest.mark.asyncio
async def test_clicks_beside_a_honeypot_click_are_a_scanners(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = ("scanned@example.org", "later@example.org", "person@example.org")
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    scanned, later, person = (sent[e] for e in emails)
    wide = HONEYPOT_WINDOW.total_seconds()
    await record(
        mailer,
        [click(scanned, 0, 0)],  # before the honeypot, written first
        [click(scanned, HONEYPOT_POSITION, 5), click(later, HONEYPOT_POSITION, 0)],
        [click(scanned, 1, 10), click(later, 0, wide * 4), click(person, 0, 7)],
    )
    reasons = {(e.delivery_id, e.link_position): e.machine_reason for e in events(mailer)}
    assert reasons == {
        (scanned.delivery_id, 0): "clicked_beside_honeypot",
        (scanned.delivery_id, HONEYPOT_POSITION): "honeypot",
        (scanned.delivery_id, 1): "clicked_beside_honeypot",
        (later.delivery_id, HONEYPOT_POSITION): "honeypot",
        (later.delivery_id, 0): None,  # minutes later: the person, after the scanner
        (person.delivery_id, 0): None,
    }


HONEYPOT_LINK = re.compile(
    r'<div style="display:none;[^"]*" aria-hidden="true">'
    r'<a href="http://127\.0\.0\.1:8000/c/([^"]+)" tabindex="-1"'
)


@pytest.mark.asyncio
@pytest.mark.parametrize("fragment", [True, False], ids=["in-the-layout", "own-document"])
async def test_the_honeypot_is_hidden_in_click_tracked_mail_only(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    fragment: bool,
) -> None:
    html = '<p>Read <a href="https://shop.example.com/a">this</a>.</p>'
    if not fragment:
        html = f"<html><body>{html}</body></html>"
    for email in ("a@example.org", "b@example.org", "plain@example.org"):
        mailer.record_consent(email, "marketing", ConsentStatus.GRANTED, source="web")
    for email in ("a@example.org", "b@example.org"):
        mailer.record_consent(email, "tracking", ConsentStatus.GRANTED, source="web")
    await send_campaign(mailer, campaign_file("clicks", html=html), smtp_server)
    sent_with_clicks = len(smtp_server.messages)
    await send_campaign(
        mailer, campaign_file("no-clicks", html=html, extra="track_clicks = false\n"), smtp_server
    )
    tokens = Tokens(mailer.settings.secret_keys)
    seen = set()
    for number, captured in enumerate(smtp_server.messages):
        message = captured.parse()
        body = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        honeypots = HONEYPOT_LINK.findall(body)
        tracked = captured.recipients[0] != "plain@example.org"
        if tracked and number < sent_with_clicks:
            (token,) = honeypots
            assert tokens.verify(TokenKind.CLICK, token)[2] == HONEYPOT_POSITION
            assert token not in text
            seen.add(captured.recipients[0])
        else:
            assert honeypots == [] and "tabindex" not in body
    assert len(smtp_server.messages) == 6
    assert seen == {"a@example.org", "b@example.org"}
