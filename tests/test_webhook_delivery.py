"""Invariant 9 for webhook consumers: every event arrives at least once, signed, with a stable
id to de-duplicate, even when the consumer was down; only 2xx counts, a 410 disables, a 429's
Retry-After is honoured, redirects are not followed, private targets are refused, dead letters
can be replayed, and a dispatcher killed with SIGKILL loses nothing.

The consumer is a real HTTP server on loopback (tests/webhook_consumer.py); every signature it
receives is checked with the independent `standardwebhooks` implementation. Retries are brought
due by the dispatcher's clock, not by sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from mailer import events, webhook_endpoints
from mailer.events import EventType
from mailer.models import WebhookDelivery, WebhookEndpoint, utcnow
from mailer.service import Mailer
from mailer.webhook_dispatch import DispatchOptions, DispatchStats, deliver_due
from mailer.webhook_store import attempts_of, list_deliveries
from tests.conftest import CliResult
from tests.webhook_consumer import Answer, Consumer, Received, free_port

deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]


class Clock:
    """The dispatcher's idea of now, moved forward by the test to bring retries due."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


OPTIONS = DispatchOptions(allow_private=True, timeout=3.0, flush=0.01, poll=0.05)


def add_endpoint(mailer: Mailer, url: str, types: tuple[str, ...] = ("*",)) -> tuple[str, str]:
    view, secret = webhook_endpoints.add(mailer.engine, url, types, allow_private=True)
    return view.uid, secret


def emit_withdrawals(mailer: Mailer, count: int, start: int = 0) -> list[str]:
    with mailer.session() as session:
        return [
            events.emit(
                session,
                EventType.CONSENT_WITHDRAWN,
                {"contact_id": i, "email": f"p{i}@example.org", "purpose": "marketing"},
                contact_id=i,
            )
            for i in range(start, start + count)
        ]


def deliver(mailer: Mailer, clock: Clock, **options: object) -> DispatchStats:
    merged = {**OPTIONS.__dict__, **options}
    return deliver_due(mailer.engine, DispatchOptions(**merged), clock=clock)  # type: ignore[arg-type]


def statuses(mailer: Mailer) -> Counter[str]:
    with mailer.engine.connect() as conn:
        return Counter(row[0] for row in conn.execute(select(deliveries.c.status)))


def test_down_then_500_then_200_delivers_every_event_exactly_once_by_id(mailer: Mailer) -> None:
    consumer = Consumer()  # not started: the consumer is down
    _uid, secret = add_endpoint(mailer, consumer.url)
    emitted = emit_withdrawals(mailer, 6)
    clock = Clock()

    down = deliver(mailer, clock)
    assert (down.delivered, down.retrying) == (0, 6)
    assert all("ConnectError" in (d.last_error or "") for d in list_deliveries(mailer.engine))

    with consumer:
        consumer.answer = lambda _r: Answer(500, body=b"database on fire")
        clock.advance(minutes=1)  # past the 5 s retry, before the 5 min one
        failing = deliver(mailer, clock)
        assert (failing.delivered, failing.retrying) == (0, 6)
        assert {d.last_status_code for d in list_deliveries(mailer.engine)} == {500}

        consumer.answer = lambda _r: Answer(200, body=b"ok")
        clock.advance(minutes=1)  # the third attempt is not due yet: nothing is sent
        assert deliver(mailer, clock).attempts == 0
        clock.advance(minutes=5)
        assert deliver(mailer, clock).delivered == 6
        clock.advance(days=4)
        assert deliver(mailer, clock).attempts == 0  # delivered means done

    assert consumer.accepted() == Counter({uid: 1 for uid in emitted})
    # every request, failed or not, carried the same id and the same signed bytes per event
    bodies: dict[str, set[bytes]] = {}
    for request in consumer.requests():
        bodies.setdefault(request.id, set()).add(request.body)
    assert all(len(b) == 1 for b in bodies.values())
    payloads = consumer.verified(secret)
    assert len(payloads) == 12
    assert {p["type"] for p in payloads} == {"consent.withdrawn"}
    assert sorted({p["data"]["email"] for p in payloads}) == sorted(
        f"p{i}@example.org" for i in range(6)
    )
    assert statuses(mailer) == Counter({"delivered": 6})
    first = list_deliveries(mailer.engine)[0]
    tries = attempts_of(mailer.engine, first.id)
    assert [t.status_code for t in tries] == [None, 500, 200]
    assert "ConnectError" in (tries[0].error or "")
    assert tries[1].response == "database on fire"


def test_only_subscribed_events_are_sent(mailer: Mailer) -> None:
    with Consumer() as consumer:
        add_endpoint(mailer, consumer.url, ("contact.unsubscribed",))
        emit_withdrawals(mailer, 2)
        with mailer.session() as session:
            wanted = events.emit(session, EventType.CONTACT_UNSUBSCRIBED, {"contact_id": 7})
        deliver(mailer, Clock())
    assert consumer.accepted() == Counter({wanted: 1})


