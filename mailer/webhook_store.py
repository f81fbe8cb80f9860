"""The dispatcher's view of the outbox: claim due deliveries, record attempts, replay.

Every call is one short transaction; nothing is held open while HTTP requests are in flight.
A claim is a lease (owner and expiry) on `pending` rows, so a dispatcher that dies holding
claims loses nothing: its rows become due again when the lease runs out, or at once when a
dispatcher on the same machine sees that the owning process is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Integer,
    String,
    and_,
    bindparam,
    exists,
    insert,
    literal,
    or_,
    select,
    update,
)

from mailer import events, webhook_endpoints
from mailer.errors import BadInput, NotFound
from mailer.leases import is_dead_local_owner
from mailer.models import (
    Event,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    WebhookEndpointEvent,
    as_utc,
)
from mailer.webhook_policy import Decision, Verdict

deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
attempts = WebhookAttempt.__table__  # type: ignore[attr-defined]
endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
subscriptions = WebhookEndpointEvent.__table__  # type: ignore[attr-defined]
events_table = Event.__table__  # type: ignore[attr-defined]

PENDING = WebhookDeliveryStatus.PENDING.value
EXCERPT = 512  # characters of a response body or error kept per attempt


@dataclass(frozen=True)
class Due:
    """A claimed delivery, with everything needed to send it."""

    delivery_id: int
    attempts: int  # attempts made before this one
    endpoint_id: int
    endpoint_uid: str
    url: str
    secrets: tuple[str, ...]
    event_uid: str  # the webhook-id, the same on every attempt and replay
    event_type: str
    occurred_at: datetime
    data: dict[str, Any]

    def body(self) -> bytes:
        return events.body(self.event_type, self.occurred_at, self.data)


@dataclass(frozen=True)
class Attempted:
    due: Due
    attempted_at: datetime
    status_code: int | None
    response: str | None
    error: str | None
    duration_ms: int
    decision: Decision


def _due(owner_free_at: datetime, cutoff: datetime) -> Any:
    """Due: pending, its time has come, nobody holds a live lease on it, endpoint enabled."""
    return and_(
        deliveries.c.status == PENDING,
        deliveries.c.next_attempt_at <= cutoff,
        or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < owner_free_at),
        deliveries.c.endpoint_id.in_(select(endpoints.c.id).where(endpoints.c.enabled)),
    )


class WebhookStore:
    def __init__(self, engine: Engine, owner: str, lease: timedelta) -> None:
        self.engine = engine
        self.owner = owner
        self.lease = lease

    def recover(self) -> int:
        """Release the claims of dispatchers on this machine whose process is gone (a kill -9):
        they are due again now rather than when their lease runs out."""
        with self.engine.begin() as conn:
            owners = [
                row[0]
                for row in conn.execute(
                    select(deliveries.c.lease_owner)
                    .where(deliveries.c.status == PENDING, deliveries.c.lease_owner.is_not(None))
                    .distinct()
                )
            ]
            gone = [owner for owner in owners if is_dead_local_owner(owner)]
            if not gone:
                return 0
            return int(
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.status == PENDING, deliveries.c.lease_owner.in_(gone))
                    .values(lease_owner=None, lease_until=None)
                ).rowcount
            )

    def claim(self, limit: int, now: datetime, cutoff: datetime | None = None) -> list[Due]:
        """Lease up to `limit` deliveries due by `cutoff` (default now), oldest first.

        On PostgreSQL, FOR UPDATE SKIP LOCKED (of the delivery rows only, never the endpoint)
        lets several dispatchers claim side by side without waiting for or taking each
        other's rows; SQLite serialises writers, and the claim is one statement.
        """
        if limit <= 0:
            return []
        claimable = (
            select(deliveries.c.id)
            .where(_due(now, now if cutoff is None else cutoff))
            .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=deliveries)
        )
        with self.engine.begin() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id.in_(claimable.scalar_subquery()))
                    .values(lease_owner=self.owner, lease_until=now + self.lease)
                    .returning(deliveries.c.id)
                )
            ]
            if not ids:
                return []
            rows = conn.execute(
                select(
                    deliveries.c.id,
                    deliveries.c.attempts,
                    endpoints.c.id.label("endpoint_id"),
                    endpoints.c.uid.label("endpoint_uid"),
                    endpoints.c.url,
                    endpoints.c.secret,
                    endpoints.c.previous_secret,
                    endpoints.c.previous_secret_until,
                    events_table.c.uid.label("event_uid"),
                    events_table.c.type,
                    events_table.c.occurred_at,
                    events_table.c.data,
                )
                .join(endpoints, endpoints.c.id == deliveries.c.endpoint_id)
                .join(events_table, events_table.c.id == deliveries.c.event_id)
                .where(deliveries.c.id.in_(ids))
                .order_by(deliveries.c.id)
            ).all()
        return [
            Due(
                delivery_id=row.id,
                attempts=row.attempts,
                endpoint_id=row.endpoint_id,
                endpoint_uid=row.endpoint_uid,
                url=row.url,
                secrets=tuple(
                    webhook_endpoints.secrets_in_use(
                        row.secret, row.previous_secret, row.previous_secret_until, now
                    )
                ),
                event_uid=row.event_uid,
                event_type=row.type,
                occurred_at=as_utc(row.occurred_at),
                data=dict(row.data or {}),
            )
            for row in rows
        ]

    def renew(self, ids: Sequence[int], now: datetime) -> None:
        """Keep the lease on claims still being worked on (a slow consumer, a long queue)."""
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.id.in_(list(ids)),
                    deliveries.c.lease_owner == self.owner,
                    deliveries.c.status == PENDING,
                )
                .values(lease_until=now + self.lease)
            )

    def release(self, ids: Sequence[int]) -> None:
        """Give back claims that were not sent (stopping): due again for anyone at once."""
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.id.in_(list(ids)),
                    deliveries.c.lease_owner == self.owner,
                    deliveries.c.status == PENDING,
                )
                .values(lease_owner=None, lease_until=None)
            )

    def record(self, results: Sequence[Attempted]) -> None:
        """Each attempt, and what it decided, in one transaction. A delivery whose lease we
        lost meanwhile is left to its new owner; the attempt itself is still recorded."""
        if not results:
            return
        mine = and_(
            deliveries.c.id == bindparam("b_id"),
            deliveries.c.lease_owner == self.owner,
            deliveries.c.status == PENDING,
        )
        common = {
            "attempts": deliveries.c.attempts + 1,
            "last_status_code": bindparam("b_code"),
            "last_error": bindparam("b_error"),
            "last_attempt_at": bindparam("b_at"),
            "lease_owner": None,
            "lease_until": None,
        }
        finals: dict[Verdict, dict[str, Any]] = {
            Verdict.DELIVERED: {
                "status": WebhookDeliveryStatus.DELIVERED.value,
                "delivered_at": bindparam("b_at"),
                "next_attempt_at": None,
            },
            Verdict.RETRY: {"next_attempt_at": bindparam("b_next")},
            Verdict.DEAD: {
                "status": WebhookDeliveryStatus.DEAD.value,
                "dead_at": bindparam("b_at"),
                "next_attempt_at": None,
            },
            # the endpoint is disabled below, which cancels this delivery with the rest
            Verdict.DISABLE: {},
        }
        with self.engine.begin() as conn:
            conn.execute(
                insert(attempts),
                [
                    {
                        "delivery_id": r.due.delivery_id,
                        "attempted_at": r.attempted_at,
                        "status_code": r.status_code,
                        "response": _clip(r.response),
                        "error": _clip(r.error),
                        "duration_ms": r.duration_ms,
                    }
                    for r in results
                ],
            )
            for verdict, values in finals.items():
                group = [r for r in results if r.decision.verdict is verdict]
                if not group:
                    continue
                conn.execute(
                    update(deliveries).where(mine).values(**common, **values),
                    [
                        {
                            "b_id": r.due.delivery_id,
                            "b_code": r.status_code,
                            "b_error": _clip(r.error or _failure_text(r)),
                            "b_at": r.attempted_at,
                            "b_next": r.decision.retry_at,
                        }
                        for r in group
                    ],
                )
            gone = [r for r in results if r.decision.verdict is Verdict.DISABLE]
            if gone:
                when = events.timestamp_text(min(r.attempted_at for r in gone))
                webhook_endpoints.disable_gone(
                    conn,
                    sorted({r.due.endpoint_id for r in gone}),
                    f"the consumer answered 410 Gone at {when}",
                )


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:EXCERPT]


def _failure_text(result: Attempted) -> str | None:
    """What `deliveries` shows as the last error of an HTTP answer that was not a success."""
    code = result.status_code
    if code is None or 200 <= code < 300:
        return None
    excerpt = " ".join((result.response or "").split())[:200]
    return f"HTTP {code}" + (f": {excerpt}" if excerpt else "")


# -- reading and replaying (the operator's commands) ---------------------------------------------


@dataclass(frozen=True)
class DeliveryView:
    id: int
    event_uid: str
    event_type: str
    occurred_at: datetime
    endpoint_uid: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    dead_at: datetime | None


@dataclass(frozen=True)
class AttemptView:
    attempted_at: datetime
    status_code: int | None
    response: str | None
    error: str | None
    duration_ms: int


def _opt(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def check_status(raw: str) -> str:
    value = raw.strip().lower()
    known = [s.value for s in WebhookDeliveryStatus]
    if value not in known:
        raise BadInput(f"--status {raw!r}: choose from {', '.join(known)}")
    return value


def check_event_type(raw: str) -> str:
    value = raw.strip()
    if value not in events.EVENT_TYPES:
        raise BadInput(f"--event-type {raw!r}: choose from {', '.join(sorted(events.EVENT_TYPES))}")
    return value


def list_deliveries(
    engine: Engine,
    *,
    endpoint_uid: str | None = None,
    status: str | None = None,
    event_type: str | None = None,
    event_uid: str | None = None,
    delivery_id: int | None = None,
    limit: int = 50,
) -> list[DeliveryView]:
    """Newest first."""
    query = (
        select(
            deliveries,
            events_table.c.uid.label("event_uid"),
            events_table.c.type.label("event_type"),
            events_table.c.occurred_at,
            endpoints.c.uid.label("endpoint_uid"),
        )
        .join(events_table, events_table.c.id == deliveries.c.event_id)
        .join(endpoints, endpoints.c.id == deliveries.c.endpoint_id)
        .order_by(deliveries.c.id.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        if endpoint_uid is not None:
            query = query.where(
                deliveries.c.endpoint_id == webhook_endpoints.endpoint_id(conn, endpoint_uid)
            )
        if status is not None:
            query = query.where(deliveries.c.status == check_status(status))
        if event_type is not None:
            query = query.where(events_table.c.type == check_event_type(event_type))
        if event_uid is not None:
            query = query.where(events_table.c.uid == event_uid)
        if delivery_id is not None:
            query = query.where(deliveries.c.id == delivery_id)
        rows = conn.execute(query).all()
    return [
        DeliveryView(
            id=row.id,
            event_uid=row.event_uid,
            event_type=row.event_type,
            occurred_at=as_utc(row.occurred_at),
            endpoint_uid=row.endpoint_uid,
            status=row.status,
            attempts=row.attempts,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            last_attempt_at=_opt(row.last_attempt_at),
            next_attempt_at=_opt(row.next_attempt_at),
            delivered_at=_opt(row.delivered_at),
            dead_at=_opt(row.dead_at),
        )
        for row in rows
    ]


def attempts_of(engine: Engine, delivery_id: int) -> list[AttemptView]:
    with engine.connect() as conn:
        found = select(deliveries.c.id).where(deliveries.c.id == delivery_id)
        if conn.execute(found).scalar() is None:
            raise NotFound(f"no webhook delivery {delivery_id}")
        rows = conn.execute(
            select(attempts).where(attempts.c.delivery_id == delivery_id).order_by(attempts.c.id)
        ).all()
    return [
        AttemptView(
            attempted_at=as_utc(row.attempted_at),
            status_code=row.status_code,
            response=row.response,
            error=row.error,
            duration_ms=row.duration_ms,
        )
        for row in rows
    ]


def _replay_targets(conn: Connection, endpoint_uid: str | None) -> list[int]:
    """Enabled endpoints to replay to: the one named (which must be enabled), or all."""
    if endpoint_uid is not None:
        found = webhook_endpoints.endpoint_id(conn, endpoint_uid)
        enabled = conn.execute(select(endpoints.c.enabled).where(endpoints.c.id == found)).scalar()
        if not enabled:
            raise BadInput(
                f"endpoint {endpoint_uid} is disabled: "
                f"`mailer webhooks enable {endpoint_uid}` first"
            )
        return [found]
    return [int(row[0]) for row in conn.execute(select(endpoints.c.id).where(endpoints.c.enabled))]


_REQUEUE = {
    "status": PENDING,
    "attempts": 0,
    "lease_owner": None,
    "lease_until": None,
    "delivered_at": None,
    "dead_at": None,
}


def replay_dead(
    engine: Engine,
    now: datetime,
    *,
    endpoint_uid: str | None = None,
    event_type: str | None = None,
) -> int:
    """Dead letters back to pending, due now, with a fresh retry schedule (same webhook-id)."""
    with engine.begin() as conn:
        targets = _replay_targets(conn, endpoint_uid)
        query = update(deliveries).where(
            deliveries.c.status == WebhookDeliveryStatus.DEAD.value,
            deliveries.c.endpoint_id.in_(targets),
        )
        if event_type is not None:
            query = query.where(
                deliveries.c.event_id.in_(
                    select(events_table.c.id).where(
                        events_table.c.type == check_event_type(event_type)
                    )
                )
            )
        requeued = query.values(**_REQUEUE, next_attempt_at=now).returning(deliveries.c.id)
        return len(conn.execute(requeued).all())


def replay_range(
    engine: Engine,
    now: datetime,
    since: datetime,
    until: datetime | None = None,
    *,
    endpoint_uid: str | None = None,
    event_type: str | None = None,
) -> int:
    """Queue again every event that occurred in [since, until) for each enabled endpoint
    subscribed to its type: delivered, dead and cancelled deliveries are reset, and events the
    endpoint never had (from before it was added, or while it was disabled) get a delivery.
    Deliveries still pending are left as they are. Returns how many were queued."""
    until = until or now
    if as_utc(until) <= as_utc(since):
        raise BadInput("--until must be later than --since")
    with engine.begin() as conn:
        targets = _replay_targets(conn, endpoint_uid)
        if not targets:
            return 0
        wanted = and_(
            subscriptions.c.endpoint_id.in_(targets),
            or_(
                subscriptions.c.event_type == events_table.c.type,
                subscriptions.c.event_type == events.ALL_TYPES,
            ),
            events_table.c.occurred_at >= as_utc(since),
            events_table.c.occurred_at < as_utc(until),
        )
        if event_type is not None:
            wanted = and_(wanted, events_table.c.type == check_event_type(event_type))
        reset = conn.execute(
            update(deliveries)
            .where(
                deliveries.c.status != PENDING,
                exists(
                    select(1)
                    .select_from(events_table.join(subscriptions, wanted))
                    .where(
                        events_table.c.id == deliveries.c.event_id,
                        subscriptions.c.endpoint_id == deliveries.c.endpoint_id,
                    )
                ),
            )
            .values(**_REQUEUE, next_attempt_at=now)
            .returning(deliveries.c.id)
        ).all()
        existing = select(1).where(
            deliveries.c.event_id == events_table.c.id,
            deliveries.c.endpoint_id == subscriptions.c.endpoint_id,
        )
        pairs = (
            select(events_table.c.id.label("event_id"), subscriptions.c.endpoint_id)
            .select_from(events_table.join(subscriptions, wanted))
            .where(~exists(existing))
            .distinct()
            .subquery()
        )
        missing = select(
            pairs.c.event_id,
            pairs.c.endpoint_id,
            literal(PENDING, String),
            literal(0, Integer),
            literal(now, DateTime(timezone=True)),
            literal(now, DateTime(timezone=True)),
        )
        added = conn.execute(
            insert(deliveries)
            .from_select(
                ["event_id", "endpoint_id", "status", "attempts", "next_attempt_at", "created_at"],
                missing,
            )
            .returning(deliveries.c.id)
        ).all()
    # counted from RETURNING: rowcount of INSERT ... SELECT is not reliable on every driver
    return len(reset) + len(added)
