"""Engagement: where a click may lead, and opens and clicks recorded off the request's path.

    LinkCache           each campaign's link table, cached in memory (bounded): the only
                        places a click redirect may lead to (invariant 5)
    Hit                 one open or click, as the tracking app saw it
    EngagementRecorder  an in-memory queue, written to engagement_events in batches by a
                        background task at least every `flush_interval` seconds and on
                        shutdown; a batch that cannot be written stays queued for the next try

Classification (invariant 6): what one request shows is decided when it arrives
(mailer.tracking.classify). What needs the delivery or the other clicks of a mail is decided
here, when a batch is written, against the database, so it holds across workers:

  * a click within CLICK_GRACE of the delivery's handover to SMTP (a gateway scanning the
    mail on arrival; nobody reads and clicks that fast);
  * every link of a mail (two or more) clicked within BURST_WINDOW;
  * any click within HONEYPOT_WINDOW of a click on the honeypot, the hidden link in every
    click-tracked mail that only a scanner follows.

Such events are flagged, never deleted; reports count them apart.

Recording writes engagement_events only. The outbox events (`message.opened`,
`message.clicked`; mailer.events) are written later by the webhook dispatcher
(mailer.engagement_announce), a few seconds after the hit: the serving process never pays for
them, and a click that a later batch shows to be part of a burst is announced with that flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import anyio.to_thread
from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Integer,
    and_,
    any_,
    bindparam,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from mailer import queries
from mailer.errors import DatabaseError
from mailer.models import HONEYPOT_POSITION, Campaign, as_utc
from mailer.tracking.classify import MachineReason

logger = logging.getLogger("mailer.engagement")

CLICK_GRACE = timedelta(seconds=10)
BURST_WINDOW = timedelta(seconds=1)
HONEYPOT_WINDOW = timedelta(seconds=30)
DEFAULT_FLUSH_INTERVAL = 1.0
BATCH_SIZE = 4000  # a flush starts once this many are queued, or at the interval
MAX_PENDING = 500_000  # events held while the database is unreachable; beyond this, dropped
MAX_CACHED_CAMPAIGNS = 1024
MAX_CACHED_DELIVERIES = 200_000
FACTS_TTL = 300.0  # seconds a delivery's facts are trusted without asking the database
_CHUNK = 2000  # ids per IN (...) list
# rows per INSERT: 10 columns make 20,000 parameters (SQLite allows 32,766, PostgreSQL 65,535)
ROWS_PER_INSERT = 2000
USER_AGENT_LENGTH = 512


class Hit(NamedTuple):
    """One open or click. `campaign_id` is None for tokens made before tokens carried it;
    the delivery then says which campaign it belongs to."""

    kind: str  # queries.OPEN or queries.CLICK
    delivery_id: int
    campaign_id: int | None
    position: int | None
    at: datetime
    ip_masked: str | None
    user_agent: str | None
    machine_reason: str | None


# What the queue holds: a Hit as a plain tuple, in Hit's field order.
_Queued = tuple[str, int, int | None, int | None, datetime, str | None, str | None, str | None]


@dataclass
class RecorderStats:
    recorded: int = 0  # hits record() took into its queue
    written: int = 0  # rows inserted
    discarded: int = 0  # hits left out: their delivery is gone (erased), or the row refused
    dropped: int = 0  # hits lost: turned away (queue_full) or given up on after failed writes
    queue_full: int = 0  # hits record() turned away, its queue full (not in recorded)
    failed_flushes: int = 0
    reclassified: dict[str, int] = field(default_factory=dict)

    @property
    def unaccounted(self) -> int:
        """Hits handed to record() that were neither written, left out nor counted as dropped:
        still queued, or held by a writer process that died."""
        return self.recorded + self.queue_full - self.written - self.discarded - self.dropped

    def account(self) -> str:
        """One line on what became of the hits: what a worker logs as it shuts down."""
        return (
            f"opens and clicks: {self.recorded + self.queue_full} received, {self.written} "
            f"written, {self.discarded} left out (delivery erased or row refused), "
            f"{self.dropped} dropped, {self.unaccounted} unaccounted"
        )


def id_chunks(values: Sequence[int], conn: Connection) -> Iterable[Sequence[int]]:
    """The ids in lists a statement can take: all at once as one array on PostgreSQL, else
    _CHUNK at a time."""
    if conn.dialect.name == "postgresql":
        if values:
            yield _IdArray(values)
        return
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


class EngagementRecorder:
    """Records hits without making the request wait for the database.

    `record()` only appends to a list (and, once `batch_size` are queued, wakes the flush
    loop early). `start()` runs the flush loop; `stop()` ends it after a last flush.
    `flush()` may also be awaited directly (tests, shutdown). One flush runs at a time, in a
    worker thread, as one transaction.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_pending: int = MAX_PENDING,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        if not flush_interval > 0:
            raise ValueError("flush_interval must be positive")
        self.engine = engine
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.stats = RecorderStats()
        self._pending: list[_Queued] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._due = asyncio.Event()
        self._facts = _DeliveryFacts()
        self._campaigns = CampaignFacts()
        self.failing = False  # the last flush could not write its batch

    @property
    def pending(self) -> int:
        return len(self._pending)

    # Requests never wait for this recorder: while the database is down it holds what it can
    # (max_pending) and drops the rest. (WriterProcessRecorder makes them wait when its writer
    # process is behind for want of CPU.)
    crowded = False

    async def room(self) -> None:
        return None

    def record(self, hit: Hit) -> None:
        pending = self._pending
        if len(pending) >= self.max_pending:
            self.stats.dropped += 1
            self.stats.queue_full += 1
            return
        pending.append(hit[:])  # a plain tuple, which the collector stops tracking
        self.stats.recorded += 1
        if len(pending) == self.batch_size:  # a full batch need not wait for the interval
            self._due.set()

    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="engagement-recorder")

    async def stop(self) -> None:
        """End the flush loop and write what is queued (with a few retries)."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            self._due.set()
            await task
        for attempt in range(3):
            await self.flush()
            if not self._pending:
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        if self._pending:
            logger.error(
                "%d engagement events could not be written before shutdown", len(self._pending)
            )

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), self.flush_interval)
            self._due.clear()
            await self.flush()

    async def flush(self) -> int:
        """Write every queued hit; returns the rows inserted. On a database error the hits
        stay queued (ahead of newer ones) and the next flush tries again."""
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return 0
            try:
                written, reclassified = await anyio.to_thread.run_sync(self._write_all, batch)
            except Exception:
                self.failing = True
                self.stats.failed_flushes += 1
                logger.exception("could not write %d engagement events; will retry", len(batch))
                keep = max(self.max_pending - len(self._pending), 0)
                self.stats.dropped += max(len(batch) - keep, 0)
                self._pending[:0] = batch[:keep]
                return 0
            self.failing = False
            self.stats.written += written
            self.stats.discarded += len(batch) - written
            for reason, count in reclassified.items():
                self.stats.reclassified[reason] = self.stats.reclassified.get(reason, 0) + count
            return written

    def _write_all(self, batch: Sequence[_Queued]) -> tuple[int, dict[str, int]]:
        try:
            return self._write(batch)
        except (IntegrityError, DataError):
            # SQLite's foreign key: a delivery may have been erased since it was cached
            self._facts.clear()
        try:
            return self._write(batch)
        except (IntegrityError, DataError):
            # one row the database refuses must not hold back the others for ever
            return self._write_each(batch)

    def _write(self, batch: Sequence[_Queued]) -> tuple[int, dict[str, int]]:
        with self.engine.begin() as conn:
            # before anything is read: an erasure in progress is waited for (queries.py)
            queries.lock_engagement_for_recording(conn)
            facts = self._facts.get(conn, {hit[1] for hit in batch})
            rows, clicks = _rows(batch, facts)
            if rows and queries.guards_engagement_by_lock(conn):
                # cached facts may be minutes old, and no foreign key would refuse the row
                gone = queries.missing_deliveries(conn, {row[0] for row in rows})
                if gone:
                    self._facts.forget(gone)
                    rows = [row for row in rows if row[0] not in gone]
                    clicks = [click for click in clicks if click.delivery_id not in gone]
            if not rows:
                return 0, {}
            _insert(conn, rows)
            if not clicks:
                return len(rows), {}
            campaigns = self._campaigns.get(conn, {click.campaign_id for click in clicks})
            return len(rows), _reclassify(conn, clicks, campaigns)

    def _write_each(self, batch: Sequence[_Queued]) -> tuple[int, dict[str, int]]:
        written = 0
        reclassified: dict[str, int] = defaultdict(int)
        for hit in batch:
            try:
                count, flagged = self._write([hit])
            except (IntegrityError, DataError) as exc:
                logger.error("engagement event %r cannot be written, left out: %s", hit, exc)
                continue
            written += count
            for reason, n in flagged.items():
                reclassified[reason] += n
        return written, dict(reclassified)


class _Delivery(NamedTuple):
    campaign_id: int
    contact_id: int | None
    handed_over_at: datetime | None  # finished_at, else sending_at: when SMTP had the mail


class _DeliveryFacts:
    """What recording needs to know about a delivery, cached: a delivery's campaign and
    contact never change, and its handover time only once it is known. Entries expire, so a
    delivery erased meanwhile is noticed. Entries are plain tuples of plain values, which the
    garbage collector stops tracking: a large cache costs its pauses nothing."""

    def __init__(self, ttl: float = FACTS_TTL, limit: int = MAX_CACHED_DELIVERIES) -> None:
        self.ttl = ttl
        self.limit = limit
        # delivery id -> (expires, campaign id, contact id, handed over at)
        self._cache: dict[int, tuple[float, int, int | None, datetime | None]] = {}

    def clear(self) -> None:
        self._cache.clear()

    def forget(self, delivery_ids: Iterable[int]) -> None:
        for delivery_id in delivery_ids:
            self._cache.pop(delivery_id, None)

    def get(self, conn: Connection, delivery_ids: Iterable[int]) -> dict[int, _Delivery]:
        now = time.monotonic()
        found: dict[int, _Delivery] = {}
        missing: list[int] = []
        for delivery_id in delivery_ids:
            cached = self._cache.get(delivery_id)
            if cached is not None and cached[0] > now:
                found[delivery_id] = _Delivery(cached[1], cached[2], cached[3])
            else:
                missing.append(delivery_id)
        if len(self._cache) + len(missing) > self.limit:
            self._cache.clear()
        for chunk in id_chunks(sorted(missing), conn):
            for row in conn.execute(_delivery_facts(chunk)):
                handed_over = row.finished_at or row.sending_at
                at = None if handed_over is None else as_utc(handed_over)
                found[row.id] = _Delivery(row.campaign_id, row.contact_id, at)
                if row.finished_at is not None:
                    self._cache[row.id] = (now + self.ttl, row.campaign_id, row.contact_id, at)
        return found


class CampaignFact(NamedTuple):
    name: str
    links: tuple[str, ...]


class CampaignFacts:
    """Each campaign's name and links, for the burst rule and for the outbox events
    (mailer.engagement_announce): both are written with the campaign and never change, so they
    are read once per campaign (and the cache is bounded)."""

    def __init__(self, limit: int = MAX_CACHED_CAMPAIGNS) -> None:
        self.limit = limit
        self._cache: dict[int, CampaignFact] = {}

    def get(self, conn: Connection, campaign_ids: Iterable[int]) -> dict[int, CampaignFact]:
        wanted = set(campaign_ids)
        missing = sorted(wanted.difference(self._cache))
        if len(self._cache) + len(missing) > self.limit:
            self._cache.clear()
            missing = sorted(wanted)
        if missing:
            table = Campaign.__table__  # type: ignore[attr-defined]
            names = conn.execute(
                select(table.c.id, table.c.name).where(table.c.id.in_(missing))
            ).all()
            for campaign_id, name in names:
                links: list[str] = []
                for position, url in conn.execute(queries.link_urls(campaign_id)):
                    if position != len(links):  # as LinkCache: trust only a prefix
                        break
                    links.append(url)
                self._cache[campaign_id] = CampaignFact(name, tuple(links))
        cache = self._cache
        return {campaign_id: cache[campaign_id] for campaign_id in wanted if campaign_id in cache}


class _Click(NamedTuple):
    delivery_id: int
    campaign_id: int
    position: int
    at: datetime


# `announced` is left to its server default, false: the webhook dispatcher announces the row
# later (mailer.engagement_announce), and a column less is less to send per row.
_COLUMNS = (
    "delivery_id",
    "campaign_id",
    "contact_id",
    "kind",
    "link_position",
    "occurred_at",
    "ip_masked",
    "user_agent",
    "machine",
    "machine_reason",
)


def _rows(
    batch: Sequence[_Queued], facts: Mapping[int, _Delivery]
) -> tuple[list[tuple[Any, ...]], list[_Click]]:
    """The batch as table rows (in _COLUMNS order), leaving out hits for deliveries that are
    gone; and the clicks among them, for the rules that look at several clicks."""
    rows: list[tuple[Any, ...]] = []
    clicks: list[_Click] = []
    click_kind = queries.CLICK
    after_delivery = MachineReason.CLICK_AFTER_DELIVERY.value
    for kind, delivery_id, campaign_id, position, at, ip_masked, user_agent, reason in batch:
        delivery = facts.get(delivery_id)
        if delivery is None or campaign_id not in (None, delivery.campaign_id):
            continue
        if kind == click_kind:
            handed_over = delivery.handed_over_at
            if reason is None and handed_over is not None and at - handed_over < CLICK_GRACE:
                reason = after_delivery
            clicks.append(_Click(delivery_id, delivery.campaign_id, position or 0, at))
        rows.append(
            (
                delivery_id,
                delivery.campaign_id,
                delivery.contact_id,
                kind,
                position,
                at,
                ip_masked,
                user_agent,
                reason is not None,
                reason,
            )
        )
    return rows, clicks


def _insert(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """COPY on PostgreSQL; elsewhere multi-row INSERTs straight to the driver,
    ROWS_PER_INSERT rows a statement.

    At thousands of rows a second, SQLAlchemy's per-row parameter processing would cost more
    than the database does; and one statement per row (executemany) hands the GIL back and
    forth for every row, so a busy event loop starves the flush (it grabs the GIL at each
    hand-back and keeps it for the switch interval). One statement per chunk binds its
    parameters in C and runs without the GIL.
    """
    dialect = conn.dialect
    if dialect.name == "postgresql":
        _copy(conn, rows)
        return
    placeholder = "?" if dialect.paramstyle == "qmark" else "%s"
    one = f"({', '.join([placeholder] * len(_COLUMNS))})"
    head = f"INSERT INTO {queries.engagement_events.name} ({', '.join(_COLUMNS)}) VALUES "
    to_database = DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
    if to_database is not None:  # SQLite keeps times as text, in SQLAlchemy's format
        at = _COLUMNS.index("occurred_at")
        rows = [(*row[:at], to_database(row[at]), *row[at + 1 :]) for row in rows]
    full = head + ", ".join([one] * ROWS_PER_INSERT)
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        statement = full if len(chunk) == ROWS_PER_INSERT else head + ", ".join([one] * len(chunk))
        conn.exec_driver_sql(statement, tuple(itertools.chain.from_iterable(chunk)))


def _copy(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """PostgreSQL's COPY, in the transaction of `conn`: about a fifteenth of the client's CPU
    of a multi-row INSERT (psycopg adapts a row in C), and less of the server's."""
    statement = f"COPY {queries.engagement_events.name} ({', '.join(_COLUMNS)}) FROM STDIN"
    driver = conn.dialect.loaded_dbapi
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except driver.IntegrityError as exc:  # the driver's own: translated as SQLAlchemy would
        raise IntegrityError(statement, None, exc) from exc
    except driver.DataError as exc:
        raise DataError(statement, None, exc) from exc
    finally:
        cursor.close()


