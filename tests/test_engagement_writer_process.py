"""Opens and clicks written by a writer process beside each serving worker: every hit reaches
the database, when the worker stops, when it is killed, when the writer itself dies, and when
the writer falls behind (requests then wait; nothing is dropped)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailer.engagement import EngagementRecorder, Hit
from mailer.service import Mailer
from mailer.tracking import writer as writer_module
from mailer.tracking.writer import (
    CROWDED_AT,
    FRAME_HITS,
    SEND_INTERVAL,
    WRITER_NICENESS,
    WriterProcessRecorder,
    _frame,
    run_writer,
)
from tests.smtp_server import CaptureServer
from tests.test_tracking_pixel_and_click import (
    HUMAN,
    client_for,
    event_count,
    make_app,
    path_of,
    send_tracked,
    start_serve,
    wait_until_serving,
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
            found += [int(child) for child in fh.read().split()]
    return found


async def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_the_writer_process_writes_every_hit_and_flush_waits_for_it(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = tuple(f"reader{i}@example.org" for i in range(4))
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    paths = [path_of(url) for mail in sent.values() for url in (*mail.opens, *mail.clicks)]

    app = make_app(mailer, writer="process", flush_interval=3600)
    recorder = app.state.recorder
    assert isinstance(recorder, WriterProcessRecorder)
    async with client_for(app, lifespan=True) as http:
        writer = recorder.pid
        assert writer is not None and writer != os.getpid()
        responses = await asyncio.gather(*(http.get(path) for path in paths * 10))
        assert {r.status_code for r in responses} == {200, 302}
        assert await recorder.flush() == len(paths) * 10
        assert event_count(mailer) == len(paths) * 10
        for path in paths:  # queued, never flushed: written by the shutdown
            await http.get(path)
    assert event_count(mailer) == len(paths) * 11
    assert not _alive(writer)
    stats = recorder.stats  # the writer's own totals, reported as it exited
    assert (stats.recorded, stats.written, stats.dropped) == (len(paths) * 11,) * 2 + (0,)
    assert stats.unaccounted == 0
    assert stats.account() == (
        f"opens and clicks: {len(paths) * 11} received, {len(paths) * 11} written, "
        "0 left out (delivery erased or row refused), 0 dropped, 0 unaccounted"
    )


@pytest.mark.asyncio
async def test_recording_goes_on_in_process_when_the_writer_dies(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer, writer="process", flush_interval=3600)
    recorder = app.state.recorder
    async with client_for(app, lifespan=True) as http:
        for _ in range(5):
            await http.get(path_of(sent.opens[0]))
        assert await recorder.flush() == 5
        for _ in range(3):  # handed to the writer, never written: they die with it
            await http.get(path_of(sent.opens[0]))
        await asyncio.sleep(SEND_INTERVAL * 10)
        assert recorder.pending == 0
        writer = recorder.pid
        os.kill(writer, signal.SIGKILL)
        await _wait_for(lambda: recorder.pid is None, "the worker did not notice")
        for _ in range(7):
            response = await http.get(path_of(sent.clicks[0]))
            assert response.status_code == 302
        assert await recorder.flush() == 7  # written by this process now
        assert isinstance(recorder._fallback, EngagementRecorder)
    assert event_count(mailer) == 12
    # the dead writer gave no totals: its flush answer told of 5 rows, the 3 after are missing
    stats = recorder.stats
    assert (stats.recorded, stats.written, stats.dropped, stats.unaccounted) == (15, 12, 0, 3)


@pytest.mark.asyncio
async def test_hits_answered_by_a_worker_killed_with_sigkill_are_still_written(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    server, base = start_serve(env, tmp_path)  # one worker: this process, and its writer
    try:
        async with httpx.AsyncClient(base_url=base, headers={"user-agent": HUMAN}) as http:
            await wait_until_serving(http, server)
            writers = _children(server.pid)
            assert len(writers) == 1  # one worker (this process), one writer
            # recording yields the CPU to the requests (once the writer has started)
            worker = os.getpriority(os.PRIO_PROCESS, server.pid)
            await _wait_for(
                lambda: os.getpriority(os.PRIO_PROCESS, writers[0]) - worker == WRITER_NICENESS,
                "the writer runs at its worker's priority",
            )
            for _ in range(30):
                assert (await http.get(path_of(sent.opens[0]))).status_code == 200
            # a worker hands its hits over every SEND_INTERVAL: only the hits of the last
            # such interval before a SIGKILL die with it
            await asyncio.sleep(SEND_INTERVAL * 10)
    finally:
        server.kill()  # SIGKILL: no graceful shutdown, nothing flushed by the worker
        server.communicate(timeout=30)
    await _wait_for(lambda: event_count(mailer) == 30, "the writer did not write the hits")
    await _wait_for(lambda: not _alive(writers[0]), "the writer outlived its worker")


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is a Linux policy")
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("options", "extra_env", "idle"),
    [
        ((), {}, True),
        (("--no-writer-idle",), {}, False),
        ((), {"MAILER_TRACKING_WRITER_IDLE": "false"}, False),
        (("--writer-idle",), {"MAILER_TRACKING_WRITER_IDLE": "false"}, True),
    ],
    ids=["default", "option-off", "environment-off", "option-over-environment"],
)
async def test_the_writer_runs_only_on_cpu_time_nothing_else_wants(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    env: dict[str, str],
    tmp_path: Path,
    options: tuple[str, ...],
    extra_env: dict[str, str],
    idle: bool,
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    server, base = start_serve({**env, **extra_env}, tmp_path, *options)
    try:
        async with httpx.AsyncClient(base_url=base, headers={"user-agent": HUMAN}) as http:
            await wait_until_serving(http, server)
            (writer,) = _children(server.pid)
            wanted = os.SCHED_IDLE if idle else os.SCHED_OTHER
            await _wait_for(
                lambda: os.sched_getscheduler(writer) == wanted
                and os.getpriority(os.PRIO_PROCESS, writer) > 0,  # lowered, then started
                f"the writer's policy is {os.sched_getscheduler(writer)}, not {wanted}",
            )
            assert os.sched_getscheduler(server.pid) == os.SCHED_OTHER  # requests are not
            for _ in range(3):
                assert (await http.get(path_of(sent.opens[0]))).status_code == 200
            await _wait_for(lambda: event_count(mailer) == 3, "the writer did not write")
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert event_count(mailer) == 3


def test_serve_refuses_a_writer_idle_setting_that_is_not_a_yes_or_no(
    cli: Callable[..., Any],
) -> None:
    result = cli("serve", extra_env={"MAILER_TRACKING_WRITER_IDLE": "sometimes"})
    assert result.exit_code == 2
    assert "MAILER_TRACKING_WRITER_IDLE: expected true or false, got 'sometimes'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_unknown_writer(cli: Callable[..., Any]) -> None:
    result = cli("serve", "--writer", "elsewhere")
    assert result.exit_code == 2
    assert "elsewhere" in result.stderr


@pytest.mark.asyncio
async def test_a_writer_that_falls_behind_slows_requests_down_and_loses_nothing(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer, writer="process", flush_interval=3600)
    recorder = app.state.recorder
    recorder.crowded_at = 50
    recorder.pipe_buffer = 0  # the backlog is kept as queued hits as soon as the pipe is full
    requests: list[asyncio.Task[httpx.Response]] = []
    async with client_for(app, lifespan=True) as http:
        writer = recorder.pid
        os.kill(writer, signal.SIGSTOP)  # a writer that gets no CPU: its pipe fills up
        try:
            # the worker hands what it holds to the pipe at once, until pipe and buffer are full
            for _ in range(50):
                batch = [asyncio.create_task(http.get(path_of(sent.opens[0]))) for _ in range(500)]
                requests += batch
                await asyncio.wait(batch, timeout=2)
                if recorder.crowded:
                    break
            assert recorder.crowded, "the worker never found its writer behind"
            await asyncio.sleep(0.3)
            assert sum(not request.done() for request in requests) > 0  # held back, not dropped
        finally:
            os.kill(writer, signal.SIGCONT)
        responses = await asyncio.gather(*requests)
        assert {response.status_code for response in responses} == {200}
        await recorder.flush()
        assert not recorder.crowded
    assert event_count(mailer) == len(requests)
    assert (recorder.stats.recorded, recorder.stats.dropped) == (len(requests), 0)


@pytest.mark.asyncio
async def test_a_backlog_leaves_in_small_frames_and_a_flush_meanwhile_waits_for_all_of_it(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A starved writer's backlog goes down the pipe a frame at a time (one frame of it all
    held the event loop for tens of milliseconds); a flush() asked for while it goes covers
    every hit recorded before it."""
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    sizes: list[int] = []
    real_frame = writer_module._frame

    def counting_frame(message: tuple[str, Any]) -> bytes:
        if message[0] == "hits":
            sizes.append(len(message[1]))
        return real_frame(message)

    monkeypatch.setattr(writer_module, "_frame", counting_frame)
    app = make_app(mailer, writer="process", flush_interval=3600)
    recorder = app.state.recorder
    recorder.pipe_buffer = 0  # the backlog is kept as queued hits as soon as the pipe is full
    backlog = 4 * FRAME_HITS + 7
    hit = Hit("open", sent.delivery_id, sent.campaign_id, None, datetime.now(UTC), None, "a", None)
    async with client_for(app, lifespan=True):
        writer = recorder.pid
        os.kill(writer, signal.SIGSTOP)  # a writer that gets no CPU: its pipe fills up
        try:
            for _ in range(backlog):
                recorder.record(hit)
            await asyncio.sleep(SEND_INTERVAL * 10)
            assert recorder.pending > FRAME_HITS, "the pipe took the whole backlog"
            flushed = asyncio.create_task(recorder.flush())
            await asyncio.sleep(0.2)
            assert not flushed.done()  # it waits for the writer, which is stopped
        finally:
            os.kill(writer, signal.SIGCONT)
        await asyncio.wait_for(flushed, 60)
        assert event_count(mailer) == backlog
        assert recorder.pending == 0
    assert sum(sizes) == backlog
    assert max(sizes) <= FRAME_HITS
    assert event_count(mailer) == backlog


