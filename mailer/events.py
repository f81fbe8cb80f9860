"""Domain events: the transactional outbox every webhook delivery comes from.

An event is written by the same transaction as the change it describes (`emit` takes that
transaction's session or connection), and in that same statement batch it is fanned out to
one pending delivery per enabled endpoint that wants its type. So an event exists exactly when
its change committed, and no event can be skipped by a dispatcher reading "after the last id"
while an older transaction is still open.

Payloads follow Standard Webhooks: `{"type", "timestamp", "data"}`. `data` is thin: stable ids
(`contact_id`, `campaign_id`, `delivery_id`, ...), plus the contact's `email` where a consumer
needs it to act. Never an IP address or a user agent. Erasing a contact removes every personal
key (PERSONAL_KEYS) from its events, including those still waiting to be delivered, which are
built from the event row when they are sent.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, text, update
from sqlalchemy.exc import DataError, IntegrityError
from sqlmodel import Session

from mailer.models import Event, as_utc, utcnow


class EventType(StrEnum):
    CONTACT_CREATED = "contact.created"
    CONTACT_UPDATED = "contact.updated"
    CONTACT_ERASED = "contact.erased"
    CONSENT_GRANTED = "consent.granted"
    CONSENT_WITHDRAWN = "consent.withdrawn"
    CONTACT_SUBSCRIBED = "contact.subscribed"  # double opt-in asked, pending
    CONTACT_CONFIRMED = "contact.confirmed"
    CONTACT_UNSUBSCRIBED = "contact.unsubscribed"
    CONTACT_SUPPRESSED = "contact.suppressed"
    IMPORT_COMPLETED = "import.completed"
    CAMPAIGN_STARTED = "campaign.started"
    CAMPAIGN_FINISHED = "campaign.finished"
    MESSAGE_SENT = "message.sent"
    MESSAGE_FAILED = "message.failed"
    MESSAGE_BOUNCED = "message.bounced"
    MESSAGE_COMPLAINED = "message.complained"
    MESSAGE_OPENED = "message.opened"
    MESSAGE_CLICKED = "message.clicked"


EVENT_TYPES: frozenset[str] = frozenset(t.value for t in EventType)
ALL_TYPES = "*"

# keys that name or describe a person; erasure removes them from the person's events
PERSONAL_KEYS: frozenset[str] = frozenset(
    {"email", "name", "first_name", "last_name", "locale", "attributes", "changes"}
)

_FAN_OUT_SELECT = """
    INSERT INTO webhook_deliveries (event_id, endpoint_id, status, attempts, next_attempt_at,
                                    created_at)
    SELECT DISTINCT ev.id, ep.id, 'pending', 0, :now, :now
      FROM events ev
      JOIN webhook_endpoint_events sub ON sub.event_type IN (ev.type, '*')
      JOIN webhook_endpoints ep ON ep.id = sub.endpoint_id AND ep.enabled
     WHERE ev.uid {match}
    """
_FAN_OUT = text(_FAN_OUT_SELECT.format(match="IN :uids")).bindparams(
    bindparam("uids", expanding=True)
)
# On PostgreSQL the events and their fan-out are one statement, one round trip, with one array
# parameter per column: psycopg prepares a statement of a fixed shape once, where a VALUES or
# IN list of hundreds of parameters is parsed anew every time (and an executemany or COPY
# followed by the fan-out costs the caller two or more round trips).
_FAN_OUT_POSTGRES = text(_FAN_OUT_SELECT.format(match="= ANY(:uids)"))
# from this many events on (an import's chunk), COPY plus the fan-out is cheaper than the
# single statement, whose arrays psycopg builds and PostgreSQL unnests row by row
_COPY_FROM = 64
_EMIT_POSTGRES = text(
    """
    WITH ev AS (
        INSERT INTO events (uid, type, occurred_at, contact_id, data)
        SELECT * FROM unnest(CAST(:uids AS varchar[]), CAST(:types AS varchar[]),
                             CAST(:ats AS timestamptz[]), CAST(:contacts AS integer[]),
                             CAST(:datas AS json[]))
        RETURNING id, type
    )
    INSERT INTO webhook_deliveries (event_id, endpoint_id, status, attempts, next_attempt_at,
                                    created_at)
    SELECT DISTINCT ev.id, ep.id, 'pending', 0, :now, :now
      FROM ev
      JOIN webhook_endpoint_events sub ON sub.event_type IN (ev.type, '*')
      JOIN webhook_endpoints ep ON ep.id = sub.endpoint_id AND ep.enabled
    """
)
_EVENT_COLUMNS = ("uid", "type", "occurred_at", "contact_id", "data")

_CHUNK = 500


@dataclass(frozen=True)
class NewEvent:
    type: EventType
    data: Mapping[str, Any]
    contact_id: int | None = None
    occurred_at: datetime | None = None
    uid: str = field(default_factory=lambda: new_uid())


def new_uid() -> str:
    """A stable, unguessable event id; it is also the webhook-id of every delivery of it."""
    return "evt_" + secrets.token_hex(12)


def check_types(raw: Iterable[str]) -> list[str]:
    """Event type names as given on the command line; '*' means all. Unknown names are an
    error (a typo would otherwise silently receive nothing)."""
    from mailer.errors import BadInput

    wanted: list[str] = []
    for name in (part.strip() for part in raw):
        if not name:
            continue
        if name != ALL_TYPES and name not in EVENT_TYPES:
            known = ", ".join(sorted(EVENT_TYPES))
            raise BadInput(f"unknown event type {name!r}: choose from {known} (or '*')")
        if name not in wanted:
            wanted.append(name)
    return wanted or [ALL_TYPES]


def _connection(target: Session | Connection) -> Connection:
    return target.connection() if isinstance(target, Session) else target


def emit(
    target: Session | Connection,
    type: EventType,
    data: Mapping[str, Any],
    *,
    contact_id: int | None = None,
    at: datetime | None = None,
) -> str:
    """Record one event in the caller's transaction; returns its uid."""
    event = NewEvent(type, data, contact_id, at)
    emit_many(target, [event])
    return event.uid


