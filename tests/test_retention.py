"""Retention removes exactly what is past its period, keeps reports adding up, and a second run
(cron) finds nothing left to do."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, update
from sqlmodel import col, select

from mailer import consent, privacy, retention, suppression
from mailer.addresses import address_hash
from mailer.models import (
    AuditEntry,
    ConsentRecord,
    ConsentStatus,
    Contact,
    Delivery,
    EngagementEvent,
    Erasure,
    Event,
    ImportBatch,
    SignupLimit,
    Subscription,
    SubscriptionStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointEvent,
    utcnow,
)
from mailer.service import CampaignService, Mailer
from mailer.tracking.pages import SignupLimiter
from tests.conftest import CliResult
from tests.smtp_server import CaptureServer

MONTH = timedelta(days=31)


def ago(**kwargs: float) -> datetime:
    return utcnow() - timedelta(**kwargs)


def contact_ids(mailer: Mailer) -> dict[str, int]:
    with mailer.session() as session:
        return {c.email: c.id for c in session.exec(select(Contact)) if c.id is not None}


def backdate_contacts(mailer: Mailer, emails: list[str], when: datetime) -> None:
    table = Contact.__table__  # type: ignore[attr-defined]
    with mailer.session() as session:
        session.connection().execute(
            update(table).where(table.c.email.in_(emails)).values(created_at=when, updated_at=when)
        )


def test_months_are_calendar_months() -> None:
    assert retention.months_before(datetime(2026, 3, 31, 12, tzinfo=UTC), 1) == datetime(
        2026, 2, 28, 12, tzinfo=UTC
    )
    assert retention.months_before(datetime(2026, 11, 25, tzinfo=UTC), 13) == datetime(
        2025, 10, 25, tzinfo=UTC
    )
    assert retention.months_before(datetime(2026, 1, 15, tzinfo=UTC), 24) == datetime(
        2024, 1, 15, tzinfo=UTC
    )


def test_old_engagement_events_go_and_reports_still_add_up(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    campaign_file: Callable[..., Path],
    smtp_server: CaptureServer,
) -> None:
    for who in ("a", "b", "c"):
        mailer.record_consent(f"{who}@example.org", "marketing", ConsentStatus.GRANTED, source="x")
    assert cli("campaign", "send", str(campaign_file()), "--smtp", smtp_server.url).exit_code == 0
    ids = contact_ids(mailer)
    with mailer.session() as session:
        deliveries = {d.contact_id: d for d in session.exec(select(Delivery))}
    da, db, dc = (deliveries[ids[f"{w}@example.org"]] for w in ("a", "b", "c"))
    old, fresh = ago(days=14 * 31), ago(days=30)

    def event(delivery: Delivery, kind: str, at: datetime, machine: bool = False) -> dict[str, Any]:
        return {
            "delivery_id": delivery.id,
            "campaign_id": delivery.campaign_id,
            "contact_id": delivery.contact_id,
            "kind": kind,
            "link_position": 0 if kind == "click" else None,
            "occurred_at": at,
            "ip_masked": "198.51.100.0",
            "user_agent": "browser",
            "machine": machine,
            "machine_reason": "scanner" if machine else None,
        }

    rows = [
        event(da, "open", old),
        event(da, "open", fresh),  # a's unique open stays with this one
        event(da, "click", old, machine=True),
        event(db, "open", old - MONTH),
        event(db, "open", old),
        event(db, "click", old),
        event(dc, "open", ago(days=300)),  # ten months: kept
    ]
    with mailer.session() as session:
        session.connection().execute(insert(EngagementEvent.__table__), rows)  # type: ignore[attr-defined]
    before = CampaignService(mailer).report("autumn")
    assert (before["opens"], before["unique_opens"], before["clicks"]) == (5, 3, 1)

    dry = retention.purge(mailer, dry_run=True)
    assert dry.engagement_events == 5
    with mailer.session() as session:
        assert len(session.exec(select(EngagementEvent)).all()) == 7

    done = retention.purge(mailer, batch_size=2)  # three batches: uniques move exactly once
    assert done.engagement_events == 5
    with mailer.session() as session:
        kept = session.exec(select(EngagementEvent).order_by(col(EngagementEvent.id))).all()
    assert [(e.delivery_id, e.kind) for e in kept] == [(da.id, "open"), (dc.id, "open")]
    assert CampaignService(mailer).report("autumn") == before

    again = retention.purge(mailer, batch_size=2)
    assert again.total == 0
    assert CampaignService(mailer).report("autumn") == before
    # the last of a's opens goes later: its unique open moves then, and only then
    later = retention.purge(mailer, now=utcnow() + timedelta(days=14 * 31))
    assert later.engagement_events == 2
    assert CampaignService(mailer).report("autumn") == before


def test_contacts_without_consent_go_after_24_months(
    mailer: Mailer, write_csv: Callable[..., Path], cli: Callable[..., CliResult]
) -> None:
    path = write_csv(
        "email,name\n"
        "stale@example.org,Stale\n"
        "recent@example.org,Recent\n"
        "asking@example.org,Asking\n"
        "reimported@example.org,Again\n"
    )
    mailer.import_contacts(path)
    mailer.record_consent("consented@example.org", "marketing", ConsentStatus.GRANTED, source="x")
    long_ago = ago(days=25 * 31)
    backdate_contacts(
        mailer,
        [
            "stale@example.org",
            "asking@example.org",
            "reimported@example.org",
            "consented@example.org",
        ],
        long_ago,
    )
    backdate_contacts(mailer, ["recent@example.org"], ago(days=23 * 31))
    imports = ImportBatch.__table__  # type: ignore[attr-defined]
    with mailer.session() as session:
        session.connection().execute(update(imports).values(started_at=long_ago))
    privacy.record_request(mailer, "asking@example.org", "access", channel="mail", verified=False)
    mailer.import_contacts(write_csv("email\nreimported@example.org\n"))  # a source since

    dry = cli("retention", "purge", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    assert json.loads(dry.stdout)["contacts_without_consent"] == 1
    assert len(contact_ids(mailer)) == 5

    done = cli("retention", "purge", "--json")
    assert json.loads(done.stdout)["contacts_without_consent"] == 1
    assert set(contact_ids(mailer)) == {
        "recent@example.org",
        "asking@example.org",
        "reimported@example.org",
        "consented@example.org",
    }
    hashed = address_hash("stale@example.org", mailer.settings.suppression_key)
    with mailer.session() as session:
        assert suppression.active(session, [hashed]) == {}  # they never said no: not suppressed
        (erasure,) = session.exec(select(Erasure)).all()
        assert (erasure.reason, erasure.address_hash) == ("retention", hashed)
        (entry,) = session.exec(
            select(AuditEntry).where(AuditEntry.action == "retention.purge")
        ).all()
        assert entry.details["contacts_without_consent"] == 1
    assert json.loads(cli("retention", "purge", "--json").stdout)["contacts_without_consent"] == 0


def _signup(mailer: Mailer, email: str, at: datetime, status: SubscriptionStatus) -> int:
    with mailer.session() as session:
        contact = Contact(
            email=email,
            email_hash=address_hash(email, mailer.settings.suppression_key),
            name="Signed Up",
            attributes={},
            created_at=at,
            updated_at=at,
        )
        session.add(contact)
        session.flush()
        assert contact.id is not None
        subscription = Subscription(
            contact_id=contact.id,
            purposes=["marketing"],
            policy_version="2026-01",
            wording="Yes please",
            source="signup-form",
            requested_at=at,
            ip_masked="203.0.113.0",
            user_agent="browser",
            mailed_at=at,
            confirmed_at=at if status is SubscriptionStatus.CONFIRMED else None,
            status=status.value,
        )
        session.add(subscription)
        session.flush()
        consent.record(
            session,
            contact_id=contact.id,
            purpose="marketing",
            status=ConsentStatus.PENDING,
            method="form",
            source="signup-form",
            consent_at=at,
            evidence=f"subscription:{subscription.id}",
        )
        return contact.id


def test_unconfirmed_signups_expire_after_30_days(mailer: Mailer) -> None:
    pending, confirmed = SubscriptionStatus.PENDING, SubscriptionStatus.CONFIRMED
    _signup(mailer, "forgot@example.org", ago(days=31), pending)
    _signup(mailer, "slow@example.org", ago(days=29), pending)
    held = _signup(mailer, "customer@example.org", ago(days=31), pending)
    _signup(mailer, "done@example.org", ago(days=40), confirmed)
    mailer.record_consent("customer@example.org", "tracking", ConsentStatus.GRANTED, source="x")

    dry = retention.purge(mailer, dry_run=True)
    assert (dry.subscriptions_expired, dry.unconfirmed_contacts) == (2, 1)
    done = retention.purge(mailer)
    assert (done.subscriptions_expired, done.unconfirmed_contacts) == (2, 1)
    assert set(contact_ids(mailer)) == {
        "slow@example.org",
        "customer@example.org",
        "done@example.org",
    }
    with mailer.session() as session:
        statuses = {s.contact_id: s.status for s in session.exec(select(Subscription))}
        assert statuses[held] == "expired"
        assert sorted(statuses.values()) == ["confirmed", "expired", "pending"]
        kept = session.exec(
            select(ConsentRecord.status).where(ConsentRecord.contact_id == held)
        ).all()
        assert sorted(kept) == ["granted", "pending"]  # the ledger keeps its evidence
    again = retention.purge(mailer)
    assert again.total == 0
    assert (again.outbox_events, again.dead_letters) == (0, 0)


def test_periods_come_from_settings(mailer: Mailer, cli: Callable[..., CliResult]) -> None:
    result = cli(
        "retention",
        "purge",
        "--dry-run",
        "--json",
        extra_env={"MAILER_RETENTION_EVENTS_MONTHS": "2", "MAILER_RETENTION_UNCONFIRMED_DAYS": "7"},
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["periods"] == {
        "events_months": 2,
        "unconsented_months": 24,
        "unconfirmed_days": 7,
        "dead_letters_days": 90,
    }
    assert report["dry_run"] is True
    bad = cli("retention", "purge", extra_env={"MAILER_RETENTION_EVENTS_MONTHS": "soon"})
    assert bad.exit_code == 2
    assert "MAILER_RETENTION_EVENTS_MONTHS must be a whole number" in bad.stderr
    assert cli("retention", "purge", "--batch-size", "0").exit_code == 2


def _endpoint(mailer: Mailer) -> int:
    now = utcnow()
    with mailer.session() as session:
        endpoint = WebhookEndpoint(
            uid="ep_retention",
            url="http://127.0.0.1:9/hook",
            enabled=True,
            secret="whsec_" + "B" * 43,
            created_at=now,
            updated_at=now,
        )
        session.add(endpoint)
        session.flush()
        assert endpoint.id is not None
        session.add(WebhookEndpointEvent(endpoint_id=endpoint.id, event_type="*"))
        return endpoint.id


def _outbox(mailer: Mailer) -> dict[str, list[tuple[str, str]]]:
    """email -> (event type, delivery status) of that contact's events ("-": no contact)."""
    with mailer.session() as session:
        emails = {c.id: c.email for c in session.exec(select(Contact))}
        rows = session.exec(
            select(Event, WebhookDelivery)
            .outerjoin(WebhookDelivery, col(WebhookDelivery.event_id) == Event.id)
            .order_by(col(Event.id))
        ).all()
    found: dict[str, list[tuple[str, str]]] = {}
    for event, delivery in rows:
        who = emails.get(event.contact_id or 0, "-")
        found.setdefault(who, []).append((event.type, delivery.status if delivery else "none"))
    return found