def _reclassify(
    conn: Connection, batch_clicks: Sequence[_Click], campaigns: Mapping[int, CampaignFact]
) -> dict[str, int]:
    """Flag the clicks that only several clicks together show to be a machine's: those beside
    a honeypot click, and bursts that click every link of a mail within BURST_WINDOW. Looks at
    the clicks just written together with those already stored (by any worker); one grouped
    query narrows the deliveries down first, so a batch of ordinary clicks costs one query.
    Returns the count flagged per reason."""
    start = min(click.at for click in batch_clicks)
    end = max(click.at for click in batch_clicks)
    campaign_of = {click.delivery_id: click.campaign_id for click in batch_clicks}
    trapped: list[int] = []  # deliveries with a honeypot click near these clicks
    bursting: list[int] = []  # deliveries with every link clicked near these clicks
    for chunk in id_chunks(sorted(campaign_of), conn):
        for delivery_id, near_trap, positions in candidates(conn, chunk, start, end):
            if near_trap:
                trapped.append(delivery_id)
            campaign = campaigns.get(campaign_of[delivery_id])
            if campaign is not None and positions >= max(2, len(campaign.links)):
                bursting.append(delivery_id)
    if not trapped and not bursting:
        return {}

    flagged: dict[str, set[int]] = defaultdict(set)
    for chunk in id_chunks(trapped, conn):
        found = clicks_between(conn, chunk, start - HONEYPOT_WINDOW, end + HONEYPOT_WINDOW)
        by_delivery: dict[int, list[Any]] = defaultdict(list)
        for row in found:
            by_delivery[row.delivery_id].append(row)
        for rows in by_delivery.values():
            traps = [as_utc(r.occurred_at) for r in rows if r.link_position == HONEYPOT_POSITION]
            for row in rows:
                at = as_utc(row.occurred_at)
                if not row.machine and any(abs(at - t) <= HONEYPOT_WINDOW for t in traps):
                    flagged[MachineReason.HONEYPOT_NEIGHBOUR.value].add(row.id)
    for chunk in id_chunks(bursting, conn):
        found = clicks_between(conn, chunk, start - BURST_WINDOW, end + BURST_WINDOW)
        by_delivery = defaultdict(list)
        for row in found:
            if row.link_position != HONEYPOT_POSITION:
                by_delivery[row.delivery_id].append(row)
        for delivery_id, rows in by_delivery.items():
            needed = len(campaigns[campaign_of[delivery_id]].links)
            for row in _bursts(rows, needed):
                if not row.machine:
                    flagged[MachineReason.ALL_LINKS_AT_ONCE.value].add(row.id)

    counts: dict[str, int] = {}
    done: set[int] = set()
    for reason, ids in flagged.items():
        fresh = sorted(ids - done)
        done |= ids
        for chunk in id_chunks(fresh, conn):
            conn.execute(_flag_machine(chunk, reason))
        if fresh:
            counts[reason] = len(fresh)
    return counts


