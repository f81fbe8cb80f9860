"""The dispatcher's decisions: only 2xx delivers, 410 disables, 429 is honoured, and retries
spread over about three days before a delivery is dead-lettered."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from mailer.webhook_policy import RETRY_SCHEDULE, Verdict, decide, retry_after

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_only_2xx_delivers() -> None:
    assert decide(1, 200, NOW).verdict is Verdict.DELIVERED
    assert decide(1, 204, NOW).verdict is Verdict.DELIVERED
    for status in (301, 302, 400, 404, 500, 503, None):
        assert decide(1, status, NOW).verdict is Verdict.RETRY, status


def test_410_disables_the_endpoint() -> None:
    assert decide(3, 410, NOW).verdict is Verdict.DISABLE


def test_the_schedule_spans_about_three_days_then_dead_letters() -> None:
    rng = random.Random(1)
    total = timedelta(0)
    for attempt in range(1, len(RETRY_SCHEDULE)):
        decision = decide(attempt, 500, NOW, rng=rng)
        assert decision.verdict is Verdict.RETRY
        assert decision.retry_at is not None
        delay = decision.retry_at - NOW
        expected = RETRY_SCHEDULE[attempt]
        assert expected <= delay <= expected * 1.1
        total += delay
    assert timedelta(days=3) <= total <= timedelta(days=3, hours=12)
    assert decide(len(RETRY_SCHEDULE), 500, NOW).verdict is Verdict.DEAD


def test_retry_after_is_honoured_and_capped() -> None:
    decision = decide(1, 429, NOW, "120", rng=random.Random(0))
    assert decision.retry_at is not None and decision.retry_at - NOW >= timedelta(seconds=120)
    http_date = "Wed, 25 Nov 2026 14:00:00 GMT"
    assert retry_after(http_date, NOW) == timedelta(hours=2)
    assert retry_after("999999999", NOW) == timedelta(hours=24)
    assert retry_after("soon", NOW) is None
    assert retry_after(None, NOW) is None
