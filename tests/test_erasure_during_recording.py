"""An erasure while opens and clicks are being recorded: no event outlives its delivery.

On PostgreSQL engagement_events has no foreign keys (migration 0009); recording and erasure lock
the table against each other instead (mailer.queries). On SQLite the keys and its single writer
keep the same promise. Both orders are played with a real second transaction held open: an
erasure that has not committed yet while a batch is written, and a batch that has not committed
yet while the erasure runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from mailer import privacy, queries
from mailer.engagement import EngagementRecorder, Hit
from mailer.models import utcnow
from mailer.service import Mailer
from tests.smtp_server import CaptureServer
from tests.test_tracking_pixel_and_click import (
    HUMAN,
    deliveries_table,
    events_table,
    send_tracked,
)

WAITS = 0.5  # seconds a blocked side must still be waiting


def orphans(mailer: Mailer) -> int:
    """Engagement events whose delivery is gone."""
    with mailer.engine.connect() as conn:
        known = select(deliveries_table.c.id)
        return int(
            conn.execute(
                select(func.count())
                .select_from(events_table)
                .where(events_table.c.delivery_id.not_in(known))
            ).scalar_one()
        )


def events_of(mailer: Mailer, delivery_id: int) -> int:
    with mailer.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(events_table)
                .where(events_table.c.delivery_id == delivery_id)
            ).scalar_one()
        )


@pytest.mark.asyncio
async def test_a_batch_written_during_an_erasure_waits_for_it_and_leaves_the_erased_out(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = ("stays@example.org", "erased@example.org")
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    stays, erased = sent["stays@example.org"], sent["erased@example.org"]
    recorder = EngagementRecorder(mailer.engine)

    def hit_both() -> None:
        for mail in (stays, erased):
            recorder.record(
                Hit("open", mail.delivery_id, mail.campaign_id, None, utcnow(), None, HUMAN, None)
            )

    hit_both()
    assert await recorder.flush() == 2  # both deliveries are in the recorder's cache now

    erasure = mailer.engine.connect()
    transaction = erasure.begin()
    try:
        # an erasure half done: locked, its events and delivery deleted, not committed
        queries.lock_engagement_for_erasure(erasure)
        erasure.execute(
            events_table.delete().where(events_table.c.delivery_id == erased.delivery_id)
        )
        erasure.execute(
            deliveries_table.delete().where(deliveries_table.c.id == erased.delivery_id)
        )
        hit_both()
        flush = asyncio.ensure_future(recorder.flush())
        await asyncio.sleep(WAITS)
        assert not flush.done(), "the batch did not wait for the erasure in progress"
        transaction.commit()
    finally:
        erasure.close()
    assert await asyncio.wait_for(flush, 30) == 1
    assert (recorder.pending, recorder.stats.discarded) == (0, 1)
    assert events_of(mailer, stays.delivery_id) == 2
    assert events_of(mailer, erased.delivery_id) == 0
    assert orphans(mailer) == 0


@pytest.mark.asyncio
async def test_an_erasure_during_a_batch_waits_for_it_and_removes_what_it_wrote(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    done = threading.Event()
    report: list[privacy.ErasureReport] = []

    def erase() -> None:
        report.append(privacy.erase(mailer, "tracked@example.org"))
        done.set()

    writer = mailer.engine.connect()
    transaction = writer.begin()
    try:
        # a batch half written: locked, its delivery seen, its row inserted, not committed
        queries.lock_engagement_for_recording(writer)
        if queries.guards_engagement_by_lock(writer):
            assert queries.missing_deliveries(writer, [sent.delivery_id]) == set()
        writer.execute(
            insert(events_table).values(
                delivery_id=sent.delivery_id,
                campaign_id=sent.campaign_id,
                kind="open",
                occurred_at=utcnow(),
                user_agent=HUMAN,
                machine=False,
            )
        )
        eraser = threading.Thread(target=erase)
        eraser.start()
        await asyncio.sleep(WAITS)
        assert not done.is_set(), "the erasure did not wait for the batch in progress"
        transaction.commit()
    finally:
        writer.close()
    await asyncio.to_thread(eraser.join, 30)
    assert done.is_set()
    assert report[0].removed["engagement_events"] == 1  # the batch's row, seen and removed
    assert events_of(mailer, sent.delivery_id) == 0
    assert orphans(mailer) == 0


@pytest.mark.asyncio
async def test_missing_deliveries_names_only_those_that_are_gone(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    with mailer.engine.connect() as conn:
        if not queries.guards_engagement_by_lock(conn):
            pytest.skip("SQLite checks deliveries by its foreign keys, not by this query")
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    here = sent.delivery_id
    gone = [here + 1000, 2**40]
    with mailer.engine.connect() as conn:
        assert queries.missing_deliveries(conn, []) == set()
        assert queries.missing_deliveries(conn, [here, here]) == set()
        assert queries.missing_deliveries(conn, [here, *gone, gone[0]]) == set(gone)