@pytest.mark.asyncio
async def test_a_starved_writers_backlog_waits_as_frames_without_holding_requests_back(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    """More hits than CROWDED_AT behind a writer that gets no CPU: they wait in the worker as
    frames for the pipe (38 bytes a hit), no request waits for room, and all are written once
    the writer runs again."""
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer, writer="process", flush_interval=3600)
    recorder = app.state.recorder
    backlog = CROWDED_AT + 5 * FRAME_HITS
    hit = Hit("open", sent.delivery_id, sent.campaign_id, None, datetime.now(UTC), None, "a", None)
    async with client_for(app, lifespan=True) as http:
        writer = recorder.pid
        os.kill(writer, signal.SIGSTOP)
        try:
            for _ in range(backlog):
                recorder.record(hit)
            await _wait_for(lambda: recorder.pending == 0, "the backlog stayed queued as hits")
            assert not recorder.crowded
            answered = await asyncio.wait_for(http.get(path_of(sent.opens[0])), 5)
            assert answered.status_code == 200
        finally:
            os.kill(writer, signal.SIGCONT)
        await asyncio.wait_for(recorder.flush(), 120)
    assert event_count(mailer) == backlog + 1


def _hits(count: int) -> list[tuple[Any, ...]]:
    hit = Hit("open", 1, 1, None, datetime.now(UTC), "192.0.2.0", "agent", None)
    return [(*hit[:4], hit.at.timestamp(), *hit[5:])] * count


