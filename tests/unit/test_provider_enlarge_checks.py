"""What each provider says it can do for outpainting and upscaling, and how check()
refuses what it cannot: IMG_003 naming the capability, or the upscaler it lacks."""

from __future__ import annotations

import httpx
import pytest

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import Size, UpscaleSpec
from imagegen.providers.base import (
    PENDING_OUTPAINT,
    Provider,
    ProviderCapabilities,
    ProviderRequest,
    SourceImage,
    check_enlargement,
)
from imagegen.providers.forge import ForgeProvider
from imagegen.providers.local import LocalProvider
from imagegen.providers.openai import OpenAIProvider
from imagegen.providers.resilience import ResilientProvider
from imagegen.providers.sdwebui import SDWebUIProvider

PLACEHOLDER = SourceImage(b"", "", 0, 0)


def outpaint() -> ProviderRequest:
    return ProviderRequest(prompt="more sky", sources=(PLACEHOLDER,), outpaint=PENDING_OUTPAINT)


def upscale(upscaler: str = "", factor: int = 2) -> ProviderRequest:
    return ProviderRequest(
        prompt="upscale", sources=(PLACEHOLDER,), upscale=UpscaleSpec(factor, upscaler)
    )


def refusal(provider: Provider, request: ProviderRequest) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        provider.check(request)
    assert caught.value.code == "IMG_003"
    return caught.value


def test_a_provider_that_cannot_is_refused_naming_the_capability() -> None:
    caps = ProviderCapabilities()
    for request, capability in ((outpaint(), "outpaint"), (upscale(), "upscale")):
        with pytest.raises(InvalidRequest) as caught:
            check_enlargement("p", caps, (), request)
        assert caught.value.field == "provider"
        assert caught.value.metadata["capability"] == capability
    check_enlargement("p", caps, (), ProviderRequest(prompt="plain"))


def test_an_unknown_upscaler_is_refused_naming_the_offered_ones() -> None:
    caps = ProviderCapabilities(upscale=True)
    check_enlargement("p", caps, ("a", "b"), upscale(""))
    check_enlargement("p", caps, ("a", "b"), upscale("b"))
    with pytest.raises(InvalidRequest) as caught:
        check_enlargement("p", caps, ("a", "b"), upscale("c"))
    assert caught.value.field == "upscale.upscaler"
    assert caught.value.metadata["upscalers"] == "a,b"
    assert "'c'" in caught.value.message and "(a)" in caught.value.message


async def test_forge_can_neither_outpaint_nor_upscale() -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        forge = ForgeProvider("http://127.0.0.1:9", "k", http)
        assert not forge.capabilities.outpaint and not forge.capabilities.upscale
        assert forge.upscalers == ()
        for request, capability in ((outpaint(), "outpaint"), (upscale(), "upscale")):
            assert refusal(forge, request).metadata["capability"] == capability
            # The retrying wrapper says the same.
            wrapped = ResilientProvider(forge)
            assert refusal(wrapped, request).metadata["capability"] == capability
            assert wrapped.upscalers == ()


async def test_every_provider_takes_a_plain_request_as_before() -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        providers: list[Provider] = [
            LocalProvider(step_delay=0),
            ForgeProvider("http://127.0.0.1:9", "k", http),
            OpenAIProvider("http://127.0.0.1:9/v1", "k", http),
            SDWebUIProvider("http://127.0.0.1:9", http),
        ]
        for provider in providers:
            provider.check(ProviderRequest(prompt="a fox", size=Size(512, 512)))
