"""Retention (obligation 7): keep personal data no longer than needed.

    engagement events           older than `retention_events_months` (13): deleted, their
                                counts kept per campaign as anonymous tallies (reports add up)
    contacts without consent    no consent ledger row at all, created and last changed more than
                                `retention_unconsented_months` (24) ago, no delivery or import
                                since: erased (not suppressed: they never said no)
    unconfirmed double opt-ins  sign-ups still pending after `retention_unconfirmed_days` (30):
                                marked expired (their link stops working); a contact that nothing
                                else holds (only pending ledger rows, no delivery, no import, no
                                open request) is erased, not suppressed
    outbox events               domain events older than `retention_events_months` (13) once
                                none of their webhook deliveries is still pending: deleted, with
                                their deliveries and attempts
    dead-lettered webhooks      deliveries dead-lettered more than `retention_dead_letters_days`
                                (90) ago: deleted with their attempts (no longer replayable)
    sign-up limits              POST /subscribe's counts per client (keyed hashes) whose window
                                has ended: deleted (the tracking app deletes most as it goes)

Safe to run from cron: each step works in bounded batches, one transaction each, and
purges are serialised (an advisory lock on PostgreSQL, the write lock on SQLite); a second run
finds nothing left to do.
"""

from __future__ import annotations

import calendar
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Select, and_, delete, exists, func, select, text, update
from sqlmodel import Session

from mailer import audit, tallies
from mailer.config import Settings
from mailer.errors import BadInput
from mailer.models import (
    ConsentRecord,
    ConsentStatus,
    Contact,
    ContactSource,
    Delivery,
    EngagementEvent,
    Event,
    ImportBatch,
    PrivacyRequest,
    SignupLimit,
    Subscription,
    SubscriptionStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryStatus,
    utcnow,
)
from mailer.privacy import erase_contact

if TYPE_CHECKING:
    from mailer.service import Mailer

DEFAULT_BATCH_SIZE = 1000
MAX_BATCH_SIZE = 50_000
PURGE_LOCK_KEY = 0x6D61696C6572  # "mailer": serialises purges on PostgreSQL

contacts = Contact.__table__  # type: ignore[attr-defined]
ledger = ConsentRecord.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
events = EngagementEvent.__table__  # type: ignore[attr-defined]
sources = ContactSource.__table__  # type: ignore[attr-defined]
imports = ImportBatch.__table__  # type: ignore[attr-defined]
requests = PrivacyRequest.__table__  # type: ignore[attr-defined]
subscriptions = Subscription.__table__  # type: ignore[attr-defined]
outbox = Event.__table__  # type: ignore[attr-defined]
webhook_deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
webhook_attempts = WebhookAttempt.__table__  # type: ignore[attr-defined]
signup_limits = SignupLimit.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Periods:
    events_months: int = 13
    unconsented_months: int = 24
    unconfirmed_days: int = 30
    dead_letters_days: int = 90

    @classmethod
    def from_settings(cls, settings: Settings) -> Periods:
        return cls(
            events_months=settings.retention_events_months,
            unconsented_months=settings.retention_unconsented_months,
            unconfirmed_days=settings.retention_unconfirmed_days,
            dead_letters_days=settings.retention_dead_letters_days,
        )


@dataclass(frozen=True)
class Cutoffs:
    events: datetime
    unconsented: datetime
    unconfirmed: datetime
    dead_letters: datetime
    signup_limits: datetime  # now: a row is kept until its own window ends

    @classmethod
    def at(cls, now: datetime, periods: Periods) -> Cutoffs:
        return cls(
            events=months_before(now, periods.events_months),
            unconsented=months_before(now, periods.unconsented_months),
            unconfirmed=now - timedelta(days=periods.unconfirmed_days),
            dead_letters=now - timedelta(days=periods.dead_letters_days),
            signup_limits=now,
        )