# -- the queries of recording ---------------------------------------------------------------------
# As mailer.queries', with one difference: a list of ids is one parameter on PostgreSQL
# (`= ANY(array)`), not an IN list of up to _CHUNK parameters. psycopg parses a statement of more
# than 50 parameters anew at every execution (it caches only smaller ones), which cost a
# flush more of the worker's CPU than the database's answers did.


def id_in(column: Any, ids: Sequence[int]) -> Any:
    if isinstance(ids, _IdArray):
        return column == any_(literal(list(ids), postgresql.ARRAY(Integer)))
    return column.in_(list(ids))


class _IdArray(list[int]):
    """Ids to be sent as one array parameter (PostgreSQL)."""


def _delivery_facts(ids: Sequence[int]) -> Any:
    d = queries.deliveries
    return select(d.c.id, d.c.campaign_id, d.c.contact_id, d.c.sending_at, d.c.finished_at).where(
        id_in(d.c.id, ids)
    )


# Written into the SQL, not bound: SQLite uses a partial index only for a query that states
# its condition literally (ix_engagement_events_honeypot, migration 0008).
_HONEYPOT: Any = literal_column(str(HONEYPOT_POSITION))


def _candidates(ids: Sequence[int], start: datetime, end: datetime) -> Any:
    """Per delivery clicked in [start, end]: whether its honeypot was followed within
    HONEYPOT_WINDOW, and how many of its links were clicked within BURST_WINDOW; only the
    deliveries with a honeypot click or two links or more.

    Two index range scans a delivery, each reading only the rows its rule needs: the link
    clicks of the burst window (ix_engagement_events_delivery_clicks), and the honeypot clicks
    of the much longer honeypot window (the small partial index). One scan of every click in
    the honeypot window read dozens of rows a delivery under scanner traffic, and fell behind.
    """
    e = queries.engagement_events
    clicked = and_(id_in(e.c.delivery_id, ids), e.c.kind == queries.CLICK)
    links = select(
        e.c.delivery_id, literal(0).label("trap"), e.c.link_position.label("position")
    ).where(
        clicked,
        e.c.occurred_at >= start - BURST_WINDOW,
        e.c.occurred_at <= end + BURST_WINDOW,
        e.c.link_position != _HONEYPOT,
    )
    traps = select(e.c.delivery_id, literal(1).label("trap"), null().label("position")).where(
        clicked,
        e.c.link_position == _HONEYPOT,
        e.c.occurred_at >= start - HONEYPOT_WINDOW,
        e.c.occurred_at <= end + HONEYPOT_WINDOW,
    )
    both = union_all(links, traps).subquery()
    trapped = func.max(both.c.trap)
    positions = func.count(both.c.position.distinct())
    return (
        select(both.c.delivery_id, trapped, positions)
        .group_by(both.c.delivery_id)
        .having(or_(trapped == 1, positions >= 2))
    )


