"""What the dispatcher does after each attempt: delivered, try again when, give up, or disable.

The retry schedule spreads about three days (Standard Webhooks' recommendation): immediately,
5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h, each with a little jitter so that a consumer
coming back up is not hit by every retry at the same second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum

RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=0),
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=14),
    timedelta(hours=20),
    timedelta(hours=24),
)
JITTER = 0.1
MAX_RETRY_AFTER = timedelta(hours=24)


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"  # dead-lettered: kept, and replayable
    DISABLE = "disable"  # the consumer said the endpoint is gone (410)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    retry_at: datetime | None = None


def retry_after(value: str | None, now: datetime) -> timedelta | None:
    """A Retry-After header as seconds or an HTTP date, capped; None if absent or unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        delay = timedelta(seconds=int(value))
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        delay = when - now
    return max(timedelta(0), min(delay, MAX_RETRY_AFTER))


def decide(
    attempt: int,
    status: int | None,
    now: datetime,
    retry_after_header: str | None = None,
    rng: random.Random | None = None,
) -> Decision:
    """`attempt` counts from 1 (the attempt just made); `status` is None for a network error
    or timeout. Only 2xx is success; a redirect is a failure (it is never followed)."""
    if status is not None and 200 <= status < 300:
        return Decision(Verdict.DELIVERED)
    if status == 410:
        return Decision(Verdict.DISABLE)
    if attempt >= len(RETRY_SCHEDULE):
        return Decision(Verdict.DEAD)
    delay = RETRY_SCHEDULE[attempt]
    if status == 429 or status == 503:
        asked = retry_after(retry_after_header, now)
        if asked is not None:
            delay = max(delay, asked)
    jitter = (rng or random.Random()).uniform(0, JITTER)  # noqa: S311 (jitter, not secrets)
    return Decision(Verdict.RETRY, now + delay * (1 + jitter))