def test_old_outbox_events_go_once_delivered_and_old_dead_letters_go(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    _endpoint(mailer)
    for who in ("done", "dead", "waiting", "cancelled", "fresh"):
        mailer.record_consent(f"{who}@example.org", "marketing", ConsentStatus.GRANTED, source="x")
    ids = contact_ids(mailer)
    old, dead_long_ago = ago(days=14 * 31), ago(days=100)
    events_t = Event.__table__  # type: ignore[attr-defined]
    deliveries_t = WebhookDelivery.__table__  # type: ignore[attr-defined]
    with mailer.session() as session:
        conn = session.connection()
        conn.execute(
            update(events_t)
            .where(events_t.c.contact_id != ids["fresh@example.org"])
            .values(occurred_at=old)
        )
        by_contact = {row.id: row.contact_id for row in conn.execute(events_t.select())}
        deliveries = list(conn.execute(deliveries_t.select().order_by(deliveries_t.c.id)))
        attempts: list[dict[str, Any]] = []
        for delivery in deliveries:
            who = {v: k for k, v in ids.items()}[by_contact[delivery.event_id]].split("@")[0]
            changes: dict[str, Any] = {}
            if who == "done":
                changes = {"status": "delivered", "delivered_at": old}
            elif who in ("dead", "fresh"):
                changes = {"status": "dead", "dead_at": dead_long_ago}
            elif who == "cancelled":
                changes = {"status": "cancelled"}
            elif who == "waiting" and len(attempts) % 2:
                changes = {"status": "delivered", "delivered_at": old}
            if changes:
                conn.execute(
                    update(deliveries_t).where(deliveries_t.c.id == delivery.id).values(**changes)
                )
            attempts.append(
                {
                    "delivery_id": delivery.id,
                    "attempted_at": old,
                    "status_code": 500,
                    "duration_ms": 3,
                }
            )
        conn.execute(insert(WebhookAttempt.__table__), attempts)  # type: ignore[attr-defined]
    before = _outbox(mailer)
    assert sorted(status for _, status in before["waiting@example.org"]) == [
        "delivered",
        "pending",
    ]

    dry = cli("retention", "purge", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    counted = json.loads(dry.stdout)
    # done 2, dead 2, cancelled 2, and waiting's delivered one: 7; fresh's are too young
    assert (counted["outbox_events"], counted["dead_letters"]) == (7, 4)
    assert _outbox(mailer) == before

    done = cli("retention", "purge", "--json", "--batch-size", "3")
    assert done.exit_code == 0, done.stderr
    assert (json.loads(done.stdout)["outbox_events"], json.loads(done.stdout)["dead_letters"]) == (
        7,
        4,
    )
    after = _outbox(mailer)
    assert set(after) == {"waiting@example.org", "fresh@example.org"}
    assert after["waiting@example.org"] == [
        kind for kind in before["waiting@example.org"] if kind[1] == "pending"
    ]
    # fresh's events stay (too young), their dead deliveries are gone
    assert after["fresh@example.org"] == [(kind, "none") for kind, _ in before["fresh@example.org"]]
    with mailer.session() as session:
        left = session.exec(select(WebhookDelivery)).all()
        assert len(left) == 1
        (attempt,) = session.exec(select(WebhookAttempt)).all()
        assert attempt.delivery_id == left[0].id
        (entry,) = session.exec(
            select(AuditEntry).where(AuditEntry.action == "retention.purge")
        ).all()
        assert (entry.details["outbox_events"], entry.details["dead_letters"]) == (7, 4)
    again = retention.purge(mailer)
    assert (again.outbox_events, again.dead_letters, again.total) == (0, 0, 0)


def test_sign_up_limits_whose_window_ended_go(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    limiter = SignupLimiter(2, 600)
    for host in ("198.51.100.1", "198.51.100.2", "198.51.100.3", "2001:db8::1", "198.51.100.3"):
        limiter.hit(mailer, host)
    table = SignupLimit.__table__  # type: ignore[attr-defined]
    with mailer.session() as session:
        session.connection().execute(
            update(table).where(table.c.attempts == 1).values(window_ends_at=ago(seconds=1))
        )

    dry = cli("retention", "purge", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    assert json.loads(dry.stdout)["signup_limits"] == 3
    done = cli("retention", "purge", "--json", "--batch-size", "2")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["signup_limits"] == 3
    with mailer.session() as session:
        (left,) = session.exec(select(SignupLimit)).all()  # the window still running
        assert left.attempts == 2
        (entry,) = session.exec(
            select(AuditEntry).where(AuditEntry.action == "retention.purge")
        ).all()
        assert entry.details["signup_limits"] == 3
    table_output = cli("retention", "purge")
    assert "sign-up limits whose window ended" in table_output.stdout
    assert retention.purge(mailer).total == 0
