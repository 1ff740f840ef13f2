"""Retries and the circuit breaker, against the Forge provider's wire-format fake."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from imagegen.domain.errors import ProviderFailed
from imagegen.providers.base import ProviderRequest
from imagegen.providers.forge import ForgeProvider
from imagegen.providers.resilience import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    ResilientProvider,
    RetryPolicy,
)
from tests.fakes.forge_server import ForgeFake, Reply, png_bytes


async def no_progress(percent: int, stage: str, preview: bytes | None) -> None:
    return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def forge() -> AsyncIterator[tuple[ForgeFake, httpx.AsyncClient]]:
    async with ForgeFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        yield fake, http


async def test_503_then_success_is_retried_once(forge) -> None:
    fake, http = forge
    fake.script(Reply(status=503, body=b"{}"))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    provider = ResilientProvider(ForgeProvider(fake.url, "k", http), sleep=sleep)
    reply = await provider.generate(ProviderRequest(prompt="a fox", timeout=10), no_progress)
    assert reply.data == png_bytes()
    assert len(fake.requests) == 2 and len(sleeps) == 1


async def test_429_waits_at_least_retry_after(forge) -> None:
    fake, http = forge
    fake.script(Reply(status=429, body=b"{}", headers={"Retry-After": "2"}))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    provider = ResilientProvider(ForgeProvider(fake.url, "k", http), sleep=sleep)
    await provider.generate(ProviderRequest(prompt="a fox", timeout=10), no_progress)
    assert sleeps and sleeps[0] >= 2
    # A Retry-After beyond the request's deadline is not waited for.
    fake.script(Reply(status=429, body=b"{}", headers={"Retry-After": "60"}))
    with pytest.raises(ProviderFailed):
        await provider.generate(ProviderRequest(prompt="a fox", timeout=5), no_progress)


async def test_ambiguous_timeout_is_not_called_again(forge) -> None:
    fake, http = forge
    fake.default = Reply(image=png_bytes(), delay=3)
    provider = ResilientProvider(ForgeProvider(fake.url, "k", http), retry=RetryPolicy(5, 0.01))
    with pytest.raises(ProviderFailed) as caught:
        await provider.generate(ProviderRequest(prompt="a fox", timeout=0.3), no_progress)
    assert "did not answer" in caught.value.message
    assert len(fake.requests) == 1


async def test_breaker_opens_fails_fast_then_probes(forge) -> None:
    fake, http = forge
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=3, cool_down=30), clock=clock)

    async def sleep(seconds: float) -> None:
        return None

    provider = ResilientProvider(
        ForgeProvider(fake.url, "k", http),
        retry=RetryPolicy(max_attempts=1),
        breaker=breaker,
        sleep=sleep,
    )
    fake.default = Reply(status=500, body=b"{}")
    for _ in range(3):
        with pytest.raises(ProviderFailed):
            await provider.generate(ProviderRequest(prompt="a fox"), no_progress)
    assert breaker.state is BreakerState.OPEN
    sent = len(fake.requests)
    with pytest.raises(ProviderFailed) as fast:
        await provider.generate(ProviderRequest(prompt="a fox"), no_progress)
    assert fast.value.metadata["breaker"] == "open"
    assert len(fake.requests) == sent, "no request while the breaker is open"

    clock.now += 31
    fake.default = Reply(image=png_bytes())
    await provider.generate(ProviderRequest(prompt="a fox"), no_progress)
    assert len(fake.requests) == sent + 1, "one probe went through"
    assert breaker.state is BreakerState.CLOSED


def test_half_open_allows_a_single_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, cool_down=10), clock=clock)
    breaker.record_failure()
    assert not breaker.allow()
    clock.now += 10
    assert breaker.allow()
    assert not breaker.allow(), "a second call waits for the probe's outcome"
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
