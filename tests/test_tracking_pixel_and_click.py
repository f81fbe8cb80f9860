"""The tracking app's pixel, click redirect and health check, through the real ASGI app, with
links taken from mails that really arrived at an SMTP server (invariants 5 and 6)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from starlette.applications import Starlette

from mailer import consent
from mailer.config import load_settings
from mailer.engagement import EngagementRecorder, Hit
from mailer.errors import ConfigError
from mailer.models import (
    HONEYPOT_POSITION,
    CampaignLink,
    ConsentMethod,
    ConsentStatus,
    Delivery,
    EngagementEvent,
    utcnow,
)
from mailer.report import ENGAGEMENT_KEYS
from mailer.service import CampaignService, Mailer
from mailer.tokens import TokenKind, Tokens
from mailer.tracking.app import create_app
from mailer.tracking.routes import PIXEL
from mailer.transport import MemoryTransport
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign

BASE = "http://127.0.0.1:8000"
HUMAN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
LINKS = ["https://shop.example.com/autumn", "https://shop.example.com/tips?x=1&y=2"]
events_table = EngagementEvent.__table__  # type: ignore[attr-defined]
deliveries_table = Delivery.__table__  # type: ignore[attr-defined]


# -- helpers shared by the tracking tests -------------------------------------------------------


@dataclass(frozen=True)
class SentMail:
    """What one tracked contact received: the links as they arrived."""

    email: str
    delivery_id: int
    campaign_id: int
    opens: list[str]  # the pixel URL
    clicks: list[str]  # the campaign's links, in order
    honeypot: str
    unsubscribe: str
    preferences: str


async def send_tracked(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    emails: tuple[str, ...] = ("tracked@example.org",),
    *,
    untracked: tuple[str, ...] = ("plain@example.org",),
    name: str = "autumn",
    age: timedelta | None = timedelta(hours=1),
) -> dict[str, SentMail]:
    """Send a campaign to contacts who allow tracking (and some who do not), and return the
    links each tracked one received. `age` moves the deliveries back in time, so a click is not
    taken for a scanner's because it comes seconds after delivery."""
    for email in emails:
        mailer.record_consent(email, "marketing", ConsentStatus.GRANTED, source="web")
        mailer.record_consent(email, "tracking", ConsentStatus.GRANTED, source="web")
    for email in untracked:
        mailer.record_consent(email, "marketing", ConsentStatus.GRANTED, source="web")
    before = len(smtp_server.messages)
    await send_campaign(mailer, campaign_file(name), smtp_server)
    if age is not None:
        with mailer.engine.begin() as conn:
            rows = conn.execute(select(deliveries_table.c.id, deliveries_table.c.finished_at))
            for delivery_id, finished in rows.all():
                conn.execute(
                    update(deliveries_table)
                    .where(deliveries_table.c.id == delivery_id)
                    .values(finished_at=finished - age)
                )
    tokens = Tokens(mailer.settings.secret_keys)
    sent: dict[str, SentMail] = {}
    for captured in smtp_server.messages[before:]:
        email = captured.recipients[0]
        if email not in emails:
            continue
        html = captured.parse().get_body(("html",)).get_content()  # type: ignore[union-attr]
        clicks = re.findall(r'href="(http://127\.0\.0\.1:8000/c/[^"]+)"', html)
        opens = re.findall(r'src="(http://127\.0\.0\.1:8000/o/[^"]+)"', html)
        unsubscribe = re.findall(r'href="(http://127\.0\.0\.1:8000/u/[^"]+)"', html)
        preferences = re.findall(r'href="(http://127\.0\.0\.1:8000/p/[^"]+)"', html)
        delivery_id, campaign_id = tokens.verify(TokenKind.OPEN, opens[0].rsplit("/", 1)[1])
        sent[email] = SentMail(
            email,
            delivery_id,
            campaign_id,
            opens,
            clicks[:-1],
            clicks[-1],
            unsubscribe[0],
            preferences[0],
        )
    assert set(sent) == set(emails)
    return sent


