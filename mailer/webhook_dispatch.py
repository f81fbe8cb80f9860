"""The webhook dispatcher: claim due deliveries, POST the signed bytes, record what happened.

One asyncio loop per process. It keeps up to `batch` deliveries claimed (leased) at a time and
up to `concurrency` requests in flight over one pooled HTTP client (`per_endpoint` of them to
any one endpoint, so one slow consumer cannot take every slot). Results are recorded in small
batches, each in one transaction with its decision (delivered, retry at, dead, disable).

A delivery is marked delivered only after its 2xx answer arrived, and only its recording
transaction ends the claim: a dispatcher killed at any point loses nothing, and what it had in
flight (sent, not yet recorded) is sent again by the next one, with the same webhook-id.
Several dispatchers, on PostgreSQL, share the work through the claim (SKIP LOCKED).

Before it claims, at most once per `poll` interval, the dispatcher announces the opens and
clicks the tracking server recorded (mailer.engagement_announce): they become outbox events
here, off the serving path, and are claimed with the rest. A failure to announce is logged and
tried again next round; the deliveries already in the outbox go out meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx
from sqlalchemy import Engine

from mailer.engagement_announce import announce_engagement
from mailer.leases import make_owner
from mailer.models import utcnow
from mailer.webhook_http import webhook_client
from mailer.webhook_policy import Verdict, decide
from mailer.webhook_store import Attempted, Due, WebhookStore
from mailer.webhooks import signed_headers

logger = logging.getLogger("mailer.webhooks")

RESPONSE_READ_LIMIT = 4096  # bytes of a consumer's answer read (and partly kept) per attempt
MAX_BATCH = 10_000
MAX_CONCURRENCY = 1_000


@dataclass(frozen=True)
class DispatchOptions:
    batch: int = 200  # deliveries claimed (and so at most in flight) at a time
    concurrency: int = 32  # requests in flight
    per_endpoint: int = 16  # requests in flight to one endpoint
    timeout: float = 10.0  # seconds per request (connect, write, read each)
    lease: float = 60.0  # seconds a claim is held without renewal (renewed while working)
    poll: float = 1.0  # seconds between looks at the outbox when nothing is due
    flush: float = 0.05  # seconds between recordings of results
    allow_private: bool = False  # development and tests: loopback/private targets, http


@dataclass
class DispatchStats:
    attempts: int = 0
    delivered: int = 0
    retrying: int = 0  # failed attempts with another one scheduled
    dead: int = 0
    disabled: set[str] = field(default_factory=set)  # endpoint uids disabled by a 410
    released: int = 0  # claims given back unsent when stopping
    announced: int = 0  # opens and clicks that became outbox events
    announce_failures: int = 0  # rounds whose announcing failed (logged; tried again)

    @property
    def failed(self) -> int:
        return self.attempts - self.delivered


class Dispatcher:
    def __init__(
        self,
        engine: Engine,
        options: DispatchOptions,
        *,
        clock: Callable[[], datetime] = utcnow,
        owner: str | None = None,
    ) -> None:
        if not 1 <= options.batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1..{MAX_BATCH}")
        if not 1 <= options.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be 1..{MAX_CONCURRENCY}")
        self.options = options
        self.engine = engine
        self.clock = clock
        self.owner = owner or make_owner()
        self.store = WebhookStore(engine, self.owner, timedelta(seconds=options.lease))
        self.stats = DispatchStats()
        self._stop = asyncio.Event()
        self._claiming_done = asyncio.Event()  # no task will add a result any more
        self._room = asyncio.Event()  # set when recorded results freed room to claim more
        self._outstanding: dict[int, Due] = {}  # claimed and not yet recorded
        self._results: list[Attempted] = []
        self._slots = asyncio.Semaphore(options.concurrency)
        self._per_endpoint: dict[int, asyncio.Semaphore] = {}

    def stop(self) -> None:
        """Stop claiming; requests in flight finish and are recorded, the rest is released."""
        self._stop.set()
        self._room.set()

    async def run(self, *, once: bool = False, handle_signals: bool = False) -> DispatchStats:
        """Deliver until stopped; with `once`, deliver what is due now and return."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        try:
            await asyncio.to_thread(self.store.recover)
            async with webhook_client(
                allow_private=self.options.allow_private,
                timeout=self.options.timeout,
                max_connections=self.options.concurrency,
            ) as client:
                recorder = asyncio.create_task(self._record_loop())
                try:
                    await self._claim_loop(client, once, recorder)
                finally:
                    self._stop.set()
                    self._claiming_done.set()
                    await recorder
            return self.stats
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    async def _claim_loop(
        self, client: httpx.AsyncClient, once: bool, recorder: asyncio.Task[None]
    ) -> None:
        # announced before the cutoff: --once also sends the opens and clicks recorded so far
        await self._announce()
        next_announce = time.monotonic() + self.options.poll
        # --once: only what is due when the run starts (retries it schedules wait for later)
        cutoff = self.clock() if once else None
        tasks: set[asyncio.Task[None]] = set()
        last_recover = time.monotonic()
        try:
            while not self._stop.is_set():
                if recorder.done():
                    # the database went away under the recorder: stop claiming (its error is
                    # raised by run); what was claimed is due again when the leases run out
                    return
                # not before every claim: a busy loop claims many times a second
                if not once and time.monotonic() >= next_announce:
                    await self._announce()
                    next_announce = time.monotonic() + self.options.poll
                room = self.options.batch - len(self._outstanding)
                claimed: list[Due] = []
                # claim in chunks of at least half a batch: fewer, larger claim transactions
                if room >= max(1, self.options.batch // 2) or not self._outstanding:
                    claimed = await asyncio.to_thread(self.store.claim, room, self.clock(), cutoff)
                for due in claimed:
                    self._outstanding[due.delivery_id] = due
                    task = asyncio.create_task(self._attempt(client, due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if not claimed and not self._outstanding:
                    if once:
                        return
                    if time.monotonic() - last_recover > self.options.lease:
                        await asyncio.to_thread(self.store.recover)
                        last_recover = time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.options.poll)
                    continue
                # until recorded results make room (or stop is asked); not asyncio.wait on the
                # tasks, which costs a callback per task in flight on every wake-up
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self.options.poll)
        finally:
            if tasks:
                await asyncio.gather(*tasks)

    async def _announce(self) -> None:
        """Opens and clicks settled by the dispatcher's clock become events. Not fatal: the
        deliveries already queued need not wait for a database hiccup here."""
        try:
            self.stats.announced += await asyncio.to_thread(
                announce_engagement, self.engine, now=self.clock()
            )
        except Exception:
            self.stats.announce_failures += 1
            logger.exception("could not announce opens and clicks; will try again next round")

    async def _attempt(self, client: httpx.AsyncClient, due: Due) -> None:
        limit = self._per_endpoint.setdefault(
            due.endpoint_id, asyncio.Semaphore(self.options.per_endpoint)
        )
        async with limit, self._slots:
            if self._stop.is_set():
                return  # not sent: released when the dispatcher stops
            result = await self._send(client, due)
        # appended after the await: the recorder swaps in a new list while we send
        self._results.append(result)

    async def _send(self, client: httpx.AsyncClient, due: Due) -> Attempted:
        body = due.body()
        headers = signed_headers(due.secrets, due.event_uid, int(time.time()), body)
        attempted_at = self.clock()
        started = time.perf_counter()
        status: int | None = None
        response_text: str | None = None
        error: str | None = None
        retry_after: str | None = None
        if not self.options.allow_private and not due.url.startswith("https://"):
            error = "refused: webhooks are sent over https only"
        else:
            try:
                async with client.stream("POST", due.url, content=body, headers=headers) as reply:
                    status = reply.status_code
                    retry_after = reply.headers.get("retry-after")
                    response_text = await _excerpt(reply)
            except httpx.TimeoutException as exc:
                error = f"timeout ({type(exc).__name__}) after {self.options.timeout:g} s"
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration_ms = round((time.perf_counter() - started) * 1000)
        decision = decide(due.attempts + 1, status, self.clock(), retry_after)
        return Attempted(due, attempted_at, status, response_text, error, duration_ms, decision)

    async def _record_loop(self) -> None:
        last_renew = time.monotonic()
        while True:
            finished = self._claiming_done.is_set()
            await self._flush()
            if finished:
                break
            if time.monotonic() - last_renew > self.options.lease / 3:
                await asyncio.to_thread(self.store.renew, list(self._outstanding), self.clock())
                last_renew = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._claiming_done.wait(), self.options.flush)
        # every task has ended and its result is recorded: what is left was never sent
        unsent = list(self._outstanding)
        if unsent:
            await asyncio.to_thread(self.store.release, unsent)
            self.stats.released += len(unsent)
            self._outstanding.clear()

    async def _flush(self) -> None:
        if not self._results:
            return
        batch, self._results = self._results, []
        await asyncio.to_thread(self.store.record, batch)
        self._room.set()
        for result in batch:
            self._outstanding.pop(result.due.delivery_id, None)
            verdict = result.decision.verdict
            self.stats.attempts += 1
            if verdict is Verdict.DELIVERED:
                self.stats.delivered += 1
            elif verdict is Verdict.RETRY:
                self.stats.retrying += 1
            elif verdict is Verdict.DEAD:
                self.stats.dead += 1
            else:
                self.stats.disabled.add(result.due.endpoint_uid)


async def _excerpt(reply: httpx.Response) -> str:
    """The start of the consumer's answer, for `mailer webhooks deliveries` (never all of it:
    a consumer could answer with anything)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in reply.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= RESPONSE_READ_LIMIT:
            break
    return b"".join(chunks)[:RESPONSE_READ_LIMIT].decode("utf-8", "replace")


def deliver_due(
    engine: Engine,
    options: DispatchOptions,
    *,
    clock: Callable[[], datetime] = utcnow,
    owner: str | None = None,
) -> DispatchStats:
    """Deliver everything due now, then return (`mailer webhooks run --once`)."""
    return asyncio.run(Dispatcher(engine, options, clock=clock, owner=owner).run(once=True))