def _candidates_by_delivery(table: str) -> Any:
    """_candidates on PostgreSQL, asked delivery by delivery: the array as a relation, and for
    each of its ids an aggregate over that delivery's rows (LATERAL), which the planner cannot
    turn into a join of its own choosing. It reads the same two index ranges a delivery
    whatever the statistics say. A table that grows fast (a new installation's first campaign:
    hundreds of thousands of rows within minutes, autovacuum analysing once a minute) has
    statistics that call it small, and the grouped query above was then planned as a scan of
    the time window with every row tested against the array one element at a time: 65 µs of
    server CPU a click recorded, 18 µs once analysed; this form needs no analysis."""
    honeypot = HONEYPOT_POSITION
    return text(
        f"""
        SELECT wanted.id AS delivery_id, found.trap, found.positions
        FROM unnest(:ids) AS wanted(id)
        CROSS JOIN LATERAL (
            SELECT max(near.trap) AS trap, count(DISTINCT near.position) AS positions
            FROM (
                SELECT 0 AS trap, e.link_position AS position FROM {table} e
                WHERE e.delivery_id = wanted.id AND e.kind = :click
                  AND e.occurred_at >= :links_from AND e.occurred_at <= :links_to
                  AND e.link_position <> {honeypot}
                UNION ALL
                SELECT 1, NULL FROM {table} e
                WHERE e.delivery_id = wanted.id AND e.kind = :click
                  AND e.link_position = {honeypot}
                  AND e.occurred_at >= :traps_from AND e.occurred_at <= :traps_to
            ) AS near
        ) AS found
        WHERE found.trap = 1 OR found.positions >= 2
        """
    ).bindparams(bindparam("ids", type_=postgresql.ARRAY(BigInteger)))


