"""The providers of this deployment: which one serves a request, which ones may take
over when it fails, and what ListProviders shows of them."""

from __future__ import annotations

from collections.abc import Mapping

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import GenerationSpec
from imagegen.domain.providers import ProviderInfo
from imagegen.providers.base import Provider, ProviderRequest, SourceImage


class ProviderCatalogue:
    """Providers by id, the deployment's default, and the fallback chain."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        *,
        default_provider: str,
        fallback_providers: tuple[str, ...] = (),
    ) -> None:
        self._providers = providers
        self.default_provider = default_provider
        self._fallback_providers = fallback_providers

    def get(self, provider_id: str) -> Provider | None:
        """The provider with this id, configured or not; None if there is none."""
        return self._providers.get(provider_id)

    def choose(self, provider_id: str) -> Provider:
        """The provider a request names (the deployment's default when it names none);
        IMG_003 naming the ids there are if it is unknown."""
        chosen = provider_id or self.default_provider
        provider = self._providers.get(chosen)
        if provider is None:
            known = ", ".join(sorted(self._providers))
            raise InvalidRequest(
                f"provider {chosen!r} is not available here; use one of {known}",
                field="provider",
            )
        return provider

    def is_configured(self, provider_id: str) -> bool:
        """Whether the provider exists and has what it needs to take a call."""
        provider = self._providers.get(provider_id)
        return provider is not None and provider.configured

    def configured_ids(self) -> list[str]:
        """Ids of the providers that can take a call, sorted."""
        return sorted(p for p, v in self._providers.items() if v.configured)

    def call_order(
        self,
        spec: GenerationSpec,
        primary: Provider,
        *,
        edit: bool | None = None,
        has_mask: bool | None = None,
    ) -> list[Provider]:
        """The primary, then each fallback that is configured and can do this job.
        `edit` and `has_mask` stand in for the spec's sources and mask before they are
        fetched (at submit); by default they are read from the spec."""
        edit = spec.is_edit if edit is None else edit
        has_mask = spec.mask is not None if has_mask is None else has_mask
        order = [primary]
        for provider_id in self._fallback_providers:
            candidate = self._providers.get(provider_id)
            if candidate is None or candidate in order or not candidate.configured:
                continue
            caps = candidate.capabilities
            if edit and not caps.edit:
                continue
            if has_mask and not caps.mask:
                continue
            if spec.outpaint is not None and not caps.outpaint:
                continue
            if spec.upscale is not None and not caps.upscale:
                continue
            if spec.count > caps.max_count or spec.output_format not in caps.formats:
                continue
            try:
                candidate.check(
                    ProviderRequest(
                        prompt=spec.prompt,
                        model=spec.model,
                        sources=(SourceImage(b"", "", 0, 0),) if edit else (),
                        # Only the upscaler's name is checked: a fallback must offer it.
                        upscale=spec.upscale,
                    )
                )
            except InvalidRequest:
                continue
            order.append(candidate)
        return order

    def listing(self, default_provider: str) -> list[ProviderInfo]:
        """Every configured provider, by id; `default_provider` is marked as the default.
        One that is not configured is listed only once it has what it needs."""
        infos = []
        for provider_id, provider in sorted(self._providers.items()):
            if not provider.configured:
                continue
            caps = provider.capabilities
            infos.append(
                ProviderInfo(
                    id=provider_id,
                    display_name=provider.display_name,
                    edit=caps.edit,
                    mask=caps.mask,
                    negative_prompt=caps.negative_prompt,
                    seed=caps.seed,
                    style=caps.style,
                    previews=caps.previews,
                    outpaint=caps.outpaint,
                    upscale=caps.upscale,
                    sizes=tuple(caps.sizes),
                    formats=tuple(caps.formats),
                    max_count=caps.max_count,
                    models=tuple(provider.models),
                    upscalers=tuple(provider.upscalers),
                    default=provider_id == default_provider,
                )
            )
        return infos
