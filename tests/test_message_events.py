"""Issue 5: sending a campaign tells webhook consumers what happened, from the same transactions
that record it: one message.sent per delivered mail (with its Message-ID), message.failed for a
refused one, campaign.started and campaign.finished once each; a wave that crashed or rolled
back leaves no message.sent behind for mail that was not recorded as sent."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, update

from mailer import queries
from mailer.models import (
    ConsentStatus,
    Event,
    SuppressionReason,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointEvent,
    utcnow,
)
from mailer.service import CampaignService, Mailer
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign
from tests.test_exactly_once import sender_process, slow_campaign

events_table = Event.__table__  # type: ignore[attr-defined]
MESSAGE_KEYS = {"delivery_id", "campaign_id", "campaign", "contact_id", "email"}


def granted(mailer: Mailer, *emails: str) -> None:
    for email in emails:
        mailer.record_consent(email, "marketing", ConsentStatus.GRANTED, source="webform")


def events_of(mailer: Mailer, type_: str) -> list[Any]:
    with mailer.engine.connect() as conn:
        return list(
            conn.execute(
                select(events_table).where(events_table.c.type == type_).order_by(events_table.c.id)
            )
        )


def deliveries_by_status(mailer: Mailer) -> dict[str, set[int]]:
    d = queries.deliveries
    found: dict[str, set[int]] = {}
    with mailer.engine.connect() as conn:
        for row in conn.execute(select(d.c.id, d.c.status)):
            found.setdefault(row.status, set()).add(row.id)
    return found


def subscribe(mailer: Mailer, *types: str) -> int:
    """A webhook endpoint (nothing listens: only the pending deliveries are looked at)."""
    now = utcnow()
    with mailer.session() as session:
        endpoint = WebhookEndpoint(
            uid="ep_test",
            url="http://127.0.0.1:9/hook",
            enabled=True,
            secret="whsec_dGVzdA==",
            created_at=now,
            updated_at=now,
        )
        session.add(endpoint)
        session.flush()
        assert endpoint.id is not None
        for type_ in types:
            session.add(WebhookEndpointEvent(endpoint_id=endpoint.id, event_type=type_))
        return endpoint.id


@pytest.mark.asyncio
async def test_a_campaign_emits_sent_and_failed_messages_and_its_start_and_finish(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    delivered = ["ann@example.org", "bob@example.org", "cor@example.org", "dirk@example.org"]
    granted(mailer, *delivered, "gone@example.org", "busy@example.org")
    mailer.suppress("cor@example.org", SuppressionReason.UNSUBSCRIBED)
    delivered.remove("cor@example.org")
    smtp_server.reply("550 5.1.1 No such user", recipients={"gone@example.org"})
    smtp_server.reply("451 4.3.0 Try again later", recipients={"busy@example.org"})
    endpoint = subscribe(mailer, "message.sent")

    outcome = await send_campaign(mailer, campaign_file(), smtp_server, max_attempts=2)

    report = outcome.report
    assert (report["sent"], report["failed"], report["status"]) == (3, 2, "finished")
    sent = events_of(mailer, "message.sent")
    arrived = {m.recipients[0]: m.parse()["Message-ID"] for m in smtp_server.messages}
    assert sorted(e.data["email"] for e in sent) == sorted(delivered)
    assert {e.data["email"]: e.data["message_id"] for e in sent} == arrived
    assert len({e.data["delivery_id"] for e in sent}) == 3
    assert {e.data["delivery_id"] for e in sent} == deliveries_by_status(mailer)["sent"]
    for e in sent:
        assert MESSAGE_KEYS | {"message_id", "smtp_code"} == set(e.data)
        assert (
            e.contact_id == e.data["contact_id"] == mailer.show_contact(e.data["email"]).contact.id
        )
        assert e.data["campaign"] == "autumn" and e.data["smtp_code"] == 250

    failed = {e.data["email"]: e.data for e in events_of(mailer, "message.failed")}
    assert set(failed) == {"gone@example.org", "busy@example.org"}
    assert failed["gone@example.org"]["smtp_code"] == 550
    assert failed["gone@example.org"]["permanent"] is True
    assert "No such user" in failed["gone@example.org"]["reason"]
    # a temporary refusal that ran out of attempts is a failure, but not a permanent one
    assert (failed["busy@example.org"]["smtp_code"], failed["busy@example.org"]["permanent"]) == (
        451,
        False,
    )
    for data in failed.values():
        assert MESSAGE_KEYS | {"smtp_code", "reason", "permanent"} == set(data)
        assert "\r" not in data["reason"] and "\n" not in data["reason"]

    [started] = events_of(mailer, "campaign.started")
    assert started.data == {
        "campaign_id": outcome.prepared.campaign_id,
        "campaign": "autumn",
        "queued": 5,
        "excluded": {"suppressed": 1},
    }
    [finished] = events_of(mailer, "campaign.finished")
    assert finished.data["campaign_id"] == outcome.prepared.campaign_id
    assert (finished.data["sent"], finished.data["failed"], finished.data["uncertain"]) == (3, 2, 0)
    assert finished.data["excluded"] == {"suppressed": 1}
    assert started.occurred_at <= finished.occurred_at

    # each message.sent reached the outbox of the endpoint that wants it, and nothing else did
    with mailer.engine.connect() as conn:
        pending = conn.execute(
            select(WebhookDelivery.event_id).where(  # type: ignore[call-overload]
                WebhookDelivery.endpoint_id == endpoint
            )
        ).scalars()
        assert sorted(pending) == sorted(e.id for e in sent)

    # sending the finished campaign again sends and announces nothing
    again = await send_campaign(mailer, campaign_file(), smtp_server)
    assert again.stats.sent == 0
    assert len(events_of(mailer, "message.sent")) == 3
    assert len(events_of(mailer, "campaign.started")) == 1
    assert len(events_of(mailer, "campaign.finished")) == 1


class DatabaseWentAway(Exception):
    pass


@pytest.mark.asyncio
async def test_a_wave_whose_record_rolls_back_leaves_no_events_and_is_not_resent(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
) -> None:
    emails = [f"w{i:02d}@example.org" for i in range(24)]
    granted(mailer, *emails)
    path = campaign_file()
    campaigns = CampaignService(mailer)
    campaigns.prepare(path)
    inserts = Counter[str]()

    def fail_second_message_events(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # every batch of events ends with its fan-out (on PostgreSQL in the same statement)
        if "INSERT INTO WEBHOOK_DELIVERIES" in statement.upper():
            inserts["events"] += 1
            if inserts["events"] == 2:
                raise DatabaseWentAway("the database went away mid-commit")

    event.listen(mailer.engine, "before_cursor_execute", fail_second_message_events)
    try:
        with pytest.raises(DatabaseWentAway):
            await send_campaign(mailer, path, smtp_server, wave_size=8)
    finally:
        event.remove(mailer.engine, "before_cursor_execute", fail_second_message_events)

    # wave 1 was recorded with its events; wave 2 went out but its record rolled back, and so
    # did marking wave 3: wave 2 is still `sending`, wave 3 was never handed to SMTP
    assert len(smtp_server.messages) == 16
    by_status = deliveries_by_status(mailer)
    assert (len(by_status["sent"]), len(by_status["sending"]), len(by_status["queued"])) == (
        8,
        8,
        8,
    )
    sent = events_of(mailer, "message.sent")
    assert {e.data["delivery_id"] for e in sent} == by_status["sent"]

    # the sender is gone for good (its lease ran out): the next run sends the rest only
    with mailer.engine.begin() as conn:
        conn.execute(update(queries.deliveries).values(lease_until=utcnow().replace(year=2000)))
    outcome = await send_campaign(mailer, path, smtp_server, wave_size=8)
    report = outcome.report
    assert (report["sent"], report["uncertain"]) == (16, 8)
    arrived = Counter(r for m in smtp_server.messages for r in m.recipients)
    assert sorted(arrived) == emails and set(arrived.values()) == {1}
    sent = events_of(mailer, "message.sent")
    assert len(sent) == 16
    assert {e.data["delivery_id"] for e in sent} == deliveries_by_status(mailer)["sent"]
    assert not {e.data["delivery_id"] for e in sent} & by_status["sending"]
    assert not events_of(mailer, "message.failed")


def test_a_killed_sender_leaves_message_sent_exactly_for_the_mail_recorded_as_sent(
    mailer: Mailer,
    env: dict[str, str],
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    emails, campaign, smtp_env = slow_campaign(
        mailer, env, smtp_server, campaign_file, tmp_path, 120
    )
    first = sender_process(smtp_env, campaign, "--concurrency", "3", "--batch-size", "40")
    smtp_server.wait_for(30, timeout=30)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)

    message_ids = {m.parse()["Message-ID"] for m in smtp_server.messages}
    sent = events_of(mailer, "message.sent")
    by_status = deliveries_by_status(mailer)
    assert 0 < len(sent) < len(emails)
    assert {e.data["delivery_id"] for e in sent} == by_status["sent"]
    assert {e.data["message_id"] for e in sent} <= message_ids
    assert not events_of(mailer, "campaign.finished")

    second = sender_process(smtp_env, campaign)
    _out, err = second.communicate(timeout=60)
    assert second.returncode in (0, 1), err.decode()

    sent = events_of(mailer, "message.sent")
    report = CampaignService(mailer).report("autumn")
    assert len(sent) == report["sent"] == len({e.data["delivery_id"] for e in sent})
    assert report["sent"] + report["uncertain"] == len(emails)
    # mail in flight at the kill is uncertain: maybe delivered, never announced as sent
    assert not {e.data["delivery_id"] for e in sent} & deliveries_by_status(mailer).get(
        "uncertain", set()
    )
    assert {e.data["message_id"] for e in sent} <= {
        m.parse()["Message-ID"] for m in smtp_server.messages
    }
    [finished] = events_of(mailer, "campaign.finished")
    assert (finished.data["sent"], finished.data["uncertain"]) == (
        report["sent"],
        report["uncertain"],
    )