def candidates(
    conn: Connection, ids: Sequence[int], start: datetime, end: datetime
) -> Iterable[Any]:
    """(delivery id, near a honeypot click, link positions clicked) for the deliveries of
    `ids` that a click rule may apply to (see _candidates)."""
    if not isinstance(ids, _IdArray):
        return conn.execute(_candidates(ids, start, end))
    return conn.execute(
        _candidates_by_delivery(queries.engagement_events.name),
        {
            "ids": list(ids),
            "click": queries.CLICK,
            "links_from": start - BURST_WINDOW,
            "links_to": end + BURST_WINDOW,
            "traps_from": start - HONEYPOT_WINDOW,
            "traps_to": end + HONEYPOT_WINDOW,
        },
    )


def _clicks_between_by_delivery(table: str) -> Any:
    """_clicks_between on PostgreSQL, delivery by delivery, for the reason given at
    _candidates_by_delivery. `OFFSET 0` keeps the planner from pulling the LATERAL subquery up
    into a join it would order by the (possibly stale) statistics: each id gets its own range
    scan of ix_engagement_events_delivery_clicks."""
    return text(
        f"""
        SELECT found.id, found.delivery_id, found.link_position, found.occurred_at, found.machine
        FROM unnest(:ids) AS wanted(id)
        CROSS JOIN LATERAL (
            SELECT e.id, e.delivery_id, e.link_position, e.occurred_at, e.machine
            FROM {table} e
            WHERE e.delivery_id = wanted.id AND e.kind = :click
              AND e.occurred_at >= :start AND e.occurred_at <= :end
            OFFSET 0
        ) AS found
        """
    ).bindparams(bindparam("ids", type_=postgresql.ARRAY(BigInteger)))


