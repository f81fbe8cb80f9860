"""Opens and clicks become outbox events (issue 5, invariant 9): written by the recorder's batch
transaction, one `message.opened` or `message.clicked` per engagement event, flagged as the
engagement event is, with thin ids and never the IP address or user agent. Through the real
ASGI app, with links taken from mails that really arrived at an SMTP server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from mailer.engagement import HONEYPOT_POSITION, EngagementRecorder, Hit
from mailer.models import (
    EngagementEvent,
    Event,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointEvent,
    utcnow,
)
from mailer.service import Mailer
from tests.smtp_server import CaptureServer
from tests.test_tracking_pixel_and_click import (
    HUMAN,
    LINKS,
    client_for,
    make_app,
    path_of,
    send_tracked,
)

ENGAGEMENT_TYPES = ("message.opened", "message.clicked")
outbox = Event.__table__  # type: ignore[attr-defined]
engagement = EngagementEvent.__table__  # type: ignore[attr-defined]


def engagement_outbox(mailer: Mailer) -> list[Any]:
    with mailer.engine.connect() as conn:
        query = select(outbox).where(outbox.c.type.in_(ENGAGEMENT_TYPES)).order_by(outbox.c.id)
        return list(conn.execute(query))


def counts(mailer: Mailer) -> tuple[int, int]:
    """(outbox events for opens and clicks, engagement events)."""
    with mailer.engine.connect() as conn:
        announced = conn.execute(
            select(func.count()).select_from(outbox).where(outbox.c.type.in_(ENGAGEMENT_TYPES))
        ).scalar_one()
        recorded = conn.execute(select(func.count()).select_from(engagement)).scalar_one()
    return int(announced), int(recorded)


def contact_id_of(mailer: Mailer, email: str) -> int:
    contact_id = mailer.show_contact(email).contact.id
    assert contact_id is not None
    return contact_id


@pytest.mark.asyncio
async def test_an_open_and_a_click_are_announced_once_each_without_ip_or_user_agent(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        assert (await http.get(path_of(sent.opens[0]))).status_code == 200
        response = await http.get(path_of(sent.clicks[1]))
        assert (response.status_code, response.headers["location"]) == (302, LINKS[1])
    assert engagement_outbox(mailer) == []  # queued in memory: nothing announced yet
    assert await app.state.recorder.flush() == 2

    opened, clicked = engagement_outbox(mailer)
    contact_id = contact_id_of(mailer, "tracked@example.org")
    common = {
        "delivery_id": sent.delivery_id,
        "campaign_id": sent.campaign_id,
        "campaign": "autumn",
        "contact_id": contact_id,
        "machine": False,
        "machine_reason": None,
    }
    assert (opened.type, opened.contact_id, opened.data) == ("message.opened", contact_id, common)
    assert (clicked.type, clicked.contact_id) == ("message.clicked", contact_id)
    assert clicked.data == {**common, "link_position": 1, "url": LINKS[1]}
    # the event's time is the request's, as in engagement_events
    with mailer.engine.connect() as conn:
        times = conn.execute(select(engagement.c.occurred_at).order_by(engagement.c.id)).scalars()
        assert [*times] == [opened.occurred_at, clicked.occurred_at]
    for event in (opened, clicked):
        text = repr(event.data)
        assert "192.0.2" not in text and "Mozilla" not in text and "@" not in text
        assert event.uid.startswith("evt_")
    assert opened.uid != clicked.uid


@pytest.mark.asyncio
async def test_head_requests_scanners_and_honeypots_are_announced_as_machines(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        await http.head(path_of(sent.opens[0]))
        await http.get(path_of(sent.clicks[0]), headers={"user-agent": "Mimecast-Link-Checker/1.0"})
        await http.get(path_of(sent.clicks[1]))  # a browser's, but beside the honeypot
        await http.get(path_of(sent.honeypot))
    await app.state.recorder.flush()
    announced = [
        (e.type, e.data.get("link_position"), e.data["machine"], e.data["machine_reason"])
        for e in engagement_outbox(mailer)
    ]
    assert announced == [
        ("message.opened", None, True, "head_request"),
        ("message.clicked", 0, True, "mimecast"),
        # flagged by the honeypot click written in the same batch, and announced so
        ("message.clicked", 1, True, "clicked_beside_honeypot"),
        ("message.clicked", HONEYPOT_POSITION, True, "honeypot"),
    ]
    honeypot = engagement_outbox(mailer)[3]
    assert "url" not in honeypot.data  # the honeypot leads nowhere


@pytest.mark.asyncio
async def test_a_burst_flagged_in_the_batch_is_announced_as_a_machine(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    mails = await send_tracked(
        mailer, smtp_server, campaign_file, ("scanned@example.org", "reader@example.org")
    )
    app = make_app(mailer)
    async with client_for(app) as http:
        for url in mails["scanned@example.org"].clicks:  # every link within a second
            await http.get(path_of(url))
        await http.get(path_of(mails["reader@example.org"].clicks[0]))
    await app.state.recorder.flush()
    by_mail = {
        (e.data["delivery_id"], e.data["link_position"]): e.data["machine_reason"]
        for e in engagement_outbox(mailer)
    }
    scanned, reader = mails["scanned@example.org"], mails["reader@example.org"]
    assert by_mail == {
        (scanned.delivery_id, 0): "all_links_within_a_second",
        (scanned.delivery_id, 1): "all_links_within_a_second",
        (reader.delivery_id, 0): None,
    }
    with mailer.engine.connect() as conn:  # the same flags as the engagement events
        stored = conn.execute(
            select(
                engagement.c.delivery_id, engagement.c.link_position, engagement.c.machine_reason
            )
        ).all()
    assert {(d, p): r for d, p, r in stored} == by_mail


@pytest.mark.asyncio
async def test_invalid_tokens_announce_nothing(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    open_token = path_of(sent.opens[0]).rsplit("/", 1)[1]
    click_token = path_of(sent.clicks[0]).rsplit("/", 1)[1]
    tampered = "A" if click_token[-1] != "A" else "B"
    async with client_for(app) as http:
        for path in ("/o/garbage", f"/o/{click_token}", f"/o/{open_token[:-2]}"):
            assert (await http.get(path)).status_code == 200
        for path in ("/c/garbage", f"/c/{open_token}", f"/c/{click_token[:-1]}{tampered}"):
            assert (await http.get(path)).status_code == 404
    assert await app.state.recorder.flush() == 0
    assert counts(mailer) == (0, 0)


@pytest.mark.asyncio
async def test_every_engagement_event_is_announced_once_by_the_flush_loop(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = tuple(f"reader{i}@example.org" for i in range(6))
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    paths = [path_of(url) for mail in sent.values() for url in (*mail.opens, *mail.clicks)]
    requests = paths * 20  # 360 requests

    app = make_app(mailer, flush_interval=0.05)
    async with client_for(app, lifespan=True) as http:
        half = len(requests) // 2
        await asyncio.gather(*(http.get(path) for path in requests[:half]))
        stats = app.state.recorder.stats
        for _ in range(250):  # written by the loop, in several batches, nobody calls flush()
            if stats.written == half:
                break
            await asyncio.sleep(0.02)
        assert counts(mailer) == (half, half)
        await asyncio.gather(*(http.get(path) for path in requests[half:]))
    # the shutdown wrote the rest, with its events
    assert counts(mailer) == (len(requests), len(requests))
    uids = {e.uid for e in engagement_outbox(mailer)}
    assert len(uids) == len(requests)


@pytest.mark.asyncio
async def test_a_refused_event_takes_its_announcement_with_it(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    recorder = EngagementRecorder(mailer.engine)
    at = utcnow()
    delivery, campaign = sent.delivery_id, sent.campaign_id
    recorder.record(Hit("open", delivery, campaign, None, at, None, HUMAN, None))
    recorder.record(Hit("bounce", delivery, campaign, None, at, None, None, None))  # refused
    recorder.record(Hit("open", delivery + 99, campaign, None, at, None, None, None))  # gone
    assert await recorder.flush() == 1
    assert counts(mailer) == (1, 1)


@pytest.mark.asyncio
async def test_endpoints_subscribed_to_clicks_get_a_pending_delivery(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    now = utcnow()
    endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
    with mailer.engine.begin() as conn:
        for uid, wanted in (("ep_clicks", "message.clicked"), ("ep_sent", "message.sent")):
            endpoint_id = conn.execute(
                insert(endpoints)
                .values(
                    uid=uid,
                    url="http://127.0.0.1:9/hook",
                    enabled=True,
                    secret="whsec_" + "A" * 32,
                    created_at=now,
                    updated_at=now,
                )
                .returning(endpoints.c.id)
            ).scalar_one()
            conn.execute(
                insert(WebhookEndpointEvent.__table__),  # type: ignore[attr-defined]
                {"endpoint_id": endpoint_id, "event_type": wanted},
            )
    app = make_app(mailer)
    async with client_for(app) as http:
        await http.get(path_of(sent.opens[0]))
        await http.get(path_of(sent.clicks[0]))
    await app.state.recorder.flush()
    deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
    with mailer.engine.connect() as conn:
        pending = conn.execute(
            select(outbox.c.type, endpoints.c.uid, deliveries.c.status)
            .join(outbox, outbox.c.id == deliveries.c.event_id)
            .join(endpoints, endpoints.c.id == deliveries.c.endpoint_id)
            .where(outbox.c.type.in_(ENGAGEMENT_TYPES))
        ).all()
    assert [tuple(row) for row in pending] == [("message.clicked", "ep_clicks", "pending")]