@asynccontextmanager
async def client_for(
    app: Starlette,
    *,
    lifespan: bool = False,
    client: tuple[str, int] = ("192.0.2.7", 50000),
    user_agent: str = HUMAN,
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the app in-process. ASGITransport runs no lifespan: with
    `lifespan=True` the app's own lifespan runs around the block (flush loop, final flush)."""
    transport = httpx.ASGITransport(app, client=client)
    async with httpx.AsyncClient(
        transport=transport,
        base_url=BASE,
        headers={"user-agent": user_agent},
        follow_redirects=False,
    ) as http:
        if lifespan:
            async with app.router.lifespan_context(app):
                yield http
        else:
            yield http


def path_of(url: str) -> str:
    return url.removeprefix(BASE)


def events(mailer: Mailer) -> list[Any]:
    with mailer.engine.connect() as conn:
        return list(conn.execute(select(events_table).order_by(events_table.c.id)))


def event_count(mailer: Mailer) -> int:
    with mailer.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events_table)).scalar_one())


def make_app(mailer: Mailer, **options: Any) -> Starlette:
    return create_app(mailer, transport=MemoryTransport(), **options)


# -- the pixel ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_pixel_answers_every_token_and_records_only_valid_ones(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    pixel = path_of(sent.opens[0])
    token = pixel.rsplit("/", 1)[1]
    click_token = path_of(sent.clicks[0]).rsplit("/", 1)[1]
    async with client_for(app) as http:
        for path in (
            pixel,
            "/o/garbage",
            "/o/" + token[:-1] + ("A" if token[-1] != "A" else "B"),  # tampered
            "/o/" + click_token,  # a click token is no open token
            "/o/" + "x" * 5000,
            "/o/%00",
        ):
            response = await http.get(path)
            assert response.status_code == 200, path
            assert response.content == PIXEL and len(PIXEL) == 43
            assert PIXEL.startswith(b"GIF89a")
            assert response.headers["content-type"] == "image/gif"
            assert "no-store" in response.headers["cache-control"]
    assert app.state.recorder.pending == 1  # recorded in memory, not yet written
    assert event_count(mailer) == 0
    assert await app.state.recorder.flush() == 1

    (event,) = events(mailer)
    contact_id = mailer.show_contact("tracked@example.org").contact.id
    assert (event.kind, event.delivery_id, event.campaign_id, event.contact_id) == (
        "open",
        sent.delivery_id,
        sent.campaign_id,
        contact_id,
    )
    assert event.link_position is None
    assert event.ip_masked == "192.0.2.0"  # IPv4 keeps /24
    assert event.user_agent == HUMAN
    assert (event.machine, event.machine_reason) == (False, None)
    report = CampaignService(mailer).report("autumn")
    assert (report["opens"], report["unique_opens"], report["machine_opens"]) == (1, 1, 0)


@pytest.mark.asyncio
async def test_ipv6_addresses_keep_48_bits_and_forwarded_headers_are_not_believed_by_the_app(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app, client=("2001:db8:1234:5678:9abc::1", 443)) as http:
        await http.get(path_of(sent.opens[0]))
    async with client_for(app, client=("192.0.2.7", 443)) as http:
        # the client address comes from the connection (uvicorn's proxy handling, configured
        # by `mailer serve --trusted-proxies`, rewrites it for trusted proxies only)
        await http.get(path_of(sent.opens[0]), headers={"x-forwarded-for": "203.0.113.9"})
    async with client_for(app, client=("::ffff:198.51.100.20", 443)) as http:
        await http.get(path_of(sent.opens[0]), headers={"user-agent": "A" * 2000 + "\x7f"})
    await app.state.recorder.flush()
    first, second, third = events(mailer)
    assert first.ip_masked == "2001:db8:1234::"
    assert second.ip_masked == "192.0.2.0"
    assert third.ip_masked == "198.51.100.0"
    assert third.user_agent == "A" * 512


