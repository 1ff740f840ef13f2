"""A seed goes only where it is honoured: the fallback chain of a job with a seed skips
providers whose capabilities do not say `seed` (submit refuses them as the primary;
tests/integration/test_wire_forms.py)."""

from __future__ import annotations

import httpx

from imagegen.domain.models import GenerationSpec
from imagegen.providers.forge import ForgeProvider
from imagegen.providers.local import LocalProvider
from imagegen.providers.openai import OpenAIProvider
from imagegen.providers.sdwebui import SDWebUIProvider
from imagegen.services.generations.catalogue import ProviderCatalogue


async def test_a_job_with_a_seed_falls_back_only_to_providers_that_take_one() -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        sdwebui = SDWebUIProvider("http://127.0.0.1:9", http)
        local = LocalProvider(step_delay=0)
        catalogue = ProviderCatalogue(
            {
                "sdwebui": sdwebui,
                "forge": ForgeProvider("http://127.0.0.1:9", "k", http),
                "openai": OpenAIProvider("http://127.0.0.1:9", "sk", http),
                "local": local,
            },
            default_provider="sdwebui",
            fallback_providers=("forge", "openai", "local"),
        )
        seeded = GenerationSpec(prompt="a fox", provider="sdwebui", seed=7)
        unseeded = GenerationSpec(prompt="a fox", provider="sdwebui")
        assert [p.id for p in catalogue.call_order(seeded, sdwebui)] == ["sdwebui", "local"]
        assert [p.id for p in catalogue.call_order(unseeded, sdwebui)] == [
            "sdwebui",
            "forge",
            "openai",
            "local",
        ]
