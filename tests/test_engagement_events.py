"""Opens and clicks become outbox events (issue 5, invariant 9): the tracking server only records
them; the webhook dispatcher announces each engagement event once, a few seconds after the hit,
as one `message.opened` or `message.clicked`, flagged as the engagement event is by then, with
thin ids and never the IP address or user agent. Through the real ASGI app, with links taken
from mails that really arrived at an SMTP server, and a real webhook consumer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError

from mailer import privacy, webhook_dispatch, webhook_endpoints
from mailer.db import alembic_config
from mailer.engagement import EngagementRecorder, Hit
from mailer.engagement_announce import ANNOUNCE_SETTLE, announce_engagement
from mailer.models import (
    HONEYPOT_POSITION,
    ConsentStatus,
    EngagementEvent,
    Event,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointEvent,
    as_utc,
    utcnow,
)
from mailer.service import Mailer
from mailer.webhook_dispatch import Dispatcher, DispatchOptions, deliver_due
from tests.conftest import CliResult
from tests.smtp_server import CaptureServer
from tests.test_tracking_pixel_and_click import (
    HUMAN,
    LINKS,
    SentMail,
    client_for,
    make_app,
    path_of,
    send_tracked,
)
from tests.webhook_consumer import Consumer

ENGAGEMENT_TYPES = ("message.opened", "message.clicked")
outbox = Event.__table__  # type: ignore[attr-defined]
engagement = EngagementEvent.__table__  # type: ignore[attr-defined]
DISPATCH = DispatchOptions(allow_private=True, timeout=3.0, flush=0.01, poll=0.05)


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


def announce_now(mailer: Mailer) -> int:
    """What the dispatcher does once the settle delay has passed."""
    return announce_engagement(mailer.engine, settle=timedelta(0))


def contact_id_of(mailer: Mailer, email: str) -> int:
    contact_id = mailer.show_contact(email).contact.id
    assert contact_id is not None
    return contact_id


def record_opens(mailer: Mailer, sent: SentMail, times: list[datetime]) -> int:
    """Opens recorded as the tracking server records them, at the given times."""
    recorder = EngagementRecorder(mailer.engine)
    for at in times:
        recorder.record(
            Hit("open", sent.delivery_id, sent.campaign_id, None, at, None, HUMAN, None)
        )
    return asyncio.run(recorder.flush())


def later(seconds: float = 2 * ANNOUNCE_SETTLE.total_seconds()) -> Callable[[], datetime]:
    """A dispatcher clock past the settle delay of the hits just made."""
    return lambda: utcnow() + timedelta(seconds=seconds)


# -- what is announced ----------------------------------------------------------------------------


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
    assert counts(mailer) == (0, 2)  # recorded; the tracking server announces nothing
    assert announce_now(mailer) == 2

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

    assert announce_now(mailer) == 0  # announced once: a second look writes nothing
    assert counts(mailer) == (2, 2)


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
    announce_now(mailer)
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
    announce_now(mailer)
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
async def test_a_click_a_later_batch_shows_to_be_a_burst_is_announced_as_a_machine(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        await http.get(path_of(sent.clicks[0]))
        assert await app.state.recorder.flush() == 1  # alone, it looks like a person's
        await http.get(path_of(sent.clicks[1]))  # the other link, within the second
        assert await app.state.recorder.flush() == 1
    assert announce_now(mailer) == 2
    announced = [
        (e.data["link_position"], e.data["machine"], e.data["machine_reason"])
        for e in engagement_outbox(mailer)
    ]
    assert announced == [
        (0, True, "all_links_within_a_second"),
        (1, True, "all_links_within_a_second"),
    ]


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
    assert announce_now(mailer) == 0
    assert counts(mailer) == (0, 0)


@pytest.mark.asyncio
async def test_every_engagement_event_written_by_the_flush_loop_is_announced_once(
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
        assert counts(mailer) == (0, half)
        assert announce_now(mailer) == half
        await asyncio.gather(*(http.get(path) for path in requests[half:]))
    # the shutdown wrote the rest; announcing picks up exactly those
    assert counts(mailer) == (half, len(requests))
    assert announce_now(mailer) == len(requests) - half
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
    assert announce_now(mailer) == 1
    assert counts(mailer) == (1, 1)


# -- when, and by whom ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_hit_is_announced_only_once_the_settle_delay_has_passed(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    first = utcnow()
    second = first + timedelta(seconds=3)
    assert await asyncio.to_thread(record_opens, mailer, sent, [first, second]) == 2

    assert announce_engagement(mailer.engine) == 0  # by default, settled by the current time
    assert announce_engagement(mailer.engine, now=first + ANNOUNCE_SETTLE / 2) == 0
    assert announce_engagement(mailer.engine, now=first + ANNOUNCE_SETTLE) == 1
    (event,) = engagement_outbox(mailer)
    assert as_utc(event.occurred_at) == first
    assert announce_engagement(mailer.engine, now=second + ANNOUNCE_SETTLE) == 1
    assert counts(mailer) == (2, 2)


@pytest.mark.asyncio
async def test_concurrent_announcers_announce_each_hit_exactly_once(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    start = utcnow() - timedelta(minutes=1)
    times = [start + timedelta(milliseconds=i) for i in range(1200)]
    assert await asyncio.to_thread(record_opens, mailer, sent, times) == len(times)

    barrier = threading.Barrier(2)
    announced: list[int] = []

    def announcer() -> None:
        barrier.wait()
        announced.append(announce_engagement(mailer.engine, limit=40))

    threads = [threading.Thread(target=announcer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(announced) == 2 and sum(announced) == len(times)
    events = Counter(as_utc(e.occurred_at) for e in engagement_outbox(mailer))
    assert events == Counter(times)  # one event per hit, none twice
    assert announce_now(mailer) == 0


@pytest.mark.asyncio
async def test_the_dispatcher_announces_and_delivers_a_click_with_no_other_step(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        await http.get(path_of(sent.opens[0]))
        await http.get(path_of(sent.clicks[1]))
    await app.state.recorder.flush()
    with Consumer() as consumer:
        _view, secret = webhook_endpoints.add(
            mailer.engine, consumer.url, ["message.clicked"], allow_private=True
        )
        # too soon: the flags may still change, so nothing is announced or sent yet
        soon = await asyncio.to_thread(deliver_due, mailer.engine, DISPATCH)
        assert (soon.announced, soon.attempts) == (0, 0)
        stats = await asyncio.to_thread(deliver_due, mailer.engine, DISPATCH, clock=later())
    assert (stats.announced, stats.delivered) == (2, 1)
    (payload,) = consumer.verified(secret)
    assert payload["type"] == "message.clicked"
    assert payload["data"]["delivery_id"] == sent.delivery_id
    assert (payload["data"]["url"], payload["data"]["machine"]) == (LINKS[1], False)
    assert counts(mailer) == (2, 2)  # the open is announced too, for its own subscribers


@pytest.mark.asyncio
async def test_a_failed_announcement_is_logged_and_retried_while_delivering_goes_on(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        await http.get(path_of(sent.clicks[0]))
    await app.state.recorder.flush()
    real = webhook_dispatch.announce_engagement
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT ...", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(webhook_dispatch, "announce_engagement", flaky)
    with Consumer() as consumer:
        webhook_endpoints.add(mailer.engine, consumer.url, ["*"], allow_private=True)
        mailer.record_consent(
            "other@example.org", "marketing", ConsentStatus.WITHDRAWN, source="phone"
        )
        dispatcher = Dispatcher(mailer.engine, DISPATCH, clock=later())
        running = asyncio.create_task(dispatcher.run())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            received = {r.event()["type"] for r in consumer.requests()}
            if {"message.clicked", "consent.withdrawn"} <= received:
                break
            await asyncio.sleep(0.05)
        dispatcher.stop()
        stats = await running
    assert {"message.clicked", "consent.withdrawn"} <= received
    assert (stats.announce_failures, stats.announced) == (1, 1)
    assert "could not announce opens and clicks" in caplog.text
    assert "server closed the connection" in caplog.text


def test_replay_announces_what_the_dispatcher_has_not_yet(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Callable[..., CliResult],
) -> None:
    sent = asyncio.run(send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    assert record_opens(mailer, sent, [utcnow()]) == 1  # just now: not settled yet
    webhook_endpoints.add(mailer.engine, "http://127.0.0.1:9/hook", ["*"], allow_private=True)
    replayed = cli("webhooks", "replay", "--since", "1h")
    assert replayed.exit_code == 0, replayed.stderr
    assert "Announced 1 opens and clicks first" in replayed.stdout
    (opened,) = engagement_outbox(mailer)
    deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
    with mailer.engine.connect() as conn:
        pending = conn.execute(
            select(deliveries.c.status).where(deliveries.c.event_id == opened.id)
        ).scalars()
        assert [*pending] == ["pending"]


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
    announce_now(mailer)
    deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
    with mailer.engine.connect() as conn:
        pending = conn.execute(
            select(outbox.c.type, endpoints.c.uid, deliveries.c.status)
            .join(outbox, outbox.c.id == deliveries.c.event_id)
            .join(endpoints, endpoints.c.id == deliveries.c.endpoint_id)
            .where(outbox.c.type.in_(ENGAGEMENT_TYPES))
        ).all()
    assert [tuple(row) for row in pending] == [("message.clicked", "ep_clicks", "pending")]


# -- erasure and upgrades -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_after_erasure_no_event_names_the_person_and_unannounced_hits_are_gone(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        await http.get(path_of(sent.clicks[0]))
        await app.state.recorder.flush()
        assert announce_now(mailer) == 1
        await http.get(path_of(sent.opens[0]))  # recorded, not yet announced at the erasure
        await app.state.recorder.flush()
    await asyncio.to_thread(privacy.erase, mailer, "tracked@example.org")

    assert announce_now(mailer) == 0  # the erased person's hits are gone with them
    assert counts(mailer) == (1, 0)
    with mailer.engine.connect() as conn:
        for data in conn.execute(select(outbox.c.data)).scalars():
            assert "tracked@example.org" not in repr(data).lower()


@pytest.mark.asyncio
async def test_hits_recorded_before_the_upgrade_are_not_announced_again(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    an_hour_ago = utcnow() - timedelta(hours=1)
    assert await asyncio.to_thread(record_opens, mailer, sent, [an_hour_ago]) == 1

    def migrate(target: str) -> None:
        with mailer.engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            if target == "head":
                command.upgrade(cfg, target)
            else:
                command.downgrade(cfg, target)

    # as a database the old recorder wrote to (and announced from): back to 0006, then up
    await asyncio.to_thread(migrate, "0006")
    await asyncio.to_thread(migrate, "head")
    assert announce_now(mailer) == 0
    assert await asyncio.to_thread(record_opens, mailer, sent, [an_hour_ago]) == 1
    assert announce_now(mailer) == 1  # new rows are announced as before
    assert counts(mailer) == (1, 2)
