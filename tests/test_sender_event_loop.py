"""The sender's event loop keeps running while the database works on a wave's transaction, and
Ctrl-C during one still finishes the wave that transaction handed to SMTP, leaving nothing
uncertain."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from mailer.delivery_store import Claimed, DeliveryStore, Outcome
from mailer.runner import RunOptions
from mailer.service import CampaignService, Mailer, SendOutcome
from mailer.transport import SmtpPool
from tests.smtp_server import CaptureServer
from tests.test_exactly_once import many_contacts

SLOW = 0.05  # seconds a wave's transaction takes longer: a busy database
Hook = Callable[[Sequence[Outcome], Sequence[int]], None]


def slow_wave_transactions(monkeypatch: pytest.MonkeyPatch, before: Hook, after: Hook) -> None:
    """Every `record_and_mark` (one a wave) sleeps SLOW, between `before` and `after`, before it
    does its work and commits."""
    original = DeliveryStore.record_and_mark

    def slow(
        store: DeliveryStore,
        outcomes: Sequence[Outcome],
        unsent: Sequence[tuple[Claimed, str]],
        next_ids: Sequence[int],
    ) -> dict[int, int]:
        before(outcomes, next_ids)
        time.sleep(SLOW)
        after(outcomes, next_ids)
        return original(store, outcomes, unsent, next_ids)

    monkeypatch.setattr(DeliveryStore, "record_and_mark", slow)


async def send(
    mailer: Mailer, path: Path, server: CaptureServer, stop: asyncio.Event | None = None
) -> SendOutcome:
    async with SmtpPool(server.url, size=4, backoff_base=0.01, timeout=5) as pool:
        return await CampaignService(mailer).send(
            path, transport=pool, options=RunOptions(purpose="marketing"), stop=stop
        )


def arrivals(server: CaptureServer) -> Counter[str]:
    return Counter(r for m in server.messages for r in m.recipients)


def test_other_tasks_keep_running_while_a_wave_transaction_is_slow(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emails = many_contacts(mailer, tmp_path, 40)  # waves of 16, 16 and 8
    beats = 0  # a heartbeat task's count, as a progress display or a signal handler would run
    at_start: list[int] = []
    during: list[int] = []  # heartbeats while each wave's transaction was busy

    slow_wave_transactions(
        monkeypatch,
        before=lambda _o, _n: at_start.append(beats),
        after=lambda _o, _n: during.append(beats - at_start[-1]),
    )

    async def main() -> SendOutcome:
        nonlocal beats
        sent = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal beats
            while not sent.is_set():
                beats += 1
                await asyncio.sleep(0.002)

        task = asyncio.create_task(heartbeat())
        try:
            return await send(mailer, campaign_file(), smtp_server)
        finally:
            sent.set()
            await task

    outcome = asyncio.run(main())

    assert outcome.report["sent"] == len(emails)
    assert sorted(arrivals(smtp_server)) == emails
    assert max(arrivals(smtp_server).values()) == 1
    # mark the first wave; record each wave with the next marked; record the last
    assert len(during) == 4
    assert min(during) > 0, f"the loop stood still during a transaction: {during}"


def test_ctrl_c_during_a_wave_transaction_still_sends_the_wave_it_marked(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emails = many_contacts(mailer, tmp_path, 40)  # waves of 16, 16 and 8
    path = campaign_file()
    stop = asyncio.Event()
    pressed: list[bool] = []
    loop: asyncio.AbstractEventLoop | None = None

    def press_ctrl_c(outcomes: Sequence[Outcome], next_ids: Sequence[int]) -> None:
        # the first wave is being recorded and the second marked `sending`, not yet committed
        if outcomes and next_ids and not pressed:
            pressed.append(True)
            assert loop is not None
            loop.call_soon_threadsafe(stop.set)  # what the CLI's SIGINT handler does

    def nothing(_outcomes: Sequence[Outcome], _next_ids: Sequence[int]) -> None:
        pass

    slow_wave_transactions(monkeypatch, before=press_ctrl_c, after=nothing)

    async def main() -> SendOutcome:
        nonlocal loop
        loop = asyncio.get_running_loop()
        return await send(mailer, path, smtp_server, stop)

    first = asyncio.run(main())

    assert pressed and first.stats.stopped
    # the second wave, marked by the interrupted transaction, went out; the third never started
    assert first.stats.sent == first.report["sent"] == 32
    assert first.report["sending"] == first.report["uncertain"] == 0
    assert first.report["queued"] == 8

    monkeypatch.undo()
    second = asyncio.run(send(mailer, path, smtp_server))
    assert second.stats.uncertain_found == 0
    assert second.report["sent"] == len(emails)
    assert sorted(arrivals(smtp_server)) == emails
    assert max(arrivals(smtp_server).values()) == 1
