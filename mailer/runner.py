"""The campaign pipeline: claim a batch, re-check it, compose, mark, send, record.

The runner depends on three small things only: a DeliveryStore (the database), a Composer (the
message for one delivery) and a Sender (SMTP). It can be read without reading SQL or SMTP code.

Exactly once (invariant 8): a delivery is marked `sending` in the database just before its SMTP
transaction, one wave (a few messages a connection) at a time. A crash therefore leaves at most one
wave `sending`; the next run reports those as `uncertain` and never resends them unless asked.

One transaction a wave: recording a wave's outcomes (with their message events) and marking the
next wave `sending` commit together. Every commit still leaves at most one wave `sending`, and none
before it was composed.

The database calls are synchronous, so they run in the runner's own database thread while the
event loop stays free. The next wave is composed (CPU work without database access) a message at
a time in the loop's idle moments: while a transaction is in the database thread, and the rest
while the current wave is on the wire. Signal handlers and other tasks keep running too. The loop
awaits each database call before it goes on, so the order of commits and SMTP transactions is
exactly the one above.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar

from mailer.delivery_store import Claimed, DeliveryStore, Outcome
from mailer.errors import MailerError
from mailer.models import CampaignStatus, DeliveryStatus, as_utc, utcnow

_P = ParamSpec("_P")
_T = TypeVar("_T")

# While a transaction runs in the database thread, composing pauses this long before each
# message. The thread needs the GIL after every answer from the database, and CPython hands it
# over only when the holder blocks long enough, or after the 5 ms switch interval, which every
# brief release of the GIL while composing (os.urandom for the Message-ID) starts afresh:
# without the pause the transaction did not even begin until the whole wave was composed (about
# 7 ms on PostgreSQL in `bench/send.py --quick`), so nothing overlapped.
_GIL_HANDOVER_PAUSE = 50e-6


@dataclass(frozen=True)
class Composed:
    envelope_from: str
    recipient: str
    data: bytes
    message_id: str


class Composer(Protocol):
    def compose(self, claimed: Claimed) -> Composed:
        """Build the message for one delivery; raises MailerError if it cannot be built."""
        ...


class SendResultLike(Protocol):
    @property
    def status(self) -> str: ...  # sent, temporary, permanent, unknown

    @property
    def code(self) -> int | None: ...

    @property
    def message(self) -> str: ...

    @property
    def hard_bounce(self) -> bool: ...


class Sender(Protocol):
    async def send(self, envelope_from: str, recipient: str, data: bytes) -> SendResultLike: ...


class Progress(Protocol):
    def start(self, total: int) -> None: ...

    def advance(self, sent: int, failed: int, excluded: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, sent: int, failed: int, excluded: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass(frozen=True)
class _Wave:
    composed: dict[int, tuple[Claimed, Composed]]  # delivery id -> what to send, in order
    unbuildable: list[tuple[Claimed, str]]


class _Composing:
    """A wave composed a message at a time, so that composing can fill the moments the loop
    would otherwise wait: for a transaction in the database thread, then for SMTP replies."""

    def __init__(self, composer: Composer, items: Sequence[Claimed]) -> None:
        self._composer = composer
        self._todo = deque(items)
        self._wave = _Wave({}, [])

    def until_done(self, transaction: Future[Any]) -> None:
        """Compose while `transaction` runs in the database thread, pausing before each message
        so that thread can take the GIL; stop as soon as it is done, so SMTP need not wait."""
        while self._todo and not transaction.done():
            time.sleep(_GIL_HANDOVER_PAUSE)
            if not transaction.done():
                self._compose_one()

    def finish(self) -> _Wave:
        while self._todo:
            self._compose_one()
        return self._wave

    def _compose_one(self) -> None:
        item = self._todo.popleft()
        try:
            self._wave.composed[item.delivery_id] = (item, self._composer.compose(item))
        except MailerError as exc:
            self._wave.unbuildable.append((item, f"not composed: {exc}"))


@dataclass(frozen=True)
class RunOptions:
    purpose: str
    min_policy_version: str | None = None
    tags: tuple[str, ...] = ()
    batch_size: int = 500
    wave_size: int = 16
    max_attempts: int = 3
    retry_delay: float = 60.0
    error_threshold: float = 0.2
    error_window: int = 200
    error_min_sample: int = 20
    resend_uncertain: bool = False
    idle_wait_limit: float = 600.0


@dataclass
class RunStats:
    sent: int = 0
    failed: int = 0
    uncertain_found: int = 0
    requeued_uncertain: int = 0
    retried: int = 0
    excluded: Counter[str] = field(default_factory=Counter)
    paused_reason: str | None = None
    stopped: bool = False
    finished: bool = False
    elapsed: float = 0.0
    last_error: str | None = None


class CampaignRunner:
    def __init__(
        self,
        store: DeliveryStore,
        composer: Composer,
        sender: Sender,
        options: RunOptions,
        progress: Progress | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.store = store
        self.composer = composer
        self.sender = sender
        self.options = options
        self.progress = progress or NoProgress()
        self.stop = stop or asyncio.Event()
        self.stats = RunStats()
        self._recent: deque[bool] = deque(maxlen=options.error_window)
        # Every store call runs in this one thread, one at a time and in the order the loop
        # issued them. Even if the run is cancelled while a transaction is still in the thread,
        # the final `release` waits behind it instead of racing it on another connection. (A
        # SQLite file engine pools its connections with check_same_thread off, so a connection
        # opened on the loop's thread, e.g. by `prepare`, may be used here.)
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailer-db")

    def _start_in_db_thread(
        self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> Future[_T]:
        """Start a store call in the database thread now."""
        return self._db_thread.submit(call, *args, **kwargs)

    async def _in_db_thread(
        self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """A store call in the database thread; the event loop runs on until it returns."""
        return await asyncio.wrap_future(self._start_in_db_thread(call, *args, **kwargs))

    async def run(self) -> RunStats:
        try:
            return await self._run()
        finally:
            # nothing is queued after `release`; a call still running (cancelled run) finishes
            self._db_thread.shutdown(wait=False)

    async def _run(self) -> RunStats:
        started = time.monotonic()
        self.stats.uncertain_found = await self._in_db_thread(self.store.sweep_uncertain)
        if self.options.resend_uncertain:
            self.stats.requeued_uncertain = await self._in_db_thread(self.store.requeue_uncertain)
        queued, _sending, _due = await self._in_db_thread(self.store.remaining)
        self.progress.start(queued)
        try:
            await self._loop()
            if self.stop.is_set():
                self.stats.stopped = True
        finally:
            await self._in_db_thread(self.store.release)
            self.progress.finish()
            self.stats.elapsed = time.monotonic() - started
        return self.stats

    async def _loop(self) -> None:
        while not self.stop.is_set():
            status, _reason = await self._in_db_thread(self.store.campaign_status)
            if status in (CampaignStatus.PAUSED, CampaignStatus.CANCELLED):
                self.stats.stopped = True
                return
            claimed, excluded = await self._in_db_thread(
                self.store.claim,
                self.options.batch_size,
                self.options.purpose,
                self.options.min_policy_version,
                self.options.tags,
            )
            if excluded:
                self.stats.excluded.update(excluded)
                self.progress.advance(0, 0, sum(excluded.values()))
            if not claimed:
                if excluded:
                    continue
                if not await self._wait_for_more():
                    return
                continue
            await self._send_batch(claimed)
            if self.stop.is_set() or self.stats.paused_reason:
                return

    async def _wait_for_more(self) -> bool:
        """Nothing claimable now: finish, wait for retries that are due later, or leave the
        rest to the senders that hold it."""
        queued, sending, due = await self._in_db_thread(self.store.remaining)
        if queued == 0:
            if sending == 0:
                await self._in_db_thread(self.store.finish)
                self.stats.finished = True
            return False
        if due is None:
            return False
        wait = (as_utc(due) - utcnow()).total_seconds()
        if wait <= 0:
            # due now but leased by another live sender: theirs to send
            return False
        if wait > self.options.idle_wait_limit:
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self.stop.is_set():
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return not self.stop.is_set()

    def _start_composing(self, waves: deque[Sequence[Claimed]]) -> _Composing | None:
        return _Composing(self.composer, waves.popleft()) if waves else None

    def _count_unbuildable(self, wave: _Wave) -> None:
        if wave.unbuildable:
            self.stats.failed += len(wave.unbuildable)
            self.stats.last_error = wave.unbuildable[-1][1]
            self._note_outcomes([False] * len(wave.unbuildable))
            self.progress.advance(0, len(wave.unbuildable), 0)

    async def _send_batch(self, claimed: Sequence[Claimed]) -> None:
        """Send a claimed batch wave by wave: each transaction records the wave just sent and
        marks the next one `sending`, and only after it has committed does that next wave go
        to SMTP. The wave after it is composed meanwhile, in the loop's idle moments."""
        size = self.options.wave_size
        waves = deque(claimed[start : start + size] for start in range(0, len(claimed), size))
        if not waves or self.stop.is_set():
            return
        current = _Composing(self.composer, waves.popleft()).finish()
        following = self._start_composing(waves)
        attempts = await self._commit((), current, following)
        self._count_unbuildable(current)
        while True:
            outcomes = await self._send_wave(current, attempts, following)
            self._note_outcomes([o.status is not DeliveryStatus.FAILED for o in outcomes])
            pause = self._error_rate_exceeded()
            if pause or self.stop.is_set():
                # the next wave is only composed, not marked: dropping it leaves nothing
                # `sending`, and the claims go back to the queue with `release`
                following = None
            marked = following.finish() if following else None
            after = self._start_composing(waves) if marked else None
            attempts = await self._commit(outcomes, marked, after)
            self._count_outcomes(outcomes)
            if pause:
                self.stats.paused_reason = pause
                await self._in_db_thread(self.store.set_status, CampaignStatus.PAUSED, pause)
                return
            if marked is None:
                return
            # `marked` is `sending` now, committed: it goes to SMTP even if we were asked to
            # stop meanwhile (Ctrl-C finishes what is in flight)
            self._count_unbuildable(marked)
            current, following = marked, after

    async def _commit(
        self, outcomes: Sequence[Outcome], marked: _Wave | None, upcoming: _Composing | None
    ) -> dict[int, int]:
        """Record `outcomes` and mark `marked` `sending` in one transaction in the database
        thread, composing `upcoming` meanwhile. Returns the marked rows' attempt numbers (the
        rows still ours to send)."""
        transaction = self._start_in_db_thread(
            self.store.record_and_mark,
            outcomes,
            marked.unbuildable if marked else (),
            list(marked.composed) if marked else (),
        )
        try:
            if upcoming is not None:
                upcoming.until_done(transaction)
        finally:
            # the transaction's result (or error) is always awaited before anything else
            attempts = await asyncio.wrap_future(transaction)
        return attempts

    async def _send_wave(
        self, wave: _Wave, attempts: dict[int, int], upcoming: _Composing | None
    ) -> list[Outcome]:
        """The wave's SMTP transactions, for the rows its transaction marked `sending`; the
        rest of `upcoming` is composed while they are on the wire."""
        ordered = [pair for key, pair in wave.composed.items() if key in attempts]
        sending = asyncio.gather(
            *(self.sender.send(m.envelope_from, m.recipient, m.data) for _item, m in ordered)
        )
        try:
            if upcoming is not None:
                await asyncio.sleep(0)  # the SMTP transactions start before we compose
                upcoming.finish()
        finally:
            results = await sending
        return [
            self._outcome(item, message, result, attempts[item.delivery_id])
            for (item, message), result in zip(ordered, results, strict=True)
        ]

    def _count_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        sent = sum(1 for o in outcomes if o.status is DeliveryStatus.SENT)
        failed = sum(1 for o in outcomes if o.status is DeliveryStatus.FAILED)
        self.stats.sent += sent
        self.stats.failed += failed
        self.stats.retried += sum(1 for o in outcomes if o.status is DeliveryStatus.QUEUED)
        self.progress.advance(sent, failed, 0)

    def _outcome(
        self, item: Claimed, message: Composed, result: SendResultLike, attempt: int
    ) -> Outcome:
        status = DeliveryStatus.FAILED
        retry_after: float | None = None
        if result.status == "sent":
            status = DeliveryStatus.SENT
        elif result.status == "unknown":
            status = DeliveryStatus.UNCERTAIN
        elif result.status == "temporary" and attempt < self.options.max_attempts:
            status = DeliveryStatus.QUEUED
            retry_after = self.options.retry_delay * (2 ** (attempt - 1))
        if status is not DeliveryStatus.SENT:
            self.stats.last_error = f"{result.code or ''} {result.message}".strip()
        return Outcome(
            delivery_id=item.delivery_id,
            status=status,
            smtp_code=result.code,
            smtp_response=result.message,
            message_id=message.message_id if status is DeliveryStatus.SENT else None,
            hard_bounce=status is DeliveryStatus.FAILED
            and result.status == "permanent"
            and result.hard_bounce,
            retry_after=retry_after,
            recipient=message.recipient,
            contact_id=item.recipient.id,
            permanent=result.status == "permanent",
        )

    def _note_outcomes(self, ok: Sequence[bool]) -> None:
        self._recent.extend(ok)

    def _error_rate_exceeded(self) -> str | None:
        """Why the campaign should pause itself now, or None."""
        sample = len(self._recent)
        if sample < self.options.error_min_sample:
            return None
        errors = sample - sum(self._recent)
        rate = errors / sample
        if rate <= self.options.error_threshold:
            return None
        return (
            f"paused itself: {errors} of the last {sample} messages failed "
            f"({rate:.0%} > {self.options.error_threshold:.0%}); last error: "
            f"{self.stats.last_error}"
        )