def clicks_between(
    conn: Connection, ids: Sequence[int], start: datetime, end: datetime
) -> Iterable[Any]:
    """The clicks of these deliveries in [start, end]: id, delivery_id, link_position,
    occurred_at, machine."""
    if not isinstance(ids, _IdArray):
        return conn.execute(_clicks_between(ids, start, end))
    parameters = {"ids": list(ids), "click": queries.CLICK, "start": start, "end": end}
    return conn.execute(_clicks_between_by_delivery(queries.engagement_events.name), parameters)


def _clicks_between(ids: Sequence[int], start: datetime, end: datetime) -> Any:
    e = queries.engagement_events
    return select(e.c.id, e.c.delivery_id, e.c.link_position, e.c.occurred_at, e.c.machine).where(
        id_in(e.c.delivery_id, ids),
        e.c.kind == queries.CLICK,
        e.c.occurred_at >= start,
        e.c.occurred_at <= end,
    )


def _flag_machine(ids: Sequence[int], reason: str) -> Any:
    """Only a human event is reclassified, so the first reason found stays."""
    e = queries.engagement_events
    return (
        update(e)
        .where(id_in(e.c.id, ids), e.c.machine.is_(False))
        .values(machine=True, machine_reason=reason)
    )


def _bursts(rows: Sequence[Any], needed: int) -> list[Any]:
    """The rows (clicks of one delivery) that lie in some window of BURST_WINDOW holding all
    `needed` link positions."""
    ordered = sorted(rows, key=lambda r: as_utc(r.occurred_at))
    times = [as_utc(r.occurred_at) for r in ordered]
    found: dict[int, Any] = {}
    in_window: dict[int, int] = defaultdict(int)
    first = 0
    for last, row in enumerate(ordered):
        in_window[row.link_position] += 1
        while times[last] - times[first] > BURST_WINDOW:
            gone = ordered[first].link_position
            in_window[gone] -= 1
            if not in_window[gone]:
                del in_window[gone]
            first += 1
        if len(in_window) >= needed:
            for inside in ordered[first : last + 1]:
                found[inside.id] = inside
    return list(found.values())