@pytest.mark.asyncio
async def test_a_writer_whose_database_is_down_keeps_reading_instead_of_pausing(
    tmp_path: Path,
) -> None:
    source, sink = os.pipe()
    answers_read, answers = os.pipe()
    unreachable = f"sqlite:///{tmp_path / 'no-such-folder' / 'mailer.db'}"
    frames = [_frame(("start", unreachable))] + [_frame(("hits", _hits(40))) for _ in range(25)]
    data = b"".join(frames)

    def feed() -> None:
        with os.fdopen(sink, "wb") as pipe:
            pipe.write(data)

    try:
        feeding = asyncio.get_running_loop().run_in_executor(None, feed)
        # paused at 10 hits, it would wait for writes that cannot succeed and never read on
        written = await asyncio.wait_for(run_writer(3600, source, answers, pause_at=10), 60)
        await feeding
    finally:
        for fd in (source, answers_read, answers):
            os.close(fd)
    assert written == 0


def test_serve_refuses_a_writer_niceness_out_of_range(cli: Callable[..., Any]) -> None:
    result = cli("serve", "--writer-niceness", "25")
    assert result.exit_code == 2
    assert "writer-niceness" in result.stderr
    result = cli("serve", extra_env={"MAILER_TRACKING_WRITER_NICENESS": "high"})
    assert result.exit_code == 2
    assert "MAILER_TRACKING_WRITER_NICENESS must be a whole number from 0 to 19" in result.stderr
    assert "Traceback" not in result.stderr
