"""Opens and clicks written by a separate process, so the serving process only answers requests.

A serving worker queues each hit in memory, as EngagementRecorder does, and hands its queue to
its own writer process many times a second, down a pipe. The writer process runs an
EngagementRecorder: the batched writes, the machine-traffic rules and the retries are the same
code as in-process recording. What changes is where that work holds the GIL: in a thread of the
serving process, a flush of thousands of rows took the interpreter from the event loop for
long stretches, and every request waiting behind it saw that in its latency.

    WriterProcessRecorder   the worker's side: record() appends to a list; a task sends the
                            list to the writer every SEND_INTERVAL (or at SEND_BATCH hits),
                            in frames of at most FRAME_HITS; flush() waits until the writer
                            has written everything sent
    run_writer() / main()   the writer's side (`python -m mailer.tracking.writer`): reads
                            frames from stdin until end of file, then writes what it holds
                            and exits

Nothing is lost when the worker stops: stop() sends what is queued and closes the pipe, and
the writer writes everything before it exits. When the worker dies (SIGKILL, a crash), the
pipe's end of file tells the writer, which writes everything it had received: only the hits
of the worker's last SEND_INTERVAL die with it (in-process recording loses up to a second's),
plus, on a saturated machine, the backlog the starved writer had not read yet (see below).
If the writer dies, the worker notices and records in-process from then on (an
EngagementRecorder in a thread, as without a writer); only what the dead writer held and had
not written is lost.

The writer yields the CPU to the requests: it runs at a lower priority (`niceness`, 19 by
default, `mailer serve --writer-niceness`) and, on Linux, under the kernel's SCHED_IDLE policy
(`idle`, on by default, `mailer serve --no-writer-idle` to keep the plain policy). Recording is
work nobody waits for, and when the machine is saturated a writer at the workers' priority
takes a core away from them in bursts (it wakes once a second with a second's rows to write),
which is what a request queued behind it sees as latency. Niceness alone only shrinks its
share: the core it runs on still counts as busy, so a worker, wrk or the database woken
meanwhile is queued elsewhere, and the writer's own queries go on starting the database's work
during the peak. A core that runs only SCHED_IDLE tasks counts as idle: whatever wakes is
placed there and preempts the writer at once. Lowered, it writes when the workers leave the
CPU idle, and catches up after a peak. It never falls behind without bound: once it holds
PAUSE_AT hits and its writes succeed, it stops reading until it has written them. A writer
that gets no CPU at all cannot even read: the pipe then fills, and the worker keeps what
follows as frames ready to go (PIPE_BUFFER bytes, at 38 bytes a hit), then as queued hits; once
that queue reaches CROWDED_AT, the requests that add to it wait (`room()`) until the writer
reads again. Under sustained overload that turns into latency, never into lost hits.
While the database is down the writer keeps reading (it cannot write anyway), and holds up to
MAX_PENDING hits, as in-process recording does.

The writer ignores SIGINT and SIGTERM: a Ctrl-C or a service manager's SIGTERM reaches the
whole process group, and the writer must outlive its worker's graceful shutdown to write the
last hits. It exits at end of file, which comes when its worker exits, however that happens.

Frames: a 4-byte big-endian length, then a `marshal` of ("start", database URL) first (so
the URL, which may hold a password, is on no command line that others on the machine can
read), then ("hits", [tuple, ...]) or ("flush", seq). A hit travels as its tuple with the
time as a POSIX timestamp: marshal takes only plain values, which is fast, and nothing in a
frame can name a class to build. The writer answers each flush with a line "seq written" on
stdout, and its last line, as it exits, gives its totals: "end written discarded dropped".
Its command line: `python -m mailer.tracking.writer FLUSH_INTERVAL [NICENESS [IDLE]]` (IDLE 1
or 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import signal
import struct
import sys
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Engine

from mailer.engagement import (
    DEFAULT_FLUSH_INTERVAL,
    MAX_PENDING,
    EngagementRecorder,
    Hit,
    RecorderStats,
)

logger = logging.getLogger("mailer.engagement")

SEND_INTERVAL = 0.02  # seconds a hit waits in the worker before it is handed to the writer
SEND_BATCH = 512  # hits that are sent at once, without waiting for the interval
# The most hits in one frame. While the writer is starved its pipe stays full and the worker's
# queue grows (to CROWDED_AT); marshalling it as one frame held the event loop for 20 ms and
# more (about 0.13 µs a hit), and every request waiting meanwhile saw that. A frame of 2,048
# hits takes a third of a millisecond, and the queue goes down the pipe frame by frame, with
# requests answered between them.
FRAME_HITS = 2048
STOP_TIMEOUT = 60.0  # seconds the worker waits at shutdown for its writer to finish
# The writer flushes at its interval (a second), early only once this many hits wait. Nobody
# waits for its transactions, and a bigger one writes fewer database pages a row: the index
# on delivery_id takes its rows at random places, so a transaction of a few thousand rows
# dirties a page for nearly every row, and one of a second's rows shares more of them. (With
# the in-process recorder's 4,000 a flush, two workers' writers cost about 10% more CPU a hit.)
WRITER_BATCH_SIZE = 50_000
WRITER_NICENESS = 19  # how much lower than its worker's the writer's CPU priority is
WRITER_IDLE = True  # whether the writer runs under SCHED_IDLE (Linux), see above
# Hits a writer holds before it stops reading (and so, through the pipe, slows its worker's
# requests down) until it has written them: about 60 MB. PAUSE_AT plus the largest frame
# (FRAME_HITS) stays far below MAX_PENDING, so nothing read is dropped.
PAUSE_AT = 250_000
# A writer under SCHED_IDLE on a saturated machine gets almost no CPU, not even enough to read
# its pipe, so the worker holds the backlog. As frames waiting for the pipe it costs 38 bytes a
# hit, against some 200 as queued tuples: PIPE_BUFFER holds about 880,000 hits, a minute of one
# worker's on a saturated 2-core machine. Only then does the queue grow, and at CROWDED_AT
# (about 10 MB more) requests wait for room.
PIPE_BUFFER = 32 * 1024 * 1024
CROWDED_AT = 50_000  # hits queued in a worker (the pipe full) before requests wait for room
_HEADER = struct.Struct(">I")
_MAX_FRAME = 256 * 1024 * 1024


def _frame(message: tuple[str, Any]) -> bytes:
    data = marshal.dumps(message)
    return _HEADER.pack(len(data)) + data


def _hit_from_wire(wire: tuple[Any, ...]) -> tuple[Any, ...]:
    kind, delivery_id, campaign_id, position, at, ip_masked, user_agent, reason = wire
    when = datetime.fromtimestamp(at, UTC)
    return (kind, delivery_id, campaign_id, position, when, ip_masked, user_agent, reason)


class WriterGone(Exception):
    """The writer process ended before it was asked to."""


class WriterProcessRecorder:
    """EngagementRecorder's interface (record, start, stop, flush, pending, stats), with the
    writing done by a child process. `engine` is used only if that process dies: recording
    then goes on in-process."""

    def __init__(
        self,
        engine: Engine,
        database_url: str,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_pending: int = MAX_PENDING,
        send_interval: float = SEND_INTERVAL,
        send_batch: int = SEND_BATCH,
        niceness: int = WRITER_NICENESS,
        idle: bool = WRITER_IDLE,
        crowded_at: int = CROWDED_AT,
        pipe_buffer: int = PIPE_BUFFER,
    ) -> None:
        if not flush_interval > 0:
            raise ValueError("flush_interval must be positive")
        if not 0 <= niceness <= 19:
            raise ValueError("niceness must be between 0 and 19")
        self.engine = engine
        self.database_url = database_url
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.send_interval = min(send_interval, flush_interval)
        self.send_batch = send_batch
        self.niceness = niceness
        self.idle = idle
        self.crowded_at = min(crowded_at, max_pending)
        self.pipe_buffer = pipe_buffer
        self.stats = RecorderStats()
        self._pending: list[tuple[Any, ...]] = []
        self._sending = 0  # hits taken from _pending by _send() and not yet in the pipe
        self._process: asyncio.subprocess.Process | None = None
        self._sender: asyncio.Task[None] | None = None
        self._answers: asyncio.Task[None] | None = None
        self._due = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._flushes: dict[int, asyncio.Future[int]] = {}
        self._sequence = 0
        self._fallback: EngagementRecorder | None = None
        self._writer_totals: RecorderStats | None = None  # its last line, as it exits
        self._confirmed = 0  # rows the writer's flush answers reported

    @property
    def pending(self) -> int:
        fallback = self._fallback
        queued = len(self._pending) + self._sending
        return queued + (fallback.pending if fallback is not None else 0)

    @property
    def crowded(self) -> bool:
        """True while the writer is so far behind that requests should wait for room()."""
        return not self._room.is_set()

    async def room(self) -> None:
        """Wait until the writer takes what is queued (at once unless crowded)."""
        await self._room.wait()

    @property
    def pid(self) -> int | None:
        """The writer process's id, while it runs."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def record(self, hit: Hit) -> None:
        if self._fallback is not None:
            self._fallback.record(hit)
            self.stats.recorded += 1
            return
        pending = self._pending
        queued = len(pending) + self._sending
        if queued >= self.max_pending:
            self.stats.queue_full += 1
            self.stats.dropped += 1
            return
        # a plain tuple of plain values (which the collector stops tracking), ready for marshal
        kind, delivery, campaign, position, at, ip, agent, reason = hit
        pending.append((kind, delivery, campaign, position, at.timestamp(), ip, agent, reason))
        self.stats.recorded += 1
        if len(pending) == self.send_batch:
            self._due.set()
        elif queued + 1 >= self.crowded_at:
            self._room.clear()

    async def start(self) -> None:
        if self._process is not None or self._fallback is not None:
            return
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailer.tracking.writer",
            str(self.flush_interval),
            str(self.niceness),
            "1" if self.idle else "0",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        if self._process.stdin is not None:  # drain() waits only once this much waits to go
            self._process.stdin.transport.set_write_buffer_limits(high=self.pipe_buffer)
        with contextlib.suppress(WriterGone):  # noticed by the answer reader
            await self._write(_frame(("start", self.database_url)))
        self._stopping.clear()
        self._answers = asyncio.create_task(self._read_answers(), name="engagement-writer-answers")
        self._sender = asyncio.create_task(self._send_loop(), name="engagement-writer-sender")

    async def stop(self) -> None:
        """Hand everything queued to the writer, close its pipe and wait until it has written
        it all and exited."""
        self._stopping.set()
        self._due.set()
        self._room.set()  # nobody waits for a writer that is being stopped
        sender, self._sender = self._sender, None
        if sender is not None:
            await sender
        process = self._process
        if process is not None and self._fallback is None:
            with contextlib.suppress(WriterGone):
                await self._send()
            stdin = process.stdin
            if stdin is not None:
                stdin.close()
                with contextlib.suppress(ConnectionError):
                    await stdin.wait_closed()
            try:
                code = await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                logger.error("the engagement writer did not finish in %.0f s", STOP_TIMEOUT)
                process.kill()
                code = await process.wait()
            if code != 0:
                logger.error("the engagement writer exited with status %s", code)
        answers, self._answers = self._answers, None
        if answers is not None:
            # the writer has exited: its answers end at end of file, its totals among them
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(answers, STOP_TIMEOUT)
        if self._fallback is not None:
            await self._fallback.stop()
        self._account()

    def _account(self) -> None:
        """Fill in stats.written, discarded and dropped from the writer's totals and the
        in-process fallback's: what became of every hit recorded. Of a writer that died, only
        the rows its flush answers reported are known; the rest of what it took is not."""
        parts = [self._writer_totals or RecorderStats(written=self._confirmed)]
        if self._fallback is not None:
            parts.append(self._fallback.stats)
        self.stats.written = sum(part.written for part in parts)
        self.stats.discarded = sum(part.discarded for part in parts)
        # turned away here (a full queue) counts as dropped; the others' drops come on top
        self.stats.dropped = self.stats.queue_full + sum(part.dropped for part in parts)

    async def flush(self) -> int:
        """Hand everything queued to the writer and wait until it is written; returns the rows
        the writer inserted in its flush."""
        if self._fallback is not None:
            return await self._fallback.flush()
        if self._process is None:
            raise RuntimeError("the writer is not started")
        try:
            await self._send()
            self._sequence += 1
            sequence = self._sequence
            answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._flushes[sequence] = answer
            await self._write(_frame(("flush", sequence)))
            return await answer
        except WriterGone:
            return await self._take_over().flush()

    async def _send_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), self.send_interval)
            self._due.clear()
            try:
                await self._send()
            except WriterGone:
                self._take_over()
                return

    async def _send(self) -> None:
        """Hand everything queued to the pipe, FRAME_HITS at a time."""
        if self._fallback is not None:
            return
        async with self._send_lock:  # frames leave in the order their hits came
            batch, self._pending = self._pending, []
            self._sending = len(batch)
            try:
                for start in range(0, len(batch), FRAME_HITS):
                    try:
                        await self._write(_frame(("hits", batch[start : start + FRAME_HITS])))
                    except WriterGone:
                        self._pending[:0] = batch[start:]
                        raise
                    self._sending = max(len(batch) - start - FRAME_HITS, 0)
                    if len(self._pending) + self._sending < self.crowded_at:
                        self._room.set()
            finally:
                self._sending = 0

    async def _write(self, data: bytes) -> None:
        process = self._process
        stdin = process.stdin if process is not None else None
        if stdin is None or stdin.is_closing():
            raise WriterGone
        async with self._write_lock:
            try:
                stdin.write(data)
                # waits once pipe_buffer bytes wait to go: the writer is far behind, and the
                # queue grows here (bounded by max_pending) rather than in the transport buffer
                await stdin.drain()
            except (ConnectionError, RuntimeError) as exc:
                raise WriterGone from exc

    async def _read_answers(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        while line := await process.stdout.readline():
            if line.startswith(b"end "):  # the writer's totals, as it exits
                written, discarded, dropped = (int(part) for part in line.split()[1:])
                self._writer_totals = RecorderStats(
                    written=written, discarded=discarded, dropped=dropped
                )
                continue
            sequence, written = (int(part) for part in line.split())
            self._confirmed += written
            self.stats.written += written  # until the totals come
            answer = self._flushes.pop(sequence, None)
            if answer is not None and not answer.done():
                answer.set_result(written)
        # end of file: the writer has exited
        if not self._stopping.is_set():
            code = await process.wait()
            logger.error(
                "the engagement writer exited unexpectedly (status %s); recording in-process", code
            )
            self._take_over()
        for answer in self._flushes.values():
            if not answer.done():
                answer.set_exception(WriterGone())
        self._flushes.clear()

    def _take_over(self) -> EngagementRecorder:
        """Record in this process from now on, starting with what the writer was not sent."""
        if self._fallback is None:
            fallback = EngagementRecorder(
                self.engine, flush_interval=self.flush_interval, max_pending=self.max_pending
            )
            for wire in self._pending:
                fallback.record(cast(Hit, _hit_from_wire(wire)))
            self._pending = []
            self._room.set()
            self._fallback = fallback
            if not self._stopping.is_set():
                asyncio.get_running_loop().create_task(fallback.start())
        return self._fallback


# -- the writer process ---------------------------------------------------------------------------


async def run_writer(
    flush_interval: float, source: int = 0, answers: int = 1, *, pause_at: int = PAUSE_AT
) -> int:
    """Read frames from the file descriptor `source` until end of file, recording their hits;
    answer flushes on `answers`. Once `pause_at` hits wait, and the last write succeeded, it
    writes them before it reads on. Returns the rows written."""
    from mailer.db import make_engine

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_MAX_FRAME)
    pipe = os.fdopen(source, "rb", buffering=0, closefd=False)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    first = await _read_frame(reader)
    if first is None or first[0] != "start":
        raise RuntimeError("the writer's first frame must name the database")
    engine = make_engine(first[1])
    recorder = EngagementRecorder(
        engine, flush_interval=flush_interval, batch_size=WRITER_BATCH_SIZE
    )
    await recorder.start()
    try:
        while (frame := await _read_frame(reader)) is not None:
            kind, payload = frame
            if kind == "hits":
                record = recorder.record
                for wire in payload:
                    record(cast(Hit, _hit_from_wire(wire)))
                # far behind, and not because the database is down: write before reading on
                while recorder.pending >= pause_at and not recorder.failing:
                    await recorder.flush()
            elif kind == "flush":
                written = await recorder.flush()
                os.write(answers, b"%d %d\n" % (payload, written))
    finally:
        await recorder.stop()
        engine.dispose()
        stats = recorder.stats
        # the worker's account of this run (a worker that died reads nothing any more)
        with contextlib.suppress(OSError):
            os.write(answers, b"end %d %d %d\n" % (stats.written, stats.discarded, stats.dropped))
    return stats.written