class LinkCache:
    """Each campaign's link table, read once and kept (at most `max_campaigns`, least recently
    used first out). A campaign's links are written with the campaign and never change, so a
    cached table is never stale."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_campaigns: int = MAX_CACHED_CAMPAIGNS,
        max_deliveries: int = MAX_CACHED_DELIVERIES,
    ) -> None:
        self.engine = engine
        self.max_campaigns = max_campaigns
        self.max_deliveries = max_deliveries
        self._links: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        self._campaigns: OrderedDict[int, int | None] = OrderedDict()
        self._loading: dict[int, asyncio.Future[tuple[str, ...]]] = {}

    async def url(self, campaign_id: int, position: int) -> str | None:
        """The campaign's link at `position`, or None when it has none there."""
        links = self._links.get(campaign_id)
        if links is None:
            links = await self._load(campaign_id)
        else:
            self._links.move_to_end(campaign_id)
        return links[position] if 0 <= position < len(links) else None

    async def _load(self, campaign_id: int) -> tuple[str, ...]:
        future = self._loading.get(campaign_id)
        if future is None:  # one read per campaign, however many requests wait for it
            future = asyncio.ensure_future(anyio.to_thread.run_sync(self._read_links, campaign_id))
            self._loading[campaign_id] = future
            future.add_done_callback(lambda _: self._loading.pop(campaign_id, None))
        links = await asyncio.shield(future)
        self._links[campaign_id] = links
        while len(self._links) > self.max_campaigns:
            self._links.popitem(last=False)
        return links

    def _read_links(self, campaign_id: int) -> tuple[str, ...]:
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(queries.link_urls(campaign_id)).all()
        except SQLAlchemyError as exc:
            raise DatabaseError("the database is unavailable") from exc
        # positions are 0..n-1; anything else would be a broken table: trust only a prefix
        links: list[str] = []
        for position, url in rows:
            if position != len(links):
                break
            links.append(url)
        return tuple(links)

    async def campaign_of(self, delivery_id: int) -> int | None:
        """The campaign of a delivery (for tokens made before tokens carried it)."""
        if delivery_id in self._campaigns:
            return self._campaigns[delivery_id]
        campaign_id = await anyio.to_thread.run_sync(self._read_campaign, delivery_id)
        self._campaigns[delivery_id] = campaign_id
        while len(self._campaigns) > self.max_deliveries:
            self._campaigns.popitem(last=False)
        return campaign_id

    def _read_campaign(self, delivery_id: int) -> int | None:
        try:
            with self.engine.connect() as conn:
                row = conn.execute(queries.delivery_facts([delivery_id])).first()
        except SQLAlchemyError as exc:
            raise DatabaseError("the database is unavailable") from exc
        return None if row is None else int(row.campaign_id)
