"""Token buckets: the global cap and the per-domain cap hold their rate, in bounded memory."""

from __future__ import annotations

import asyncio
import time

import pytest

from mailer.ratelimit import DomainBuckets, RateLimiter, TokenBucket, recipient_domain


class FakeClock:
    """Virtual time: a sleep moves the clock forward by its length, then yields."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_200_messages_at_100_per_second_take_two_seconds() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(200):
        await bucket.acquire()
    assert clock.now - start == pytest.approx(1.99, abs=1e-9)


@pytest.mark.asyncio
async def test_concurrent_tasks_share_one_pace_in_arrival_order() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    start = clock.now
    order: list[int] = []

    async def one(i: int) -> None:
        await bucket.acquire()
        order.append(i)

    await asyncio.gather(*(one(i) for i in range(200)))
    assert clock.now - start == pytest.approx(1.99, abs=1e-9)
    assert order == list(range(200))


@pytest.mark.asyncio
async def test_late_wake_ups_do_not_slow_the_schedule() -> None:
    """A sleep that overshoots is absorbed by the next slot: the pace does not drift."""
    clock = FakeClock()

    async def oversleep(seconds: float) -> None:
        clock.now += seconds + 0.004  # every wake-up 4 ms late

    bucket = TokenBucket(100, clock=clock, sleep=oversleep)
    start = clock.now
    for _ in range(200):
        await bucket.acquire()
    # Late by one oversleep in total, not by 199 of them.
    assert clock.now - start == pytest.approx(1.99 + 0.004, abs=1e-9)


def test_burst_allows_back_to_back_slots_after_idling_then_paces() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, burst=5, clock=clock)
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5
    assert bucket.reserve() == pytest.approx(0.1)
    clock.now += 10  # idle: the burst is back, but no more than that
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5
    assert bucket.reserve() > 0


def test_idle_means_full_again() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, burst=2, clock=clock)
    assert bucket.idle()
    bucket.reserve()
    assert not bucket.idle()
    clock.now += 0.1
    assert bucket.idle()


@pytest.mark.parametrize("rate", [0, -1, float("nan")])
def test_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate)


def test_burst_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1, burst=0)


def test_domains_have_separate_buckets() -> None:
    clock = FakeClock()
    domains = DomainBuckets(1, clock=clock)
    assert domains.reserve("example.org") == 0.0
    assert domains.reserve("example.net") == 0.0
    assert domains.reserve("example.org") == pytest.approx(1.0)
    assert domains.reserve("example.org") == pytest.approx(2.0)
    assert domains.reserve("example.net") == pytest.approx(1.0)


def test_idle_domain_buckets_are_forgotten() -> None:
    clock = FakeClock()
    domains = DomainBuckets(10, clock=clock)
    for i in range(1000):
        domains.reserve(f"d{i}.example")
    assert len(domains) <= 1000
    clock.now += 1  # every bucket refilled
    for i in range(100):
        domains.reserve(f"new{i}.example")
    assert len(domains) <= 100


def test_busy_domains_are_capped_by_max_domains() -> None:
    clock = FakeClock()
    domains = DomainBuckets(0.001, max_domains=100, clock=clock)  # nothing ever refills
    for i in range(10_000):
        domains.reserve(f"d{i}.example")
    assert len(domains) <= 100
    # The most recently used domain is still paced.
    assert domains.reserve("d9999.example") > 0


def test_recipient_domain_is_case_insensitive() -> None:
    assert recipient_domain("Someone@Example.ORG") == "example.org"
    assert recipient_domain("no-at-sign") == "no-at-sign"


@pytest.mark.asyncio
async def test_rate_limiter_applies_both_caps() -> None:
    clock = FakeClock()
    limiter = RateLimiter(100, 10, clock=clock, sleep=clock.sleep)
    start = clock.now
    # 20 messages to one domain: the domain cap (10/s) dominates.
    for i in range(20):
        await limiter.acquire(f"user{i}@example.org")
    assert clock.now - start == pytest.approx(1.9, abs=0.02)

    clock2 = FakeClock()
    limiter = RateLimiter(100, 10, clock=clock2, sleep=clock2.sleep)
    start = clock2.now
    # 200 messages over 100 domains: the global cap (100/s) dominates.
    await asyncio.gather(*(limiter.acquire(f"u@d{i % 100}.example") for i in range(200)))
    assert clock2.now - start == pytest.approx(1.99, abs=0.02)


def test_rate_limiter_without_caps_is_inactive() -> None:
    assert not RateLimiter().active
    assert RateLimiter(rate=5).active
    assert RateLimiter(per_domain_rate=5).active


@pytest.mark.asyncio
async def test_real_clock_holds_the_rate() -> None:
    bucket = TokenBucket(100)
    start = time.monotonic()
    for _ in range(50):
        await bucket.acquire()
    elapsed = time.monotonic() - start
    assert 0.48 <= elapsed < 1.5