async def _read_frame(reader: asyncio.StreamReader) -> tuple[str, Any] | None:
    """The next frame, or None at end of file (the worker has stopped or died)."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    # only the worker that started this process holds the other end of the pipe
    kind, payload = marshal.loads(data)  # noqa: S302
    return str(kind), payload


def lower_priority(niceness: int, idle: bool) -> bool:
    """Lower this process's CPU priority by `niceness` and, if `idle`, move it to SCHED_IDLE
    where the system has it; returns whether it runs under SCHED_IDLE now. There is no way
    back: an unprivileged process may leave SCHED_IDLE only for a niceness it may have."""
    if niceness:
        os.nice(niceness)
    if not idle:
        return False
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:  # not Linux: the niceness is all there is
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:  # a sandbox that forbids it: the niceness still applies
        logger.warning("the engagement writer cannot run under SCHED_IDLE: %s", exc)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """`python -m mailer.tracking.writer [FLUSH_INTERVAL [NICENESS [IDLE]]]`, started by a
    serving worker."""
    args = sys.argv[1:] if argv is None else argv
    flush_interval = float(args[0]) if args else DEFAULT_FLUSH_INTERVAL
    niceness = int(args[1]) if len(args) > 1 else WRITER_NICENESS
    idle = args[2] != "0" if len(args) > 2 else WRITER_IDLE
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(name)s: %(message)s")
    lower_priority(niceness, idle)
    asyncio.run(run_writer(flush_interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
