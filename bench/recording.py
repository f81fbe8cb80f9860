"""Recording benchmark: what writing one open costs PostgreSQL, against a bare COPY.

    .venv/bin/python bench/recording.py                 # 200,000 hits a measurement, 3 rounds
    .venv/bin/python bench/recording.py --hits 50000 --rounds 1

The tracking app's writer (mailer.tracking.writer) runs at a low CPU priority, but the
PostgreSQL backend that executes its COPY does not: its share of each hit is work at normal
priority, beside the serving workers. This measures that share, all on loopback, in a fresh
schema (dropped afterwards) holding a campaign really sent to 5,000 contacts:

  * mailer: `EngagementRecorder.flush` of N opens, in batches of the writer's size, on the
    current schema (engagement_events without foreign keys; the recording lock and the
    question which deliveries still exist, mailer.queries);
  * foreign keys: the same flushes on the schema of migration 0008 (the three foreign keys
    checked for every row) without that lock and question: recording as it was before;
  * COPY: the same rows copied into a table like engagement_events with no index and no
    constraint, the floor of writing a row (the yardstick).

Each measurement starts from an empty engagement_events. Printed per measurement: the server's
CPU per row (every PostgreSQL process's user+system time from /proc, WAL writer and
checkpointer included), the client's CPU per row, the wall time, and the server CPU as a ratio
to the COPY measured in the same round. Nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import tracking  # noqa: E402  (bench/tracking.py: the schema, the campaign, the loopback check)

CONTACTS = 5_000
USER_AGENT = tracking.USER_AGENT
TICK = os.sysconf("SC_CLK_TCK")


def server_cpu() -> float:
    """Seconds of CPU used so far by every PostgreSQL process on this machine."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if not fh.read().startswith(b"postgres"):
                    continue
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def migrate(engine: Any, revision: str) -> None:
    from alembic import command

    from mailer.db import alembic_config

    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        (command.upgrade if revision == "head" else command.downgrade)(cfg, revision)


def measure(label: str, work: Callable[[], int], expected: int) -> dict[str, float]:
    server, client, wall = server_cpu(), time.process_time(), time.perf_counter()
    rows = work()
    if rows != expected:
        raise SystemExit(f"{label}: {rows:,} rows written of {expected:,}")
    time.sleep(0.5)  # the WAL writer's share of the last commit
    result = {
        "rows": rows,
        "server_us": (server_cpu() - server) / rows * 1e6,
        "client_us": (time.process_time() - client) / rows * 1e6,
        "seconds": time.perf_counter() - wall - 0.5,
    }
    print(
        f"  {label:<14} {rows:>9,} rows  server {result['server_us']:6.2f} µs/row  "
        f"client {result['client_us']:6.2f} µs/row  {result['seconds']:6.2f} s",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default=tracking.DEFAULT_PG, help="admin URL, loopback only")
    parser.add_argument("--hits", type=int, default=200_000, help="opens per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tracking.check_loopback_pg(args.pg)

    import anyio
    from sqlalchemy import select, text

    from mailer import queries
    from mailer.config import load_settings
    from mailer.engagement import EngagementRecorder, Hit
    from mailer.service import Mailer
    from mailer.tracking.writer import WRITER_BATCH_SIZE

    tracking.RECIPIENTS = CONTACTS
    with (
        tempfile.TemporaryDirectory(prefix="bench-recording-") as raw,
        tracking.pg_schema(args.pg) as url,
    ):
        folder = Path(raw)
        print(f"sending a campaign to {CONTACTS:,} contacts ...", flush=True)
        tracking.prepare(url, folder)
        mailer = Mailer(load_settings(tracking.environment(url), cwd=folder))
        engine = mailer.engine
        d = queries.deliveries
        with engine.connect() as conn:
            deliveries = conn.execute(select(d.c.id, d.c.campaign_id)).all()
        rng = random.Random(8058)
        now = datetime.now(UTC)
        hits = [
            Hit(
                "open", delivery, campaign, None, now - timedelta(seconds=i), None, USER_AGENT, None
            )
            for i, (delivery, campaign) in enumerate(rng.choices(deliveries, k=args.hits))
        ]
        events = queries.engagement_events.name

        def empty() -> None:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f"TRUNCATE {events}"))
                conn.execute(text("CHECKPOINT"))  # each measurement starts with no dirty page

        def record() -> int:
            recorder = EngagementRecorder(engine, batch_size=WRITER_BATCH_SIZE)
            written = 0
            for start in range(0, len(hits), WRITER_BATCH_SIZE):
                for hit in hits[start : start + WRITER_BATCH_SIZE]:
                    recorder.record(hit)
                written += anyio.run(recorder.flush)
            return written

        def plain_copy() -> int:
            with engine.begin() as conn:
                conn.execute(text("DROP TABLE IF EXISTS plain_events"))
                conn.execute(text(f"CREATE TABLE plain_events (LIKE {events} INCLUDING DEFAULTS)"))
            columns = "delivery_id, campaign_id, kind, occurred_at, user_agent, machine"
            for start in range(0, len(hits), WRITER_BATCH_SIZE):
                with engine.begin() as conn:
                    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                    with cursor.copy(f"COPY plain_events ({columns}) FROM STDIN") as copy:
                        for hit in hits[start : start + WRITER_BATCH_SIZE]:
                            copy.write_row(
                                (
                                    hit.delivery_id,
                                    hit.campaign_id,
                                    "open",
                                    hit.at,
                                    USER_AGENT,
                                    False,
                                )
                            )
                    cursor.close()
            return len(hits)

        def old_recording() -> int:
            guard = queries.guards_engagement_by_lock
            queries.guards_engagement_by_lock = lambda conn: False  # type: ignore[assignment]
            try:
                return record()
            finally:
                queries.guards_engagement_by_lock = guard  # type: ignore[assignment]

        results: dict[str, list[dict[str, float]]] = {"mailer": [], "foreign keys": [], "COPY": []}
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}:", flush=True)
            order = ["mailer", "foreign keys", "COPY"]
            if round_number % 2 == 0:
                order.reverse()
            for label in order:
                if label == "foreign keys":
                    migrate(engine, "0008")
                empty()
                work = {"mailer": record, "foreign keys": old_recording, "COPY": plain_copy}[label]
                results[label].append(measure(label, work, args.hits))
                if label == "foreign keys":
                    empty()
                    migrate(engine, "head")
        mailer.close()

    print()
    print(
        f"{'round':>6}{'mailer µs':>11}{'FK µs':>9}{'COPY µs':>10}{'mailer/COPY':>13}{'FK/COPY':>9}"
    )
    for i in range(args.rounds):
        ours, old, floor = (results[k][i]["server_us"] for k in ("mailer", "foreign keys", "COPY"))
        ratios = f"{ours / floor:>13.2f}{old / floor:>9.2f}"
        print(f"{i + 1:>6}{ours:>11.2f}{old:>9.2f}{floor:>10.2f}{ratios}")


if __name__ == "__main__":
    main()
