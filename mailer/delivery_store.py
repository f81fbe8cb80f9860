"""The runner's view of the database: claim, re-check, mark, record. Each call is one short
transaction, so nothing is held open across SMTP traffic.

The events consumers see (message.sent, message.failed, campaign.finished) are written by the
same transaction as the state change they describe: a rolled-back wave leaves none behind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select, text, update
from sqlmodel import Session

from mailer import queries, suppression
from mailer.addresses import address_hash
from mailer.config import Settings
from mailer.events import EventType, NewEvent, emit_many
from mailer.leases import is_dead_local_owner
from mailer.models import (
    Campaign,
    CampaignStatus,
    Contact,
    DeliveryStatus,
    SuppressionReason,
    utcnow,
)

# the wave's outcomes in one UPDATE; only rows still `sending` (not swept to `uncertain`
# because our lease ran out) are ours to record
_RECORD_POSTGRES = text(
    """
    UPDATE deliveries AS d
       SET status = v.status, smtp_code = v.code, smtp_response = v.response,
           message_id = v.message_id, finished_at = :now, lease_owner = NULL
      FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS varchar[]),
                  CAST(:codes AS integer[]), CAST(:responses AS varchar[]),
                  CAST(:message_ids AS varchar[])) AS v(id, status, code, response, message_id)
     WHERE d.id = v.id AND d.status = 'sending'
    RETURNING d.id
    """
)

contacts_table = Contact.__table__  # type: ignore[attr-defined]
campaigns_table = Campaign.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Recipient:
    """What a template may know about a contact (`contact.*`)."""

    id: int
    email: str
    name: str | None
    first_name: str | None
    last_name: str | None
    locale: str | None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    recipient: Recipient
    tracking: bool


@dataclass(frozen=True)
class Outcome:
    delivery_id: int
    status: DeliveryStatus
    smtp_code: int | None = None
    smtp_response: str | None = None
    message_id: str | None = None
    hard_bounce: bool = False
    retry_after: float | None = None  # seconds; only for a temporary failure to try again
    recipient: str | None = None
    contact_id: int | None = None
    permanent: bool = False  # a 5xx answer: sending again would not help


def short_reason(text: str | None, limit: int = 200) -> str:
    """An SMTP answer or error as one short line (replies can span lines; events never do)."""
    return " ".join((text or "").split())[:limit]


class DeliveryStore:
    def __init__(
        self, engine: Engine, settings: Settings, campaign_id: int, owner: str, lease: float
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.campaign_id = campaign_id
        self.owner = owner
        self.lease = timedelta(seconds=lease)
        self.dialect = engine.dialect.name
        self._campaign_name: str | None = None

    def _name(self, conn: Connection) -> str:
        if self._campaign_name is None:
            self._campaign_name = str(
                conn.execute(
                    select(campaigns_table.c.name).where(campaigns_table.c.id == self.campaign_id)
                ).scalar_one()
            )
        return self._campaign_name

    def campaign_status(self) -> tuple[CampaignStatus, str | None]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(campaigns_table.c.status, campaigns_table.c.status_reason).where(
                    campaigns_table.c.id == self.campaign_id
                )
            ).one()
        return CampaignStatus(row.status), row.status_reason

    def set_status(self, status: CampaignStatus, reason: str | None = None) -> None:
        values: dict[str, Any] = {"status": status.value, "status_reason": reason}
        if status is CampaignStatus.FINISHED:
            values["finished_at"] = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                update(campaigns_table)
                .where(campaigns_table.c.id == self.campaign_id)
                .values(**values)
            )

    def finish(self) -> bool:
        """A running campaign with nothing left becomes finished, and campaign.finished (with
        the report's counts) is written in the same transaction. Only the sender whose update
        made the change emits it: a second sender, or a re-run of a finished campaign, finds
        it finished already. Returns whether this call finished it."""
        from mailer.report import build_report  # the report's counts, so both always agree

        now = utcnow()
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(campaigns_table)
                .where(
                    campaigns_table.c.id == self.campaign_id,
                    campaigns_table.c.status == CampaignStatus.RUNNING.value,
                )
                .values(status=CampaignStatus.FINISHED.value, status_reason=None, finished_at=now)
            ).rowcount
            if changed != 1:
                return False
            with Session(bind=conn) as session:
                report = build_report(session, self._name(conn))
            counts = ("queued", "sent", "failed", "uncertain", "excluded")
            emit_many(
                conn,
                [
                    NewEvent(
                        EventType.CAMPAIGN_FINISHED,
                        {
                            "campaign_id": self.campaign_id,
                            "campaign": self._name(conn),
                            **{key: report[key] for key in counts},
                        },
                        occurred_at=now,
                    )
                ],
            )
        return True

    def sweep_uncertain(self) -> int:
        """Report what dead senders left behind: their `sending` rows become uncertain and
        their unstarted claims go back to the queue. A sender on this machine whose process
        is gone is known dead at once; elsewhere, when its lease runs out."""
        with self.engine.begin() as conn:
            owners = [row[0] for row in conn.execute(queries.lease_owners(self.campaign_id))]
            dead = [owner for owner in owners if is_dead_local_owner(owner)]
            if dead:
                conn.execute(queries.release_claims(self.campaign_id, dead))
            return int(
                conn.execute(queries.mark_uncertain(self.campaign_id, utcnow(), dead)).rowcount
            )

    def requeue_uncertain(self) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(queries.requeue_uncertain(self.campaign_id)).rowcount)

    def claim(
        self,
        limit: int,
        purpose: str,
        min_policy_version: str | None,
        tags: Sequence[str],
    ) -> tuple[list[Claimed], dict[str, int]]:
        """Lease a batch and re-check it against the gate in the same transaction: whoever
        became ineligible since the audience was built is excluded now, not sent."""
        now = utcnow()
        with self.engine.begin() as conn:
            leased = conn.execute(
                queries.claim_batch(self.campaign_id, self.owner, now, now + self.lease, limit)
            ).all()
            if not leased:
                return [], {}
            by_contact = {row.contact_id: row for row in leased}
            gate = conn.execute(
                queries.eligibility(
                    purpose,
                    self.settings.require_double_opt_in,
                    min_policy_version=min_policy_version,
                    tags=tags,
                    contact_ids=list(by_contact),
                )
            ).all()
            verdicts = {row.id: row.excluded_reason for row in gate}
            tracking_now = {row.id: bool(row.tracking_allowed) for row in gate}
            excluded: dict[str, int] = {}
            exclusions = []
            for contact_id, row in by_contact.items():
                # a contact that left the tag filter (or was erased) is excluded as such
                reason = verdicts.get(contact_id, "not_in_audience")
                if reason is not None:
                    excluded[reason] = excluded.get(reason, 0) + 1
                    exclusions.append({"b_id": row.id, "reason": reason})
            if exclusions:
                conn.execute(
                    update(queries.deliveries)
                    .where(queries.deliveries.c.id == bindparam("b_id"))
                    .values(
                        status=DeliveryStatus.EXCLUDED.value,
                        excluded_reason=bindparam("reason"),
                        lease_owner=None,
                        finished_at=now,
                    ),
                    exclusions,
                )
            eligible = [cid for cid, reason in verdicts.items() if reason is None]
            recipients = {
                row.id: Recipient(
                    id=row.id,
                    email=row.email,
                    name=row.name,
                    first_name=row.first_name,
                    last_name=row.last_name,
                    locale=row.locale,
                    attributes=dict(row.attributes or {}),
                )
                for row in conn.execute(
                    select(
                        contacts_table.c.id,
                        contacts_table.c.email,
                        contacts_table.c.name,
                        contacts_table.c.first_name,
                        contacts_table.c.last_name,
                        contacts_table.c.locale,
                        contacts_table.c.attributes,
                    ).where(contacts_table.c.id.in_(eligible))
                )
            }
        # tracking needs the campaign's wish (fixed at audience time) and the contact's consent
        # now: a tracking withdrawal mid-campaign gives clean links from the next batch on
        claimed = [
            Claimed(
                by_contact[cid].id,
                recipients[cid],
                bool(by_contact[cid].tracking) and tracking_now.get(cid, False),
            )
            for cid in sorted(recipients, key=lambda c: by_contact[c].id)
        ]
        return claimed, excluded

    def mark_sending(self, ids: Sequence[int]) -> dict[int, int]:
        """Mark deliveries as handed to SMTP; returns delivery id -> attempt number for the
        ones that are still ours to send."""
        return self.record_and_mark((), (), ids)

    def fail_unsent(self, failures: Sequence[tuple[Claimed, str]]) -> None:
        """Fail messages that could not even be composed (they never reach SMTP)."""
        self.record_and_mark((), failures, ())

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Record SMTP outcomes; a hard bounce suppresses the address in the same transaction."""
        self.record_and_mark(outcomes, (), ())

    def record_and_mark(
        self,
        outcomes: Sequence[Outcome],
        unsent: Sequence[tuple[Claimed, str]],
        next_ids: Sequence[int],
    ) -> dict[int, int]:
        """One wave's SMTP outcomes (and their message events), the next wave's messages that
        could not be composed, and the next wave marked `sending`: one transaction per wave.

        The exactly-once protocol is unchanged: a row is `sending` (committed) strictly before
        its SMTP transaction starts, and at any commit at most one wave is `sending`. Returns
        delivery id -> attempt number for the next wave's rows that are still ours to send."""
        if not (outcomes or unsent or next_ids):
            return {}
        now = utcnow()
        with self.engine.begin() as conn:
            events = self._fail_unsent(conn, unsent, now) + self._record(conn, outcomes, now)
            emit_many(conn, events)
            if not next_ids:
                return {}
            rows = conn.execute(queries.mark_sending(next_ids, self.owner, now, now + self.lease))
            return {row.id: row.attempts for row in rows}

    def _message_data(
        self, conn: Connection, delivery_id: int, contact_id: int | None, email: str | None
    ) -> dict[str, Any]:
        return {
            "delivery_id": delivery_id,
            "campaign_id": self.campaign_id,
            "campaign": self._name(conn),
            "contact_id": contact_id,
            "email": email,
        }

    def _fail_unsent(
        self, conn: Connection, unsent: Sequence[tuple[Claimed, str]], now: datetime
    ) -> list[NewEvent]:
        events: list[NewEvent] = []
        for item, reason in unsent:
            failed = conn.execute(
                queries.fail_unsent([item.delivery_id], self.owner, reason, now)
            ).rowcount
            if failed != 1:
                continue  # no longer ours (our lease ran out): nothing happened to it here
            data = self._message_data(
                conn, item.delivery_id, item.recipient.id, item.recipient.email
            )
            data.update(smtp_code=None, reason=short_reason(reason), permanent=True)
            events.append(
                NewEvent(EventType.MESSAGE_FAILED, data, item.recipient.id, occurred_at=now)
            )
        return events

    def _record(
        self, conn: Connection, outcomes: Sequence[Outcome], now: datetime
    ) -> list[NewEvent]:
        finals = [o for o in outcomes if o.status is not DeliveryStatus.QUEUED]
        retries = [o for o in outcomes if o.status is DeliveryStatus.QUEUED]
        d = queries.deliveries
        recorded: set[int] = set()
        if finals and conn.dialect.name == "postgresql":
            # one statement and round trip for the wave, returning exactly the rows we recorded
            recorded.update(
                conn.execute(
                    _RECORD_POSTGRES,
                    {
                        "ids": [o.delivery_id for o in finals],
                        "statuses": [o.status.value for o in finals],
                        "codes": [o.smtp_code for o in finals],
                        "responses": [(o.smtp_response or "")[:500] or None for o in finals],
                        "message_ids": [o.message_id for o in finals],
                        "now": now,
                    },
                ).scalars()
            )
        elif finals:
            result = conn.execute(
                update(d)
                .where(d.c.id == bindparam("b_id"), d.c.status == DeliveryStatus.SENDING.value)
                .values(
                    status=bindparam("status"),
                    smtp_code=bindparam("code"),
                    smtp_response=bindparam("response"),
                    message_id=bindparam("message_id"),
                    finished_at=bindparam("finished"),
                    lease_owner=None,
                ),
                [
                    {
                        "b_id": o.delivery_id,
                        "status": o.status.value,
                        "code": o.smtp_code,
                        "response": (o.smtp_response or "")[:500] or None,
                        "message_id": o.message_id,
                        "finished": now,
                    }
                    for o in finals
                ],
            )
            ids = [o.delivery_id for o in finals]
            if result.rowcount == len(finals):
                recorded.update(ids)
            else:
                # a row swept to `uncertain` meanwhile (our lease ran out) was not recorded by
                # us, so it gets no event from us either; the rows we did record carry `now`
                recorded.update(
                    conn.execute(
                        select(d.c.id).where(d.c.id.in_(ids), d.c.finished_at == now)
                    ).scalars()
                )
        if retries:
            # back in the queue, claimable by anyone once the retry is due
            conn.execute(
                update(d)
                .where(d.c.id == bindparam("b_id"), d.c.status == DeliveryStatus.SENDING.value)
                .values(
                    status=DeliveryStatus.QUEUED.value,
                    smtp_code=bindparam("code"),
                    smtp_response=bindparam("response"),
                    lease_owner=None,
                    lease_until=bindparam("due"),
                ),
                [
                    {
                        "b_id": o.delivery_id,
                        "code": o.smtp_code,
                        "response": (o.smtp_response or "")[:500] or None,
                        "due": now + timedelta(seconds=o.retry_after or 0),
                    }
                    for o in retries
                ],
            )
        bounced = [o for o in outcomes if o.hard_bounce and o.recipient]
        if bounced:
            with Session(bind=conn) as session:
                for o in bounced:
                    assert o.recipient is not None
                    suppression.suppress(
                        session,
                        address_hash(o.recipient, self.settings.suppression_key),
                        SuppressionReason.HARD_BOUNCE,
                        source=f"smtp {o.smtp_code}",
                        note=(o.smtp_response or "")[:200],
                    )
                session.flush()
        return [
            self._message_event(conn, o, now)
            for o in finals
            if o.delivery_id in recorded
            and o.status in (DeliveryStatus.SENT, DeliveryStatus.FAILED)
        ]

    def _message_event(self, conn: Connection, outcome: Outcome, now: datetime) -> NewEvent:
        data = self._message_data(conn, outcome.delivery_id, outcome.contact_id, outcome.recipient)
        if outcome.status is DeliveryStatus.SENT:
            data.update(message_id=outcome.message_id, smtp_code=outcome.smtp_code)
            kind = EventType.MESSAGE_SENT
        else:
            data.update(
                smtp_code=outcome.smtp_code,
                reason=short_reason(outcome.smtp_response),
                permanent=outcome.permanent,
            )
            kind = EventType.MESSAGE_FAILED
        return NewEvent(kind, data, outcome.contact_id, occurred_at=now)

    def release(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(queries.release_claims(self.campaign_id, [self.owner]))

    def remaining(self) -> tuple[int, int, datetime | None]:
        """(queued, sending, when the next unclaimed queued one is due) for the campaign."""
        d = queries.deliveries
        with self.engine.connect() as conn:
            counts: dict[str, int] = {
                status: count
                for status, count in conn.execute(queries.delivery_counts(self.campaign_id))
            }
            # retries wait in the queue unowned until they are due; rows another sender has
            # claimed are that sender's to send, not something to wait for
            due = conn.execute(
                select(func.min(d.c.lease_until)).where(
                    d.c.campaign_id == self.campaign_id,
                    d.c.status == DeliveryStatus.QUEUED.value,
                    d.c.lease_owner.is_(None),
                )
            ).scalar()
        return (
            int(counts.get(DeliveryStatus.QUEUED.value, 0)),
            int(counts.get(DeliveryStatus.SENDING.value, 0)),
            due,
        )