# -- the click redirect -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_click_leads_to_the_campaigns_own_link_and_nowhere_else(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    tokens = app.state.tokens
    assert len(sent.clicks) == 2
    async with client_for(app) as http:
        for position, url in enumerate(sent.clicks):
            response = await http.get(path_of(url))
            assert response.status_code == 302
            assert response.headers["location"] == LINKS[position]
            assert "no-store" in response.headers["cache-control"]
        # signed by us, but not a link of this campaign: no redirect, nothing recorded
        beyond = tokens.sign(TokenKind.CLICK, (sent.delivery_id, sent.campaign_id, 2))
        unknown_campaign = tokens.sign(TokenKind.CLICK, (sent.delivery_id, 999, 0))
        wrong_kind = tokens.sign(TokenKind.OPEN, (sent.delivery_id, sent.campaign_id, 0))
        token = path_of(sent.clicks[0]).rsplit("/", 1)[1]
        for path in (
            f"/c/{beyond}",
            f"/c/{unknown_campaign}",
            f"/c/{wrong_kind}",
            "/c/" + token[:-2],
            "/c/" + token + "A",
            "/c/" + token.upper(),
            "/c/https:%2F%2Fevil.example",
            path_of(sent.clicks[0]) + "/",  # no slash-redirect either
            "/c/%00",
            "/c/" + "x" * 5000,
        ):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert "location" not in response.headers
            assert response.headers["content-type"].startswith("text/plain")
    await app.state.recorder.flush()
    clicks = events(mailer)
    # both links of one mail within a second: a scanner (test_engagement_classification.py)
    assert [(e.kind, e.link_position, e.machine_reason) for e in clicks] == [
        ("click", 0, "all_links_within_a_second"),
        ("click", 1, "all_links_within_a_second"),
    ]
    with mailer.session() as session:
        stored = session.execute(select(func.count()).select_from(CampaignLink)).scalar_one()
    assert stored == 2  # the honeypot is no link of the campaign