def emit_many(target: Session | Connection, events: Sequence[NewEvent]) -> int:
    """Record events (and their pending webhook deliveries) in the caller's transaction."""
    if not events:
        return 0
    conn = _connection(target)
    now = utcnow()
    postgres = conn.dialect.name == "postgresql"
    for start in range(0, len(events), _CHUNK):
        chunk = events[start : start + _CHUNK]
        rows = [
            (
                event.uid,
                event.type.value,
                event.occurred_at or now,
                event.contact_id,
                dict(event.data),
            )
            for event in chunk
        ]
        uids = [event.uid for event in chunk]
        if postgres and len(chunk) >= _COPY_FROM:
            _copy(conn, rows)
            conn.execute(_FAN_OUT_POSTGRES, {"now": now, "uids": uids})
        elif postgres:
            conn.execute(
                _EMIT_POSTGRES,
                {
                    "now": now,
                    "uids": uids,
                    "types": [row[1] for row in rows],
                    "ats": [row[2] for row in rows],
                    "contacts": [row[3] for row in rows],
                    "datas": [json.dumps(row[4]) for row in rows],
                },
            )
        else:
            conn.execute(
                insert(Event.__table__),  # type: ignore[attr-defined]
                [dict(zip(_EVENT_COLUMNS, row, strict=True)) for row in rows],
            )
            conn.execute(_FAN_OUT, {"now": now, "uids": uids})
    return len(events)


def _copy(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """PostgreSQL's COPY in the caller's transaction: a row-by-row executemany cost more client
    CPU per event than answering the tracking request that caused it."""
    statement = f"COPY events ({', '.join(_EVENT_COLUMNS)}) FROM STDIN"
    driver = conn.dialect.loaded_dbapi
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(statement) as copy:
            for uid, type_, occurred_at, contact_id, data in rows:
                copy.write_row((uid, type_, occurred_at, contact_id, json.dumps(data)))
    except driver.IntegrityError as exc:
        raise IntegrityError(statement, None, exc) from exc
    except driver.DataError as exc:
        raise DataError(statement, None, exc) from exc
    finally:
        cursor.close()


def timestamp_text(at: datetime) -> str:
    return as_utc(at).isoformat().replace("+00:00", "Z")


def body(type: str, occurred_at: datetime, data: Mapping[str, Any]) -> bytes:
    """The exact bytes a consumer receives (and the signature covers)."""
    document = {"type": type, "timestamp": timestamp_text(occurred_at), "data": dict(data)}
    return json.dumps(document, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode(
        "utf-8"
    )


def scrub_contact(target: Session | Connection, contact_id: int) -> int:
    """Remove every personal key from a contact's events (erasure); returns events changed."""
    conn = _connection(target)
    table = Event.__table__  # type: ignore[attr-defined]
    rows = conn.execute(
        select(table.c.id, table.c.data).where(table.c.contact_id == contact_id)
    ).all()
    changed = 0
    for row in rows:
        data = dict(row.data or {})
        if not PERSONAL_KEYS.intersection(data):
            continue
        for key in PERSONAL_KEYS:
            data.pop(key, None)
        conn.execute(update(table).where(table.c.id == row.id).values(data=data))
        changed += 1
    return changed
