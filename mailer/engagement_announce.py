"""Recorded opens and clicks become outbox events, `message.opened` and `message.clicked`
(mailer.events), written by the webhook dispatcher rather than by the tracking server.

The tracking server only writes engagement_events (mailer.engagement), with `announced` false:
an outbox event and its fan-out cost about twice as much as answering the request, and the
serving process must not pay for them. The dispatcher calls announce_engagement() before it
claims deliveries (mailer.webhook_dispatch), and `mailer webhooks replay` before it replays.

Each chunk of rows is one transaction: the rows are marked announced and their events written
together, so a row is announced exactly once, also with several dispatchers at work (they skip
each other's rows on PostgreSQL; on SQLite the marking notices a row announced meanwhile and
the chunk is taken again). An event carries the row's classification when it is announced,
after the settle delay: a click that a later batch flagged as part of a burst goes out as a
machine's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, Select, Update, not_, select, update

from mailer import queries
from mailer.engagement import CampaignFact, CampaignFacts, id_chunks, id_in
from mailer.events import EventType, NewEvent, emit_many
from mailer.models import as_utc, utcnow

# How old a hit must be before it is announced. A click's flag can change after it is written:
# every link of a mail clicked within BURST_WINDOW (1 s) is a scanner's, and the click that
# completes a burst may be written by a later flush (each worker flushes every
# DEFAULT_FLUSH_INTERVAL, 1 s, and a flush takes a moment), which then flags the earlier ones.
# Five seconds covers both with room for a slow flush (or clocks of the tracking servers and
# the dispatcher a little apart), and is still "a few seconds" to a consumer. A honeypot click
# flags clicks up to HONEYPOT_WINDOW (30 s) before it; those older than the delay are already
# announced, as a person's.
ANNOUNCE_SETTLE = timedelta(seconds=5)
ANNOUNCE_CHUNK = 5000  # rows per transaction
ENGAGEMENT_TYPES = frozenset({EventType.MESSAGE_OPENED.value, EventType.MESSAGE_CLICKED.value})


class _Raced(Exception):
    """Some of the chunk's rows were announced by another announcer, or deleted by an erasure,
    after they were read (SQLite, where the rows are read before the write transaction
    begins; on PostgreSQL they are locked as they are read)."""


def announce_engagement(
    engine: Engine,
    *,
    limit: int = ANNOUNCE_CHUNK,
    settle: timedelta = ANNOUNCE_SETTLE,
    now: datetime | None = None,
) -> int:
    """Announce every open and click recorded at least `settle` before `now` (default: the
    current time) and not yet announced, oldest first, `limit` rows a transaction; returns
    how many were announced."""
    if limit < 1:
        raise ValueError("limit must be positive")
    cutoff = (now or utcnow()) - settle
    campaigns = CampaignFacts()
    total = 0
    while True:
        try:
            with engine.begin() as conn:
                announced = _announce_chunk(conn, campaigns, limit, cutoff)
        except _Raced:
            continue  # rolled back; those rows are taken or gone, look again
        total += announced
        if announced < limit:
            return total


def _announce_chunk(
    conn: Connection, campaigns: CampaignFacts, limit: int, cutoff: datetime
) -> int:
    rows = conn.execute(_unannounced(limit, cutoff)).all()
    if not rows:
        return 0
    marked = 0
    for chunk in id_chunks([row.id for row in rows], conn):
        marked += conn.execute(_mark_announced(chunk)).rowcount
    if marked != len(rows):
        raise _Raced
    facts = campaigns.get(conn, {row.campaign_id for row in rows})
    emit_many(conn, [_event(row, facts) for row in rows])
    return len(rows)


def _event(row: Row[Any], campaigns: Mapping[int, CampaignFact]) -> NewEvent:
    """The outbox event of one engagement row: thin ids, the link of a click, and the
    classification, never the address, the IP address or the user agent."""
    data: dict[str, Any] = {
        "delivery_id": row.delivery_id,
        "campaign_id": row.campaign_id,
        "contact_id": row.contact_id,
    }
    campaign = campaigns.get(row.campaign_id)
    if campaign is not None:
        data["campaign"] = campaign.name
    if row.kind == queries.CLICK:
        event_type = EventType.MESSAGE_CLICKED
        position = row.link_position
        data["link_position"] = position
        if campaign is not None and position is not None and 0 <= position < len(campaign.links):
            data["url"] = campaign.links[position]
    else:
        event_type = EventType.MESSAGE_OPENED
    data["machine"] = row.machine
    data["machine_reason"] = row.machine_reason
    return NewEvent(event_type, data, row.contact_id, as_utc(row.occurred_at))


# -- the queries ---------------------------------------------------------------------------------
# `NOT announced` as in the partial index ix_engagement_events_unannounced, so that the look
# for rows to announce reads only those, however large the table grows.


def _unannounced(limit: int, cutoff: datetime) -> Select[Any]:
    """The oldest rows not yet announced and old enough, locked; on PostgreSQL rows another
    announcer holds are skipped, not waited for (SQLite ignores the lock clause)."""
    e = queries.engagement_events
    return (
        select(
            e.c.id,
            e.c.delivery_id,
            e.c.campaign_id,
            e.c.contact_id,
            e.c.kind,
            e.c.link_position,
            e.c.occurred_at,
            e.c.machine,
            e.c.machine_reason,
        )
        .where(not_(e.c.announced), e.c.occurred_at <= cutoff)
        .order_by(e.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def _mark_announced(ids: Sequence[int]) -> Update:
    """Only rows still unannounced: the count changed tells of a race (see _Raced)."""
    e = queries.engagement_events
    return update(e).where(id_in(e.c.id, ids), not_(e.c.announced)).values(announced=True)
