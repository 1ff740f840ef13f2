"""Retries and the circuit breaker, against the providers' wire-format fakes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from imagegen.domain.errors import ContentPolicyRefused, ProviderFailed, ProviderNotConfigured
from imagegen.providers.base import (
    ProgressCallback,
    ProviderCapabilities,
    ProviderImage,
    ProviderRequest,
    ProviderUnavailable,
)
from imagegen.providers.forge import ForgeProvider
from imagegen.providers.openai import OpenAIProvider
from imagegen.providers.resilience import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    ResilientProvider,
    RetryPolicy,
)
from tests.fakes.forge_server import ForgeFake, Reply, png_bytes
from tests.fakes.openai_server import OpenAIFake, OpenAIReply


async def no_progress(percent: int, stage: str, preview: bytes | None) -> None:
    return None


async def no_sleep(seconds: float) -> None:
    return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fox(timeout: float = 10) -> ProviderRequest:
    return ProviderRequest(prompt="a fox", timeout=timeout)


@pytest.fixture
async def forge() -> AsyncIterator[tuple[ForgeFake, httpx.AsyncClient]]:
    async with ForgeFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        yield fake, http


def resilient_forge(
    fake: ForgeFake, http: httpx.AsyncClient, breaker: CircuitBreaker, attempts: int = 1
) -> ResilientProvider:
    return ResilientProvider(
        ForgeProvider(fake.url, "k", http),
        retry=RetryPolicy(max_attempts=attempts),
        breaker=breaker,
        sleep=no_sleep,
    )


async def open_breaker(provider: ResilientProvider, fake: ForgeFake) -> None:
    """Fail calls with 500 until the breaker opens."""
    fake.default = Reply(status=500)
    while provider.breaker.state is not BreakerState.OPEN:
        with pytest.raises(ProviderFailed):
            await provider.generate(fox(), no_progress)
    fake.default = Reply(image=png_bytes())


# --- retries ------------------------------------------------------------------------------


async def test_503_then_success_is_retried_once(forge) -> None:
    fake, http = forge
    fake.script(Reply(status=503))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    provider = ResilientProvider(ForgeProvider(fake.url, "k", http), sleep=sleep)
    reply = await provider.generate(fox(), no_progress)
    assert reply.data == png_bytes()
    assert len(fake.requests) == 2 and len(sleeps) == 1


async def test_429_waits_at_least_retry_after_within_the_deadline(forge) -> None:
    fake, http = forge
    fake.script(Reply(status=429, headers={"Retry-After": "2"}))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    provider = ResilientProvider(ForgeProvider(fake.url, "k", http), sleep=sleep)
    await provider.generate(fox(timeout=10), no_progress)
    assert sleeps and sleeps[0] >= 2
    # A Retry-After beyond the request's deadline is not waited for.
    fake.script(Reply(status=429, headers={"Retry-After": "60"}))
    with pytest.raises(ProviderFailed) as caught:
        await provider.generate(fox(timeout=5), no_progress)
    assert caught.value.metadata["http_status"] == "429"
    assert len(sleeps) == 1 and len(fake.requests) == 3


async def test_ambiguous_timeout_is_not_called_again(forge) -> None:
    fake, http = forge
    fake.default = Reply.slow(3)
    provider = ResilientProvider(
        ForgeProvider(fake.url, "k", http), retry=RetryPolicy(5, 0.01), sleep=no_sleep
    )
    with pytest.raises(ProviderFailed) as caught:
        await provider.generate(fox(timeout=0.3), no_progress)
    assert "did not answer" in caught.value.message and not caught.value.retryable
    assert len(fake.requests) == 1


async def test_a_connection_dropped_after_sending_is_not_called_again(forge) -> None:
    fake, http = forge
    fake.default = Reply(drop=True)
    provider = ResilientProvider(
        ForgeProvider(fake.url, "k", http), retry=RetryPolicy(5, 0.01), sleep=no_sleep
    )
    with pytest.raises(ProviderFailed) as caught:
        await provider.generate(fox(), no_progress)
    assert "may have run" in caught.value.message
    assert len(fake.requests) == 1


async def test_a_refused_connection_is_retried() -> None:
    async with ForgeFake.start() as fake:
        closed_url = fake.url  # nothing listens there once the fake has stopped
    async with httpx.AsyncClient(trust_env=False) as http:
        attempts: list[float] = []

        async def sleep(seconds: float) -> None:
            attempts.append(seconds)

        provider = ResilientProvider(
            ForgeProvider(closed_url, "k", http), retry=RetryPolicy(3, 0.01), sleep=sleep
        )
        with pytest.raises(ProviderFailed) as caught:
            await provider.generate(fox(), no_progress)
    assert caught.value.retryable and "could not be reached" in caught.value.message
    assert len(attempts) == 2, "three attempts, two waits"


# --- which failures count -----------------------------------------------------------------


async def test_a_burst_of_provider_400s_leaves_the_breaker_closed(forge) -> None:
    fake, http = forge
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=3, cool_down=30), clock=Clock())
    provider = resilient_forge(fake, http, breaker, attempts=3)
    fake.default = Reply.error(400, "prompt is too long for this model")
    for _ in range(10):
        with pytest.raises(ProviderFailed) as caught:
            await provider.generate(fox(), no_progress)
        assert not caught.value.retryable
    assert breaker.state is BreakerState.CLOSED
    assert len(fake.requests) == 10, "every call reached the provider, none was retried"
    fake.default = Reply(image=png_bytes())
    await provider.generate(fox(), no_progress)


async def test_content_policy_refusals_do_not_open_the_breaker() -> None:
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=2, cool_down=30), clock=Clock())
    async with OpenAIFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = ResilientProvider(
            OpenAIProvider(fake.url, "sk", http), breaker=breaker, sleep=no_sleep
        )
        fake.default = OpenAIReply.policy_refusal()
        for _ in range(5):
            with pytest.raises(ContentPolicyRefused):
                await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.CLOSED and len(fake.calls) == 5


async def test_429_counts_only_once_the_retries_are_exhausted(forge) -> None:
    fake, http = forge
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, cool_down=30), clock=Clock())
    provider = resilient_forge(fake, http, breaker, attempts=3)
    fake.script(Reply(status=429), Reply(status=429))
    await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.CLOSED, "two 429s then an image: the provider is fine"

    fake.script(Reply(status=429), Reply(status=429), Reply(status=429))
    with pytest.raises(ProviderFailed):
        await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.OPEN
    assert len(fake.requests) == 6


async def test_5xx_and_timeouts_count(forge) -> None:
    fake, http = forge
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=2, cool_down=30), clock=Clock())
    provider = resilient_forge(fake, http, breaker)
    fake.script(Reply(status=502), Reply.slow(3))
    with pytest.raises(ProviderFailed):
        await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(ProviderFailed):
        await provider.generate(fox(timeout=0.3), no_progress)
    assert breaker.state is BreakerState.OPEN


# --- the breaker's life -------------------------------------------------------------------


async def test_breaker_opens_fails_fast_then_recovers_after_the_cool_down(forge) -> None:
    fake, http = forge
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=3, cool_down=30), clock=clock)
    provider = resilient_forge(fake, http, breaker)
    await open_breaker(provider, fake)
    sent = len(fake.requests)
    assert sent == 3
    with pytest.raises(CircuitOpen) as fast:
        await provider.generate(fox(), no_progress)
    assert fast.value.metadata["breaker"] == "open" and fast.value.retryable
    assert len(fake.requests) == sent, "no request while the breaker is open"

    # A failing probe re-opens it for another cool-down.
    clock.now += 31
    fake.default = Reply(status=503)
    with pytest.raises(ProviderFailed):
        await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.OPEN and len(fake.requests) == sent + 1
    clock.now += 29
    with pytest.raises(CircuitOpen):
        await provider.generate(fox(), no_progress)

    # After it, a probe that succeeds closes it.
    clock.now += 2
    fake.default = Reply(image=png_bytes())
    await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.CLOSED and len(fake.requests) == sent + 2
    await provider.generate(fox(), no_progress)
    assert len(fake.requests) == sent + 3


async def test_cancelling_the_half_open_probe_releases_it(forge) -> None:
    fake, http = forge
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, cool_down=10), clock=clock)
    provider = resilient_forge(fake, http, breaker)
    await open_breaker(provider, fake)
    clock.now += 11
    fake.script(Reply.slow(30))
    probe = asyncio.create_task(provider.generate(fox(timeout=60), no_progress))
    await asyncio.wait_for(fake.requests.wait_for(2), timeout=10)
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):
        await provider.generate(fox(), no_progress)  # one probe at a time
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe

    # The next call goes out as the new probe, and its success closes the breaker.
    await provider.generate(fox(), no_progress)
    assert len(fake.requests) == 3
    assert breaker.state is BreakerState.CLOSED


async def test_a_content_policy_refusal_during_the_probe_releases_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, cool_down=10), clock=clock)
    async with OpenAIFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        provider = ResilientProvider(
            OpenAIProvider(fake.url, "sk", http),
            retry=RetryPolicy(max_attempts=1),
            breaker=breaker,
            sleep=no_sleep,
        )
        fake.script(OpenAIReply(status=500))
        with pytest.raises(ProviderFailed):
            await provider.generate(fox(), no_progress)
        assert breaker.state is BreakerState.OPEN
        clock.now += 11
        fake.script(OpenAIReply.policy_refusal())
        with pytest.raises(ContentPolicyRefused):
            await provider.generate(fox(), no_progress)
        # The provider answered: it works, and the next call goes out.
        assert breaker.state is BreakerState.CLOSED
        await provider.generate(fox(), no_progress)
    assert len(fake.calls) == 3


class Exploding:
    """A provider whose call fails with a bug, or with no credentials, as scripted."""

    id = "exploding"
    display_name = "Exploding"
    models = ("x",)
    upscalers: tuple[str, ...] = ()
    configured = True
    capabilities = ProviderCapabilities()

    def __init__(self) -> None:
        self.raises: list[BaseException] = []
        self.calls = 0

    def check(self, request: ProviderRequest) -> None:
        return None

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        self.calls += 1
        if self.raises:
            raise self.raises.pop(0)
        return ProviderImage(data=png_bytes(), mime_type="image/png")


@pytest.mark.parametrize(
    "error",
    [RuntimeError("a bug"), ProviderNotConfigured("no key"), KeyError("x")],
    ids=lambda e: type(e).__name__,
)
async def test_any_other_outcome_of_the_probe_releases_it(error: BaseException) -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, cool_down=10), clock=clock)
    inner = Exploding()
    provider = ResilientProvider(inner, breaker=breaker, sleep=no_sleep)
    inner.raises = [ProviderUnavailable("down"), error]
    with pytest.raises(ProviderUnavailable):
        await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.OPEN
    clock.now += 11
    with pytest.raises(type(error)):
        await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.HALF_OPEN, "no verdict, but the probe is free"
    await provider.generate(fox(), no_progress)
    assert breaker.state is BreakerState.CLOSED and inner.calls == 3


# --- the breaker alone --------------------------------------------------------------------


def test_half_open_allows_a_single_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, cool_down=10), clock=clock)
    first = breaker.acquire()
    assert first is not None and not first.probe
    first.failure()
    assert breaker.state is BreakerState.OPEN and breaker.acquire() is None
    clock.now += 10
    probe = breaker.acquire()
    assert probe is not None and probe.probe
    assert breaker.acquire() is None, "a second call waits for the probe's outcome"
    probe.failure()
    assert breaker.state is BreakerState.OPEN and breaker.acquire() is None


def test_a_late_failure_of_an_older_call_does_not_decide_for_the_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, cool_down=10), clock=clock)
    older = breaker.acquire()
    opener = breaker.acquire()
    assert older is not None and opener is not None
    opener.failure()
    clock.now += 10
    probe = breaker.acquire()
    assert probe is not None
    older.failure()  # started before the breaker opened
    assert breaker.state is BreakerState.HALF_OPEN and breaker.acquire() is None
    probe.success()
    assert breaker.state is BreakerState.CLOSED


def test_a_permit_is_settled_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=2, cool_down=10), clock=clock)
    permit = breaker.acquire()
    assert permit is not None
    permit.failure()
    permit.failure()
    permit.release()
    assert breaker.state is BreakerState.CLOSED, "one failure, counted once"