@dataclass
class PurgeReport:
    dry_run: bool
    periods: Periods
    cutoffs: Cutoffs
    engagement_events: int = 0
    contacts_without_consent: int = 0
    subscriptions_expired: int = 0
    unconfirmed_contacts: int = 0
    outbox_events: int = 0
    dead_letters: int = 0
    signup_limits: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def counts(self) -> dict[str, int]:
        return {
            "engagement_events": self.engagement_events,
            "contacts_without_consent": self.contacts_without_consent,
            "subscriptions_expired": self.subscriptions_expired,
            "unconfirmed_contacts": self.unconfirmed_contacts,
            "outbox_events": self.outbox_events,
            "dead_letters": self.dead_letters,
            "signup_limits": self.signup_limits,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "periods": asdict(self.periods),
            "cutoffs": {k: v.isoformat() for k, v in asdict(self.cutoffs).items()},
            **self.counts(),
            "notes": list(self.notes),
        }


def months_before(moment: datetime, months: int) -> datetime:
    """The same day and time `months` calendar months earlier (the month's last day when the
    day does not exist there: 31 March minus one month is 28 or 29 February)."""
    years, month_index = divmod(moment.month - 1 - months, 12)
    year, month = moment.year + years, month_index + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def purge(
    mailer: Mailer,
    *,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    now: datetime | None = None,
) -> PurgeReport:
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise BadInput(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}")
    periods = Periods.from_settings(mailer.settings)
    cutoffs = Cutoffs.at(now or utcnow(), periods)
    report = PurgeReport(dry_run, periods, cutoffs)
    operator = mailer.settings.operator
    if dry_run:
        with mailer.session() as session:
            conn = session.connection()
            report.engagement_events = _count(conn, _due_events(cutoffs))
            report.contacts_without_consent = _count(conn, _unconsented(cutoffs))
            report.subscriptions_expired = _count(conn, _due_subscriptions(cutoffs))
            report.unconfirmed_contacts = _count(conn, _unconfirmed(cutoffs))
            report.outbox_events = _count(conn, _due_outbox(cutoffs))
            report.dead_letters = _count(conn, _due_dead_letters(cutoffs))
            report.signup_limits = _count(conn, _ended_signup_limits(cutoffs))
        return report

    def batches(step: Callable[[Session], int]) -> int:
        done = 0
        while True:
            with mailer.session() as session:
                _serialise(session.connection())
                n = step(session)
            done += n
            if n < batch_size:
                return done

    report.engagement_events = batches(lambda s: _purge_events(s, cutoffs, batch_size))
    report.contacts_without_consent = batches(
        lambda s: _erase_all(s, _unconsented(cutoffs), batch_size, operator)
    )
    report.subscriptions_expired = batches(lambda s: _expire_subscriptions(s, cutoffs, batch_size))
    report.unconfirmed_contacts = batches(
        lambda s: _erase_all(s, _unconfirmed(cutoffs), batch_size, operator)
    )
    # dead letters first, so that a dry run's two counts are what a real run then removes
    report.dead_letters = batches(lambda s: _purge_dead_letters(s, cutoffs, batch_size))
    report.outbox_events = batches(lambda s: _purge_outbox(s, cutoffs, batch_size))
    report.signup_limits = batches(lambda s: _purge_signup_limits(s, cutoffs, batch_size))
    if report.total:
        with mailer.session() as session:
            audit.record(session, operator, "retention.purge", None, report.counts())
    return report


