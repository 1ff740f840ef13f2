"""Retries and a circuit breaker around any provider.

Retries (tenacity): only failures the provider marked retryable (a request that never
reached it, 429, 5xx; see providers/http_failures.py), with exponential backoff plus
jitter that waits at least the reply's Retry-After, and only while the next attempt
would still start before the request's deadline. An ambiguous timeout is never
retryable (the call may have run and billed), so it is never retried.

Breaker (ours, see CircuitBreaker for why): it counts only failures that say the
provider is down, overloaded or broken (ProviderUnavailable: 5xx, timeouts, connection
errors, unreadable replies, and a 429 once the retries are exhausted). A refusal caused
by one request (another 4xx, a content-policy refusal) shows the provider working and
counts as a success. After `failure_threshold` consecutive failures it opens and fails
calls at once, without a request; after the cool-down one probe call goes out, and its
outcome closes or re-opens the breaker. The probe is released on every outcome: when
it ends without a verdict (cancelled, not configured, any other exception) the breaker
stays half-open and the next call probes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.stop import stop_after_attempt, stop_before_delay
from tenacity.wait import wait_exponential_jitter

from imagegen.domain.errors import ContentPolicyRefused, ProviderFailed
from imagegen.providers.base import (
    ProgressCallback,
    Provider,
    ProviderCapabilities,
    ProviderImage,
    ProviderRequest,
    ProviderUnavailable,
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


class CircuitOpen(ProviderFailed):
    """IMG_002, retryable: the provider's breaker is open and no request was sent (a
    fallback provider may take the call; this provider is not retried)."""


class Permit:
    """Leave to make one call; settle it once with success, failure or release (the
    first settlement counts, later ones are ignored)."""

    def __init__(self, breaker: CircuitBreaker, *, probe: bool) -> None:
        self._breaker = breaker
        self.probe = probe
        self.settled = False

    def success(self) -> None:
        """The provider answered (with an image, or a refusal of this request)."""
        if not self.settled:
            self.settled = True
            self._breaker._succeeded(self.probe)

    def failure(self) -> None:
        """The provider is down, overloaded or broken."""
        if not self.settled:
            self.settled = True
            self._breaker._failed(self.probe)

    def release(self) -> None:
        """The call ended without a verdict on the provider's health."""
        if not self.settled:
            self.settled = True
            self._breaker._released(self.probe)


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe.

    Our own rather than purgatory, aiobreaker, pybreaker or circuitbreaker: none of them
    lets only one probe out while half-open (all four let every call through, so a
    recovering provider meets the whole queue at once), none takes an injected clock
    (they read time.time, datetime.now or a module-level monotonic), and pybreaker's
    async path needs tornado. A probe's release on cancellation is explicit here
    (Permit), where those treat asyncio.CancelledError as a failure or not at all.
    """

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = BreakerState.CLOSED

    def acquire(self) -> Permit | None:
        """A permit for one call now, or None while open (or while a probe is out)."""
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self._policy.cool_down:
                return None
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self.state is BreakerState.HALF_OPEN:
            if self._probing:
                return None
            self._probing = True
            return Permit(self, probe=True)
        return Permit(self, probe=False)

    def record_failure(self) -> None:
        """Count a failure that no single permit carries (a 429 still answered after
        every retry): it re-opens a half-open breaker whose probe is not out."""
        self._failed(probe=False)

    def seconds_until_probe(self) -> float:
        return max(self._policy.cool_down - (self._clock() - self._opened_at), 0.0)

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probing = False

    def _succeeded(self, probe: bool) -> None:
        if probe:
            self._probing = False
        self._failures = 0
        self.state = BreakerState.CLOSED

    def _failed(self, probe: bool) -> None:
        if probe:
            self._probing = False
        self._failures += 1
        if self.state is BreakerState.CLOSED:
            if self._failures >= self._policy.failure_threshold:
                self._open()
        elif self.state is BreakerState.HALF_OPEN and (probe or not self._probing):
            # A call that started before the breaker opened and fails now does not
            # decide for the probe that is still out.
            self._open()

    def _released(self, probe: bool) -> None:
        if probe:
            self._probing = False


def _worth_retrying(exc: BaseException) -> bool:
    return isinstance(exc, ProviderFailed) and exc.retryable and not isinstance(exc, CircuitOpen)


class ResilientProvider:
    """A provider with retries and a breaker; same id, capabilities and models."""

    def __init__(
        self,
        inner: Provider,
        *,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._inner = inner
        self._retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(BreakerPolicy())
        self._sleep = sleep
        self._backoff = wait_exponential_jitter(
            multiplier=self._retry.base_delay,
            max=self._retry.max_delay,
            jitter=self._retry.base_delay,
        )

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
    def upscalers(self) -> tuple[str, ...]:
        return self._inner.upscalers

    @property
    def configured(self) -> bool:
        return self._inner.configured

    def check(self, request: ProviderRequest) -> None:
        self._inner.check(request)

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        """Call the provider, retrying what may succeed later within the deadline."""
        deadline = time.monotonic() + request.timeout
        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(self._retry.max_attempts) | stop_before_delay(request.timeout),
            wait=self._wait,
            retry=retry_if_exception(_worth_retrying),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            reply: ProviderImage = await retrying(self._attempt, request, deadline, progress)
        except ProviderUnavailable as exc:
            if exc.throttled:
                # Still throttled when the retries (or the deadline) ran out: now it counts.
                self.breaker.record_failure()
            raise
        return reply

    async def _attempt(
        self, request: ProviderRequest, deadline: float, progress: ProgressCallback
    ) -> ProviderImage:
        permit = self.breaker.acquire()
        if permit is None:
            raise CircuitOpen(
                f"the {self.id} provider is failing; calls pause for "
                f"{self.breaker.seconds_until_probe():.0f}s (circuit open)",
                retryable=True,
                metadata={"breaker": "open"},
            )
        try:
            left = deadline - time.monotonic()
            reply = await self._inner.generate(
                dataclasses.replace(request, timeout=max(left, 0.05)), progress
            )
        except ProviderUnavailable as exc:
            if not exc.throttled:
                permit.failure()
            raise
        except (ProviderFailed, ContentPolicyRefused):
            # The provider answered and refused this one request: it is working.
            permit.success()
            raise
        else:
            permit.success()
            return reply
        finally:
            # Cancellation, a 429 (counted in generate once retries end), not configured,
            # or any other exception: the probe is free again, with no verdict.
            permit.release()

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ProviderFailed) and exc.retry_after is not None:
            return max(backoff, exc.retry_after.total_seconds())
        return backoff

    def _log_retry(self, state: RetryCallState) -> None:
        log.info(
            "retrying provider call",
            extra={
                "event": "provider.retry",
                "provider": self.id,
                "attempt": state.attempt_number,
                "delay_s": round(state.upcoming_sleep, 3),
            },
        )