@pytest.mark.asyncio
async def test_the_honeypot_leads_nowhere_and_is_recorded_as_a_scanner(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    tokens = app.state.tokens
    token = path_of(sent.honeypot).rsplit("/", 1)[1]
    payload = (sent.delivery_id, sent.campaign_id, HONEYPOT_POSITION)
    assert tokens.verify(TokenKind.CLICK, token) == payload
    async with client_for(app) as http:
        response = await http.get(path_of(sent.honeypot))
    assert response.status_code == 404 and "location" not in response.headers
    await app.state.recorder.flush()
    (event,) = events(mailer)
    assert (event.kind, event.link_position) == ("click", HONEYPOT_POSITION)
    assert (event.machine, event.machine_reason) == (True, "honeypot")
    report = CampaignService(mailer).report("autumn")
    assert (report["clicks"], report["machine_clicks"], report["machine_unique_clicks"]) == (
        0,
        1,
        1,
    )


@pytest.mark.asyncio
async def test_tokens_made_before_they_carried_the_campaign_still_work(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    tokens: Tokens = app.state.tokens
    legacy_open = tokens.sign(TokenKind.OPEN, (sent.delivery_id,))
    legacy_click = tokens.sign(TokenKind.CLICK, (sent.delivery_id, 1))
    gone = tokens.sign(TokenKind.CLICK, (sent.delivery_id + 1000, 0))
    async with client_for(app) as http:
        assert (await http.get(f"/o/{legacy_open}")).status_code == 200
        response = await http.get(f"/c/{legacy_click}")
        assert (response.status_code, response.headers["location"]) == (302, LINKS[1])
        assert (await http.get(f"/c/{gone}")).status_code == 404
    await app.state.recorder.flush()
    assert [(e.kind, e.campaign_id, e.link_position) for e in events(mailer)] == [
        ("open", sent.campaign_id, None),
        ("click", sent.campaign_id, 1),
    ]


@pytest.mark.asyncio
async def test_head_requests_are_answered_and_counted_as_machines(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        pixel = await http.head(path_of(sent.opens[0]))
        click = await http.head(path_of(sent.clicks[0]))
        health = await http.head("/healthz")
    assert (pixel.status_code, pixel.headers["content-type"]) == (200, "image/gif")
    assert pixel.content == b""
    assert (click.status_code, click.headers["location"]) == (302, LINKS[0])
    assert health.status_code == 200
    await app.state.recorder.flush()
    assert [(e.kind, e.machine, e.machine_reason) for e in events(mailer)] == [
        ("open", True, "head_request"),
        ("click", True, "head_request"),
    ]


# -- security headers and errors ------------------------------------------------------------------

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
}


@pytest.mark.asyncio
async def test_every_response_carries_the_security_headers(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        responses = [
            await http.get(path_of(sent.opens[0])),
            await http.get("/o/bad"),
            await http.get(path_of(sent.clicks[0])),
            await http.get("/c/bad"),
            await http.get("/healthz"),
            await http.get("/no/such/page"),
            await http.delete("/o/bad"),
        ]
    assert [r.status_code for r in responses] == [200, 200, 302, 404, 200, 404, 405]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get_list(name) == [value], (response.url, name)


@pytest.mark.asyncio
async def test_a_click_the_database_cannot_resolve_is_a_503_with_the_security_headers(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path], tmp_path: Path
) -> None:
    """The pixel and click routes are answered before Starlette's stack (TrackingApp); their
    errors must still be answered as the stack would, security headers included."""
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    down = Mailer(
        load_settings(
            {
                "MAILER_DATABASE_URL": f"sqlite:///{tmp_path / 'no' / 'db.sqlite'}",
                "MAILER_SECRET_KEYS": ",".join(mailer.settings.secret_keys),
            }
        )
    )
    try:
        async with client_for(make_app(down)) as http:
            click = await http.get(path_of(sent.clicks[0]))  # the link table cannot be read
            pixel = await http.get(path_of(sent.opens[0]))  # needs no database to answer
    finally:
        down.close()
    assert (click.status_code, click.headers["retry-after"]) == (503, "5")
    assert (pixel.status_code, pixel.content) == (200, PIXEL)
    for response in (click, pixel):
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get_list(name) == [value], (response.url, name)


@pytest.mark.asyncio
async def test_the_app_mounted_under_a_path_prefix_answers_through_its_router(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    transport = httpx.ASGITransport(app, root_path="/track")
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
        click = await http.get("/track" + path_of(sent.clicks[1]))
        pixel = await http.get("/track" + path_of(sent.opens[0]))
        bad = await http.get("/track/c/bad")
    assert (click.status_code, click.headers["location"]) == (302, LINKS[1])
    assert (pixel.status_code, bad.status_code) == (200, 404)
    await app.state.recorder.flush()
    assert [(e.kind, e.link_position) for e in events(mailer)] == [("click", 1), ("open", None)]


def test_the_logo_origin_is_the_only_other_image_source(mailer: Mailer) -> None:
    def app_with_logo(logo_url: str) -> Starlette:
        settings = load_settings(
            {
                "MAILER_DATABASE_URL": mailer.settings.database_url,
                "MAILER_SECRET_KEYS": ",".join(mailer.settings.secret_keys),
                "MAILER_LOGO_URL": logo_url,
            }
        )
        return make_app(Mailer(settings, mailer.engine))

    app = app_with_logo("https://cdn.example.com:8443/brand/logo.png?v=2")
    (middleware,) = app.user_middleware
    policy = dict(middleware.kwargs["headers"])[b"content-security-policy"].decode()
    assert "; img-src 'self' data: https://cdn.example.com:8443; " in policy
    for bad in ("javascript:alert(1)", "https://x.example; script-src *", "ftp://x.example/l.png"):
        with pytest.raises(ConfigError):
            app_with_logo(bad)


@pytest.mark.asyncio
async def test_healthz_checks_the_database(mailer: Mailer, tmp_path: Path) -> None:
    async with client_for(make_app(mailer)) as http:
        response = await http.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})

    missing = tmp_path / "no" / "such" / "folder" / "mailer.db"
    settings = load_settings(
        {"MAILER_DATABASE_URL": f"sqlite:///{missing}", "MAILER_SECRET_KEYS": "k" * 40}
    )
    down = Mailer(settings)
    try:
        async with client_for(make_app(down)) as http:
            response = await http.get("/healthz")
    finally:
        down.close()
    assert (response.status_code, response.json()) == (503, {"status": "unavailable"})


# -- recording: off the request's path, batched, nothing lost ------------------------------------


@pytest.mark.asyncio
async def test_events_are_written_in_the_background_and_none_is_lost(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = tuple(f"reader{i}@example.org" for i in range(8))
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    paths = [path_of(url) for mail in sent.values() for url in (*mail.opens, *mail.clicks)]
    requests = paths * 25  # 600 requests, 24 per delivery

    app = make_app(mailer, flush_interval=0.05)
    async with client_for(app, lifespan=True) as http:
        responses = await asyncio.gather(*(http.get(path) for path in requests))
        assert {r.status_code for r in responses} == {200, 302}
        stats = app.state.recorder.stats
        for _ in range(250):  # the flush loop writes them, nobody calls flush()
            if stats.written == len(requests):
                break
            await asyncio.sleep(0.02)
        assert event_count(mailer) == len(requests)
        assert (stats.recorded, stats.written, stats.dropped) == (len(requests), len(requests), 0)

    # what is still queued at shutdown is written by the shutdown
    app = make_app(mailer, flush_interval=3600)
    async with client_for(app, lifespan=True) as http:
        for path in requests[:50]:
            await http.get(path)
        assert event_count(mailer) == len(requests)  # queued in memory only
    assert event_count(mailer) == len(requests) + 50


@pytest.mark.asyncio
async def test_events_wait_in_memory_while_the_database_is_down(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path], tmp_path: Path
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    down = Mailer(
        load_settings(
            {
                "MAILER_DATABASE_URL": f"sqlite:///{tmp_path / 'no' / 'db.sqlite'}",
                "MAILER_SECRET_KEYS": "k" * 40,
            }
        )
    )
    recorder = EngagementRecorder(down.engine, max_pending=3)
    for _ in range(4):  # the fourth finds the queue full
        recorder.record(
            Hit("open", sent.delivery_id, sent.campaign_id, None, utcnow(), None, HUMAN, None)
        )
    assert await recorder.flush() == 0
    assert (recorder.pending, recorder.stats.failed_flushes) == (3, 1)
    assert (recorder.stats.dropped, recorder.stats.unaccounted) == (1, 3)  # 3 still queued
    recorder.engine = mailer.engine  # the database is back
    assert await recorder.flush() == 3
    assert recorder.pending == 0 and event_count(mailer) == 3
    assert recorder.stats.account() == (
        "opens and clicks: 4 received, 3 written, 0 left out (delivery erased or row refused), "
        "1 dropped, 0 unaccounted"
    )
    down.close()


@pytest.mark.asyncio
async def test_events_of_deliveries_that_are_gone_are_left_out(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    recorder = EngagementRecorder(mailer.engine)
    at = utcnow()
    delivery, campaign = sent.delivery_id, sent.campaign_id
    recorder.record(Hit("open", delivery, campaign, None, at, None, HUMAN, None))
    recorder.record(Hit("open", delivery + 99, campaign, None, at, None, None, None))  # erased
    recorder.record(Hit("open", delivery, campaign + 1, None, at, None, None, None))  # mismatch
    assert await recorder.flush() == 1
    assert (recorder.stats.written, recorder.stats.discarded) == (1, 2)


# -- reports ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_report_counts_people_and_machines_apart(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = ("ann@example.org", "bob@example.org", "cas@example.org")
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    ann, bob, cas = (sent[e] for e in emails)
    app = make_app(mailer)
    async with client_for(app) as http:
        for _ in range(3):
            await http.get(path_of(ann.opens[0]))  # 3 opens, 1 unique
        await http.get(path_of(bob.opens[0]))
        await http.get(path_of(ann.clicks[1]))
        await http.get(path_of(ann.clicks[1]))
        await http.get(path_of(cas.opens[0]), headers={"user-agent": "Mozilla/5.0"})  # Apple MPP
        await http.get(path_of(cas.opens[0]), headers={"user-agent": "Mozilla/5.0"})
        await http.get(path_of(bob.honeypot))
    await app.state.recorder.flush()

    # two unsubscribes through this campaign's links (as the recipient pages record them),
    # one of them for two purposes, and one unrelated withdrawal
    with mailer.session() as session:
        for mail, method, purposes in (
            (ann, ConsentMethod.ONE_CLICK, ("marketing", "tracking")),
            (cas, ConsentMethod.UNSUBSCRIBE_LINK, ("marketing",)),
        ):
            contact_id = mailer.show_contact(mail.email).contact.id
            assert contact_id is not None
            for purpose in purposes:
                consent.record(
                    session,
                    contact_id=contact_id,
                    purpose=purpose,
                    status=ConsentStatus.WITHDRAWN,
                    method=method.value,
                    source="test",
                    evidence=f"campaign:{mail.campaign_id}:delivery:{mail.delivery_id}",
                )
    mailer.record_consent("bob@example.org", "marketing", ConsentStatus.WITHDRAWN, source="phone")

    report = CampaignService(mailer).report("autumn")
    assert {key: report[key] for key in ENGAGEMENT_KEYS} == {
        "opens": 4,
        "unique_opens": 2,
        "clicks": 2,
        "unique_clicks": 1,
        "machine_opens": 2,
        "machine_unique_opens": 1,
        "machine_clicks": 1,
        "machine_unique_clicks": 1,
        "unsubscribes": 2,
    }


# -- `mailer serve` -------------------------------------------------------------------------


async def wait_until_serving(
    http: httpx.AsyncClient, server: subprocess.Popen[bytes], seconds: float = 30
) -> httpx.Response:
    """Poll /healthz until `mailer serve` answers 200; its answer."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            health = await http.get("/healthz")
            if health.status_code == 200:
                return health
        except httpx.TransportError:
            pass
        assert server.poll() is None, server.communicate()
        assert time.monotonic() < deadline, "mailer serve did not start"
        await asyncio.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve(
    env: dict[str, str], cwd: Path, *options: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`mailer serve` on a free loopback port with the test's settings (and the default
    writer); the process and its base URL."""
    port = _free_port()
    environment = {**os.environ, **env}
    environment.pop("MAILER_TRACKING_WRITER", None)
    database_url = environment.pop("MAILER_DATABASE_URL")
    command = [sys.executable, "-m", "mailer", "--db", database_url, "serve"]
    command += ["--port", str(port), "--log-level", "warning", *options]
    server = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    return server, f"http://127.0.0.1:{port}"


def stop_serve(server: subprocess.Popen[bytes]) -> bytes:
    """SIGTERM, as a service manager stops it; what `mailer serve` wrote to standard error."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        server.kill()
        raise


@pytest.mark.asyncio
async def test_mailer_serve_runs_workers_and_writes_every_event_on_shutdown(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    server, base = start_serve(env, tmp_path, "--workers", "2")
    try:
        async with httpx.AsyncClient(base_url=base, headers={"user-agent": HUMAN}) as http:
            health = await wait_until_serving(http, server)
            assert health.json() == {"status": "ok"}
            assert health.headers["referrer-policy"] == "no-referrer"
            assert "server" not in health.headers
            requests = 0
            for _ in range(20):
                pixel = await http.get(path_of(sent.opens[0]))
                click = await http.get(path_of(sent.clicks[0]))
                assert (pixel.status_code, click.status_code) == (200, 302)
                requests += 2
    finally:
        stderr = stop_serve(server)
    assert server.returncode == 0, stderr
    assert event_count(mailer) == requests  # every event written, by the shutdown at the latest


# The writer flushes every second; a generous bound, since CI shares its two cores with the
# suite. What it rules out is a server that writes only when it shuts down or a queue fills.
WRITTEN_WITHIN = 8.0


@pytest.mark.asyncio
async def test_mailer_serve_writes_hits_while_it_runs_on_uvloop_and_httptools(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    # the defaults (one worker, its writer process), and the log of what became of the hits
    server, base = start_serve(env, tmp_path, "--log-level", "info")
    try:
        async with httpx.AsyncClient(base_url=base, headers={"user-agent": HUMAN}) as http:
            await wait_until_serving(http, server)
            for _ in range(3):
                assert (await http.get(path_of(sent.opens[0]))).status_code == 200
            asked = time.monotonic()
            while event_count(mailer) < 3 and time.monotonic() - asked < WRITTEN_WITHIN:
                await asyncio.sleep(0.05)
            assert event_count(mailer) == 3, "hits were not written while the server ran"
            assert server.poll() is None
            # the event loop and HTTP parser the worker really runs on (uvicorn would fall
            # back to asyncio and h11 without a word)
            libraries = Path(f"/proc/{server.pid}/maps").read_text()
            assert "/uvloop/loop." in libraries and "/httptools/parser/parser." in libraries
    finally:
        stderr = stop_serve(server)
    # a single uvicorn server ends by re-raising the SIGTERM it shut down gracefully for
    assert server.returncode in (0, -signal.SIGTERM), stderr
    assert b"Application shutdown complete" in stderr
    assert b"INFO:     opens and clicks: 3 received, 3 written, 0 left out" in stderr


def test_mailer_serve_refuses_an_unknown_log_level(cli: Callable[..., Any]) -> None:
    result = cli("serve", "--port", str(_free_port()), "--log-level", "loud")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --log-level must be one of critical, error, warning, info, debug, trace, "
        "not 'loud'"
    ]


def test_mailer_serve_refuses_an_uninitialised_database(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    result = cli("serve", "--port", str(_free_port()))
    assert result.exit_code == 2
    assert "mailer init" in result.stderr


@pytest.mark.asyncio
async def test_one_event_the_database_refuses_does_not_hold_back_the_others(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    recorder = EngagementRecorder(mailer.engine)
    at = utcnow()
    delivery, campaign = sent.delivery_id, sent.campaign_id
    recorder.record(Hit("open", delivery, campaign, None, at, None, HUMAN, None))
    recorder.record(Hit("bounce", delivery, campaign, None, at, None, HUMAN, None))  # no kind
    recorder.record(Hit("click", delivery, campaign, 0, at, None, HUMAN, None))
    assert await recorder.flush() == 2
    assert (recorder.pending, recorder.stats.written, recorder.stats.discarded) == (0, 2, 1)
    assert [e.kind for e in events(mailer)] == ["open", "click"]


@pytest.mark.asyncio
async def test_a_delivery_erased_after_it_was_cached_is_noticed(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = ("stays@example.org", "erased@example.org")
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    stays, erased = sent["stays@example.org"], sent["erased@example.org"]
    recorder = EngagementRecorder(mailer.engine)
    for mail in (stays, erased):
        recorder.record(
            Hit("open", mail.delivery_id, mail.campaign_id, None, utcnow(), None, HUMAN, None)
        )
    assert await recorder.flush() == 2  # both deliveries' facts are cached now
    with mailer.engine.begin() as conn:  # as an erasure does
        conn.execute(events_table.delete().where(events_table.c.delivery_id == erased.delivery_id))
        conn.execute(deliveries_table.delete().where(deliveries_table.c.id == erased.delivery_id))
    for mail in (stays, erased, stays):
        recorder.record(
            Hit("open", mail.delivery_id, mail.campaign_id, None, utcnow(), None, HUMAN, None)
        )
    assert await recorder.flush() == 2
    assert recorder.pending == 0 and recorder.stats.discarded == 1
    assert [e.delivery_id for e in events(mailer)] == [stays.delivery_id] * 3


@pytest.mark.asyncio
async def test_connections_accepted_on_the_serving_socket_have_tcp_nodelay() -> None:
    """uvicorn issue 3149: a listener bound with proto 0 makes asyncio leave Nagle on, and
    small kept-alive responses wait ~40 ms for a delayed ACK. mailer binds its own."""
    from mailer.tracking.app import listening_socket

    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    sock = listening_socket("127.0.0.1", 0)
    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        assert await asyncio.wait_for(accepted, 5) == 1
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