def _serialise(conn: Connection) -> None:
    """One purge at a time: overlapping cron runs take turns, batch by batch."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(PURGE_LOCK_KEY)))
    else:
        # a write statement takes SQLite's write lock at once, before this batch reads
        conn.execute(text("DELETE FROM campaign_tallies WHERE 0 = 1"))


def _count(conn: Connection, candidates: Select[Any]) -> int:
    return int(conn.execute(select(func.count()).select_from(candidates.subquery())).scalar_one())


# -- engagement events ---------------------------------------------------------------------------


def _due_events(cutoffs: Cutoffs) -> Select[Any]:
    return select(events.c.id).where(events.c.occurred_at < cutoffs.events)


def _purge_events(session: Session, cutoffs: Cutoffs, limit: int) -> int:
    """Delete the oldest due events and keep their counts. A delivery's unique open (or click)
    moves to the tally with the last of its events, so it is counted once, before and after."""
    conn = session.connection()
    rows = conn.execute(
        select(
            events.c.id, events.c.delivery_id, events.c.campaign_id, events.c.kind, events.c.machine
        )
        .where(events.c.occurred_at < cutoffs.events)
        .order_by(events.c.id)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    conn.execute(delete(events).where(events.c.id.in_([r.id for r in rows])))
    groups = Counter((r.delivery_id, r.campaign_id, r.kind, bool(r.machine)) for r in rows)
    remaining = {
        (delivery_id, kind, bool(machine))
        for delivery_id, kind, machine in conn.execute(
            select(events.c.delivery_id, events.c.kind, events.c.machine)
            .where(events.c.delivery_id.in_(sorted({r.delivery_id for r in rows})))
            .distinct()
        )
    }
    counts: Counter[tuple[int, str]] = Counter()
    for (delivery_id, campaign_id, kind, machine), total in groups.items():
        last = (delivery_id, kind, machine) not in remaining
        for metric, n in tallies.engagement_metrics(kind, machine, total, unique=int(last)):
            counts[(campaign_id, metric)] += n
    tallies.add(conn, counts)
    return len(rows)


# -- contacts ------------------------------------------------------------------------------------


def _no_open_request() -> Any:
    return ~exists().where(
        requests.c.contact_id == contacts.c.id, requests.c.completed_at.is_(None)
    )


def _no_import_since(moment: datetime) -> Any:
    return ~exists().where(
        sources.c.contact_id == contacts.c.id,
        imports.c.id == sources.c.import_id,
        imports.c.started_at >= moment,
    )


def _unconsented(cutoffs: Cutoffs) -> Select[Any]:
    """Contacts without a single consent ledger row, untouched for the whole period."""
    moment = cutoffs.unconsented
    return (
        select(contacts.c.id, contacts.c.email_hash)
        .where(
            contacts.c.created_at < moment,
            contacts.c.updated_at < moment,
            ~exists().where(ledger.c.contact_id == contacts.c.id),
            ~exists().where(
                deliveries.c.contact_id == contacts.c.id, deliveries.c.queued_at >= moment
            ),
            ~exists().where(subscriptions.c.contact_id == contacts.c.id),
            _no_import_since(moment),
            _no_open_request(),
        )
        .order_by(contacts.c.id)
    )


def _due_subscriptions(cutoffs: Cutoffs) -> Select[Any]:
    return select(subscriptions.c.id).where(
        subscriptions.c.status == SubscriptionStatus.PENDING.value,
        subscriptions.c.requested_at < cutoffs.unconfirmed,
    )


def _expire_subscriptions(session: Session, cutoffs: Cutoffs, limit: int) -> int:
    conn = session.connection()
    ids = [
        row.id
        for row in conn.execute(
            _due_subscriptions(cutoffs).order_by(subscriptions.c.id).limit(limit)
        )
    ]
    if ids:
        conn.execute(
            update(subscriptions)
            .where(
                subscriptions.c.id.in_(ids),
                subscriptions.c.status == SubscriptionStatus.PENDING.value,
            )
            .values(status=SubscriptionStatus.EXPIRED.value)
        )
    return len(ids)


def _unconfirmed(cutoffs: Cutoffs) -> Select[Any]:
    """Contacts who only ever signed up and never confirmed: every sign-up expired (or due to),
    no ledger row but pending ones, no delivery, no import, no open request."""
    live = and_(
        subscriptions.c.contact_id == contacts.c.id,
        (subscriptions.c.status == SubscriptionStatus.CONFIRMED.value)
        | and_(
            subscriptions.c.status == SubscriptionStatus.PENDING.value,
            subscriptions.c.requested_at >= cutoffs.unconfirmed,
        ),
    )
    return (
        select(contacts.c.id, contacts.c.email_hash)
        .where(
            exists().where(subscriptions.c.contact_id == contacts.c.id),
            ~exists().where(live),
            ~exists().where(
                ledger.c.contact_id == contacts.c.id,
                ledger.c.status != ConsentStatus.PENDING.value,
            ),
            ~exists().where(deliveries.c.contact_id == contacts.c.id),
            ~exists().where(sources.c.contact_id == contacts.c.id),
            _no_open_request(),
        )
        .order_by(contacts.c.id)
    )


def _erase_all(session: Session, candidates: Select[Any], limit: int, operator: str) -> int:
    """Erase (without suppressing) a batch of the candidates."""
    conn = session.connection()
    rows = conn.execute(candidates.limit(limit)).all()
    for row in rows:
        erase_contact(session, row.id, row.email_hash, reason="retention", operator=operator)
    return len(rows)


# -- the webhook outbox --------------------------------------------------------------------------


def _due_outbox(cutoffs: Cutoffs) -> Select[Any]:
    """Events past the events period that no endpoint still waits for (a pending delivery keeps
    its event: the consumer was promised it)."""
    waiting = exists().where(
        webhook_deliveries.c.event_id == outbox.c.id,
        webhook_deliveries.c.status == WebhookDeliveryStatus.PENDING.value,
    )
    return (
        select(outbox.c.id)
        .where(outbox.c.occurred_at < cutoffs.events, ~waiting)
        .order_by(outbox.c.id)
    )


def _delete_deliveries(conn: Connection, delivery_ids: Select[Any] | list[int]) -> None:
    conn.execute(delete(webhook_attempts).where(webhook_attempts.c.delivery_id.in_(delivery_ids)))
    conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.id.in_(delivery_ids)))


def _purge_outbox(session: Session, cutoffs: Cutoffs, limit: int) -> int:
    conn = session.connection()
    ids = list(conn.execute(_due_outbox(cutoffs).limit(limit)).scalars())
    if not ids:
        return 0
    _delete_deliveries(
        conn, select(webhook_deliveries.c.id).where(webhook_deliveries.c.event_id.in_(ids))
    )
    conn.execute(delete(outbox).where(outbox.c.id.in_(ids)))
    return len(ids)


def _due_dead_letters(cutoffs: Cutoffs) -> Select[Any]:
    return (
        select(webhook_deliveries.c.id)
        .where(
            webhook_deliveries.c.status == WebhookDeliveryStatus.DEAD.value,
            webhook_deliveries.c.dead_at < cutoffs.dead_letters,
        )
        .order_by(webhook_deliveries.c.id)
    )


def _purge_dead_letters(session: Session, cutoffs: Cutoffs, limit: int) -> int:
    conn = session.connection()
    ids = list(conn.execute(_due_dead_letters(cutoffs).limit(limit)).scalars())
    if ids:
        _delete_deliveries(conn, ids)
    return len(ids)


# -- sign-up limits ------------------------------------------------------------------------------


def _ended_signup_limits(cutoffs: Cutoffs) -> Select[Any]:
    return select(signup_limits.c.client).where(
        signup_limits.c.window_ends_at <= cutoffs.signup_limits
    )


def _purge_signup_limits(session: Session, cutoffs: Cutoffs, limit: int) -> int:
    # The condition again on the DELETE itself: a client whose new window began since the
    # SELECT (the app's upsert of the row) keeps it. On PostgreSQL the DELETE re-checks its own
    # condition on a row changed meanwhile, not the IN list it was given.
    batch = _ended_signup_limits(cutoffs).limit(limit).scalar_subquery()
    result = session.connection().execute(
        delete(signup_limits).where(
            signup_limits.c.client.in_(batch),
            signup_limits.c.window_ends_at <= cutoffs.signup_limits,
        )
    )
    return int(result.rowcount)