def test_410_disables_the_endpoint_and_cancels_what_waits(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    with Consumer() as consumer:
        consumer.answer = lambda _r: Answer(410)
        uid, _secret = add_endpoint(mailer, consumer.url)
        emit_withdrawals(mailer, 5)
        stats = deliver(mailer, Clock(), per_endpoint=1, concurrency=1)
        assert stats.disabled == {uid}
        assert 1 <= len(consumer.requests()) <= 5
        assert statuses(mailer) == Counter({"cancelled": 5})

        later = emit_withdrawals(mailer, 2, start=10)
        clock = Clock()
        clock.advance(days=1)
        sent_before = len(consumer.requests())
        assert deliver(mailer, clock).attempts == 0
        assert len(consumer.requests()) == sent_before
    assert later  # emitted, but not queued for a disabled endpoint
    assert statuses(mailer) == Counter({"cancelled": 5})
    (shown,) = json.loads(cli("webhooks", "list", "--json").stdout)
    assert shown["enabled"] is False
    assert "410 Gone" in shown["disabled_reason"]


def test_429_retry_after_is_honoured(mailer: Mailer) -> None:
    with Consumer() as consumer:
        answers = iter([Answer(429, {"Retry-After": "600"}), Answer(204)])
        consumer.answer = lambda _r: next(answers)
        add_endpoint(mailer, consumer.url)
        (uid,) = emit_withdrawals(mailer, 1)
        clock = Clock()
        assert deliver(mailer, clock).retrying == 1
        (delivery,) = list_deliveries(mailer.engine)
        assert delivery.next_attempt_at is not None
        assert delivery.next_attempt_at - clock.now >= timedelta(seconds=600)

        clock.advance(minutes=6)  # the schedule alone would retry after 5 s
        assert deliver(mailer, clock).attempts == 0
        clock.advance(minutes=6)
        assert deliver(mailer, clock).delivered == 1
    assert [r.status for r in consumer.requests()] == [429, 204]
    assert consumer.accepted() == Counter({uid: 1})


def test_a_redirect_is_a_failure_and_is_not_followed(mailer: Mailer) -> None:
    with Consumer() as consumer:

        def redirect(request: Received) -> Answer:
            if request.path == "/hook":
                return Answer(302, {"Location": f"http://127.0.0.1:{consumer.port}/elsewhere"})
            return Answer(200)

        consumer.answer = redirect
        add_endpoint(mailer, consumer.url)
        emit_withdrawals(mailer, 1)
        stats = deliver(mailer, Clock())
    assert (stats.delivered, stats.retrying) == (0, 1)
    assert [r.path for r in consumer.requests()] == ["/hook"]
    (delivery,) = list_deliveries(mailer.engine)
    assert (delivery.status, delivery.last_status_code) == ("pending", 302)


@pytest.mark.parametrize(
    "host",
    ["localhost", "127.0.0.1", "[::1]", "169.254.169.254", "metadata.google.internal"],
)
def test_private_and_metadata_targets_are_refused_at_connect_time(
    mailer: Mailer, host: str
) -> None:
    with Consumer() as consumer:
        # stored while development allowed it; the dispatcher runs without the permission
        add_endpoint(mailer, f"https://{host}:{consumer.port}/hook")
        emit_withdrawals(mailer, 1)
        stats = deliver(mailer, Clock(), allow_private=False, timeout=1.0)
    assert consumer.requests() == []
    assert stats.retrying == 1
    (delivery,) = list_deliveries(mailer.engine)
    assert "refused" in (delivery.last_error or "")


def test_plain_http_is_refused_without_the_development_permission(mailer: Mailer) -> None:
    with Consumer() as consumer:
        add_endpoint(mailer, consumer.url)
        emit_withdrawals(mailer, 1)
        deliver(mailer, Clock(), allow_private=False)
    assert consumer.requests() == []
    (delivery,) = list_deliveries(mailer.engine)
    assert "https only" in (delivery.last_error or "")


def test_dead_letter_after_about_three_days_then_replayed_with_the_same_id(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    with Consumer() as consumer:
        consumer.answer = lambda _r: Answer(503)
        add_endpoint(mailer, consumer.url)
        (uid,) = emit_withdrawals(mailer, 1)
        clock = Clock()
        start = clock.now
        for _ in range(9):
            assert deliver(mailer, clock).retrying == 1
            (delivery,) = list_deliveries(mailer.engine)
            assert delivery.next_attempt_at is not None
            clock.now = delivery.next_attempt_at + timedelta(seconds=1)
        assert deliver(mailer, clock).dead == 1
        assert timedelta(days=3) <= clock.now - start <= timedelta(days=3, hours=12)
        assert len(consumer.requests()) == 10
        assert statuses(mailer) == Counter({"dead": 1})
        shown = cli("webhooks", "deliveries", "--status", "dead", "--json")
        assert '"attempts": 10' in shown.stdout

        consumer.answer = lambda _r: Answer(200)
        replayed = cli("webhooks", "replay", "--dead")
        assert replayed.exit_code == 0, replayed.stderr
        assert "Queued 1 dead-lettered" in replayed.stdout
        assert deliver(mailer, clock).delivered == 1
    assert [r.id for r in consumer.requests()] == [uid] * 11
    assert consumer.accepted() == Counter({uid: 1})


def test_replay_a_time_range_includes_events_from_before_the_endpoint(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    (before,) = emit_withdrawals(mailer, 1)  # no endpoint yet: nobody to deliver to
    with Consumer() as consumer:
        add_endpoint(mailer, consumer.url)
        (after,) = emit_withdrawals(mailer, 1, start=1)
        deliver(mailer, Clock())
        assert consumer.accepted() == Counter({after: 1})

        outside = cli("webhooks", "replay", "--since", "3h", "--until", "2h")
        assert "Queued 0 deliveries" in outside.stdout
        result = cli("webhooks", "replay", "--since", "1h", "--event-type", "consent.withdrawn")
        assert result.exit_code == 0, result.stderr
        assert "Queued 2 deliveries" in result.stdout
        clock = Clock()
        clock.advance(seconds=1)
        assert deliver(mailer, clock).delivered == 2
    # replays carry the original ids: a consumer that de-duplicates sees each event once
    assert consumer.accepted() == Counter({before: 1, after: 2})


def test_replay_needs_dead_or_since(cli: Callable[..., CliResult], mailer: Mailer) -> None:
    result = cli("webhooks", "replay")
    assert result.exit_code == 2
    assert "either --dead or --since" in result.stderr
    result = cli("webhooks", "replay", "--since", "yesterday-ish")
    assert result.exit_code == 2
    assert "--since 'yesterday-ish'" in result.stderr


def test_a_real_consent_withdrawal_reaches_the_consumer(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    with Consumer() as consumer:
        added = cli(
            "webhooks", "add", consumer.url, "--events", "consent.withdrawn",
            extra_env={"MAILER_WEBHOOK_ALLOW_PRIVATE": "true"},
        )  # fmt: skip
        assert added.exit_code == 0, added.stderr
        secret = next(
            line.split()[-1] for line in added.stdout.splitlines() if line.startswith("secret:")
        )
        withdrawn = cli(
            "consent", "withdraw", "ann@example.org", "--purpose", "marketing", "--source", "phone"
        )
        assert withdrawn.exit_code == 0, withdrawn.stderr
        run = cli("webhooks", "run", "--once", extra_env={"MAILER_WEBHOOK_ALLOW_PRIVATE": "true"})
        assert run.exit_code == 0, run.stderr
        assert "1 delivered" in run.stdout
    (event,) = consumer.verified(secret)
    assert event["type"] == "consent.withdrawn"
    assert event["data"]["email"] == "ann@example.org"
    assert event["data"]["purpose"] == "marketing"
    assert isinstance(event["data"]["contact_id"], int)


def test_run_once_exits_1_when_an_attempt_failed(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens
    add_endpoint(mailer, url)
    emit_withdrawals(mailer, 1)
    result = cli("webhooks", "run", "--once", extra_env={"MAILER_WEBHOOK_ALLOW_PRIVATE": "true"})
    assert result.exit_code == 1
    assert "0 delivered, 1 to retry later" in result.stdout


def dispatcher_process(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailer", "webhooks", "run", *args],
        env={**os.environ, **env, "MAILER_WEBHOOK_ALLOW_PRIVATE": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def delivered_ids(mailer: Mailer) -> set[str]:
    return {d.event_uid for d in list_deliveries(mailer.engine, status="delivered", limit=10_000)}


def test_a_dispatcher_killed_mid_batch_loses_nothing(mailer: Mailer, env: dict[str, str]) -> None:
    with Consumer() as consumer:
        consumer.answer = lambda _r: Answer(200, delay=0.1)
        add_endpoint(mailer, consumer.url)
        emitted = emit_withdrawals(mailer, 80)
        process = dispatcher_process(env, "--batch", "20", "--concurrency", "4")
        try:
            deadline = time.monotonic() + 30
            while len(consumer.requests()) < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert process.poll() is None, process.communicate()
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.communicate()
        received_before = Counter(r.id for r in consumer.requests())
        recorded = delivered_ids(mailer)
        assert recorded <= set(received_before)
        assert len(received_before) < 80  # it really was killed mid-way

        # a restart on the same machine sees the dead owner and takes its claims at once
        rerun = dispatcher_process(env, "--once", "--batch", "20", "--concurrency", "4")
        _out, err = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, err.decode()

    received = Counter(r.id for r in consumer.requests())
    assert set(received) == set(emitted)  # every event at least once
    duplicates = {uid for uid, count in received.items() if count > 1}
    in_flight = set(received_before) - recorded  # sent, answer not yet recorded at the kill
    assert duplicates <= in_flight
    assert all(count <= 2 for count in received.values())
    assert statuses(mailer) == Counter({"delivered": 80})
