"""Token buckets for asyncio: a global messages-per-second cap and one per recipient domain.

A bucket hands out send times instead of counting tokens (the "virtual scheduling" form of a
token bucket, as in GCRA): every `acquire` reserves the next free slot, `1 / rate` seconds after
the previous one, and sleeps until it. Reservations are made synchronously, so concurrent tasks
are served in arrival order without a lock, and a late wake-up never makes the schedule drift:
200 acquisitions at 100/s take 1.99 s (plus one sleep's latency), however many tasks share it.

`burst` slots may be taken back to back after an idle spell; the default of 1 means a strict
pace. A cancelled waiter keeps its slot (the rate errs on the slow side, never the fast one).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_MAX_DOMAINS = 10_000
_MIN_SWEEP = 64
_EPSILON = 1e-9  # rounding in slot arithmetic, not a wait


class TokenBucket:
    """At most `rate` acquisitions per second, `burst` of them back to back.

    `clock` and `sleep` are injectable so tests can run on a fake clock.
    """

    __slots__ = ("_clock", "_interval", "_next", "_slack", "_sleep", "burst", "rate")

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be a positive number of messages per second, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self.rate = float(rate)
        self.burst = burst
        self._interval = 1.0 / self.rate
        self._slack = (burst - 1) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._next = -float("inf")

    def reserve(self) -> float:
        """Take the next slot now; return how many seconds to wait before using it."""
        now = self._clock()
        slot = max(self._next, now - self._slack)
        self._next = slot + self._interval
        wait = slot - now
        return wait if wait > _EPSILON else 0.0

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await self._sleep(delay)

    def idle(self, now: float | None = None) -> bool:
        """True when the bucket is full again: forgetting it changes nothing."""
        if now is None:
            now = self._clock()
        return self._next <= now - self._slack


class DomainBuckets:
    """One TokenBucket per key (a recipient domain), in bounded memory.

    Buckets that have refilled are dropped (a fresh bucket behaves the same), so memory follows
    the number of domains mailed in the last `burst / rate` seconds. Beyond `max_domains`, the
    least recently used bucket is dropped even if it is not full, which can let that domain
    burst once: a bound on memory wins over exactness for a domain idle that long.
    """

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        max_domains: int = DEFAULT_MAX_DOMAINS,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if max_domains < 1:
            raise ValueError(f"max_domains must be at least 1, not {max_domains}")
        TokenBucket(rate, burst)  # validates rate and burst once, here
        self.rate = float(rate)
        self.burst = burst
        self.max_domains = max_domains
        self._clock = clock
        self._sleep = sleep
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._sweep_at = _MIN_SWEEP

    def __len__(self) -> int:
        return len(self._buckets)

    def reserve(self, domain: str) -> float:
        bucket = self._buckets.get(domain)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep()
            bucket = TokenBucket(self.rate, self.burst, clock=self._clock, sleep=self._sleep)
            self._buckets[domain] = bucket
        else:
            self._buckets.move_to_end(domain)
        return bucket.reserve()

    async def acquire(self, domain: str) -> None:
        delay = self.reserve(domain)
        if delay > 0:
            await self._sleep(delay)

    def _sweep(self) -> None:
        now = self._clock()
        for key in [key for key, bucket in self._buckets.items() if bucket.idle(now)]:
            del self._buckets[key]
        if len(self._buckets) >= self.max_domains:
            # Evict a quarter at once, so a flood of busy domains costs one sweep per
            # max_domains / 4 new domains, not one per domain.
            keep = self.max_domains * 3 // 4
            while len(self._buckets) > keep:
                self._buckets.popitem(last=False)
        self._sweep_at = min(self.max_domains, max(_MIN_SWEEP, 2 * len(self._buckets)))


class RateLimiter:
    """The global cap and the per-domain cap together; either may be None (no cap).

    The domain slot is taken first, then the global one, so a message waiting for a slow
    domain does not hold a global slot that another domain could have used.
    """

    def __init__(
        self,
        rate: float | None = None,
        per_domain_rate: float | None = None,
        *,
        burst: int = 1,
        domain_burst: int = 1,
        max_domains: int = DEFAULT_MAX_DOMAINS,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.global_bucket = (
            None if rate is None else TokenBucket(rate, burst, clock=clock, sleep=sleep)
        )
        self.domains = (
            None
            if per_domain_rate is None
            else DomainBuckets(
                per_domain_rate,
                domain_burst,
                max_domains=max_domains,
                clock=clock,
                sleep=sleep,
            )
        )

    @property
    def active(self) -> bool:
        return self.global_bucket is not None or self.domains is not None

    async def acquire(self, recipient: str) -> None:
        if self.domains is not None:
            await self.domains.acquire(recipient_domain(recipient))
        if self.global_bucket is not None:
            await self.global_bucket.acquire()


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()
