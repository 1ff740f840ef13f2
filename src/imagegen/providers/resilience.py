"""Retries and a circuit breaker around any provider.

Retries: only failures the provider marked retryable (connect errors, 429, 5xx),
with jittered exponential backoff that honours Retry-After, and only within the
request's deadline. An ambiguous timeout is never retryable (the call may have run
and billed), so it is never retried. The breaker opens after repeated failures and
then fails calls at once, without a request; after the cool-down one probe call goes
through, and its outcome closes or re-opens the breaker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from imagegen.domain.errors import ProviderFailed
from imagegen.providers.base import (
    ProgressCallback,
    Provider,
    ProviderCapabilities,
    ProviderImage,
    ProviderRequest,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient provider failures."""

    max_attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 10.0


@dataclass(frozen=True)
class BreakerPolicy:
    """When the breaker opens and how long it stays open."""

    failure_threshold: int = 5
    cool_down: float = 30.0


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = BreakerState.CLOSED

    def allow(self) -> bool:
        """Whether a call may go out now (claims the probe when half-open)."""
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self._policy.cool_down:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self.state is BreakerState.HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        self.state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self._policy.failure_threshold:
            self.state = BreakerState.OPEN
            self._opened_at = self._clock()

    def seconds_until_probe(self) -> float:
        return max(self._policy.cool_down - (self._clock() - self._opened_at), 0.0)


class ResilientProvider:
    """A provider with retries and a breaker; same id, capabilities and models."""

    def __init__(
        self,
        inner: Provider,
        *,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._inner = inner
        self._retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(BreakerPolicy())
        self._sleep = sleep
        self._jitter = jitter

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def display_name(self) -> str:
        return self._inner.display_name

    @property
    def capabilities(self) -> ProviderCapabilities:
        return self._inner.capabilities

    @property
    def models(self) -> tuple[str, ...]:
        return self._inner.models

    @property
    def configured(self) -> bool:
        return self._inner.configured

    def check(self, request: ProviderRequest) -> None:
        self._inner.check(request)

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        """Call the provider, retrying what may succeed later within the deadline."""
        deadline = time.monotonic() + request.timeout
        attempt = 0
        while True:
            attempt += 1
            if not self.breaker.allow():
                raise ProviderFailed(
                    f"the {self.id} provider is failing; calls pause for "
                    f"{self.breaker.seconds_until_probe():.0f}s (circuit open)",
                    retryable=True,
                    metadata={"breaker": "open"},
                )
            left = deadline - time.monotonic()
            try:
                reply = await self._inner.generate(
                    dataclasses.replace(request, timeout=max(left, 0.05)), progress
                )
            except ProviderFailed as exc:
                self.breaker.record_failure()
                delay = self._delay(attempt, exc)
                if (
                    not exc.retryable
                    or attempt >= self._retry.max_attempts
                    or time.monotonic() + delay >= deadline
                ):
                    raise
                log.info(
                    "retrying provider call",
                    extra={
                        "event": "provider.retry",
                        "provider": self.id,
                        "attempt": attempt,
                        "delay_s": round(delay, 3),
                    },
                )
                await self._sleep(delay)
                continue
            self.breaker.record_success()
            return reply

    def _delay(self, attempt: int, exc: ProviderFailed) -> float:
        backoff = min(self._retry.max_delay, self._retry.base_delay * 2.0 ** (attempt - 1))
        jittered: float = backoff * (0.5 + self._jitter() / 2)
        if exc.retry_after is not None:
            return max(jittered, exc.retry_after.total_seconds())
        return jittered
