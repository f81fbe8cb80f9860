"""The campaign pipeline: claim a batch, re-check it, compose, mark, send, record.

The runner depends on three small things only: a DeliveryStore (the database), a Composer (the
message for one delivery) and a Sender (SMTP). It can be read without reading SQL or SMTP code.

Exactly once (invariant 8): a delivery is marked `sending` in the database just before its SMTP
transaction, one wave (a few messages a connection) at a time. A crash therefore leaves at most one
wave `sending`; the next run reports those as `uncertain` and never resends them unless asked.

One transaction a wave: recording a wave's outcomes (with their message events) and marking the
next wave `sending` commit together, and the next wave is composed while the current one is on
the wire. Every commit still leaves at most one wave `sending`, and none before it was composed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mailer.delivery_store import Claimed, DeliveryStore, Outcome
from mailer.errors import MailerError
from mailer.models import CampaignStatus, DeliveryStatus, as_utc, utcnow


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

    async def run(self) -> RunStats:
        started = time.monotonic()
        self.stats.uncertain_found = self.store.sweep_uncertain()
        if self.options.resend_uncertain:
            self.stats.requeued_uncertain = self.store.requeue_uncertain()
        queued, _sending, _due = self.store.remaining()
        self.progress.start(queued)
        try:
            await self._loop()
            if self.stop.is_set():
                self.stats.stopped = True
        finally:
            self.store.release()
            self.progress.finish()
            self.stats.elapsed = time.monotonic() - started
        return self.stats

    async def _loop(self) -> None:
        while not self.stop.is_set():
            status, _reason = self.store.campaign_status()
            if status in (CampaignStatus.PAUSED, CampaignStatus.CANCELLED):
                self.stats.stopped = True
                return
            claimed, excluded = self.store.claim(
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
        queued, sending, due = self.store.remaining()
        if queued == 0:
            if sending == 0:
                self.store.finish()
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

    def _compose(self, wave: Sequence[Claimed]) -> _Wave:
        composed: dict[int, tuple[Claimed, Composed]] = {}
        unbuildable: list[tuple[Claimed, str]] = []
        for item in wave:
            try:
                composed[item.delivery_id] = (item, self.composer.compose(item))
            except MailerError as exc:
                unbuildable.append((item, f"not composed: {exc}"))
        return _Wave(composed, unbuildable)

    def _count_unbuildable(self, wave: _Wave) -> None:
        if wave.unbuildable:
            self.stats.failed += len(wave.unbuildable)
            self.stats.last_error = wave.unbuildable[-1][1]
            self._note_outcomes([False] * len(wave.unbuildable))
            self.progress.advance(0, len(wave.unbuildable), 0)

    async def _send_batch(self, claimed: Sequence[Claimed]) -> None:
        size = self.options.wave_size
        waves = [claimed[start : start + size] for start in range(0, len(claimed), size)]
        if not waves or self.stop.is_set():
            return
        current = self._compose(waves[0])
        attempts = self.store.record_and_mark((), current.unbuildable, list(current.composed))
        self._count_unbuildable(current)
        for index in range(len(waves)):
            ordered = [pair for key, pair in current.composed.items() if key in attempts]
            sending = asyncio.gather(
                *(self.sender.send(m.envelope_from, m.recipient, m.data) for _item, m in ordered)
            )
            following: _Wave | None = None
            try:
                if index + 1 < len(waves):
                    await asyncio.sleep(0)  # the SMTP transactions start before we compose
                    following = self._compose(waves[index + 1])
            finally:
                results = await sending
            outcomes = [
                self._outcome(item, message, result, attempts[item.delivery_id])
                for (item, message), result in zip(ordered, results, strict=True)
            ]
            self._note_outcomes([o.status is not DeliveryStatus.FAILED for o in outcomes])
            pause = self._error_rate_exceeded()
            if following is not None and (pause or self.stop.is_set()):
                following = None  # stop before the next wave is marked: nothing left `sending`
            attempts = self.store.record_and_mark(
                outcomes,
                following.unbuildable if following else (),
                list(following.composed) if following else (),
            )
            self._count_outcomes(outcomes)
            if pause:
                self.stats.paused_reason = pause
                self.store.set_status(CampaignStatus.PAUSED, pause)
                return
            if following is None:
                return
            self._count_unbuildable(following)
            current = following

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
