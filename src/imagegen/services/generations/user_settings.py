"""A user's generation settings (their default provider) and the providers they can pick."""

from __future__ import annotations

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import Identity
from imagegen.domain.providers import ProviderInfo
from imagegen.repositories.user_settings import UserSettingsRepository
from imagegen.services.generations.catalogue import ProviderCatalogue


class UserSettingsService:
    """Get and set the caller's default provider; list the providers they can use."""

    def __init__(self, settings: UserSettingsRepository, catalogue: ProviderCatalogue) -> None:
        self._settings = settings
        self._catalogue = catalogue

    async def default_provider(self, identity: Identity) -> str:
        """The caller's stored default provider ("" for the deployment's)."""
        return await self._settings.default_provider(identity.user_id)

    async def set_default_provider(self, identity: Identity, provider: str) -> str:
        """Store the caller's default provider; it must be configured here ("" clears it)."""
        if provider and not self._catalogue.is_configured(provider):
            available = ", ".join(self._catalogue.configured_ids())
            raise InvalidRequest(
                f"provider {provider!r} is not available here; use one of {available}",
                field="default_provider",
            )
        return await self._settings.set_default_provider(identity.user_id, provider)

    async def list_providers(self, identity: Identity) -> list[ProviderInfo]:
        """The configured providers, the caller's default among them marked."""
        stored = await self._settings.default_provider(identity.user_id)
        return self._catalogue.listing(stored or self._catalogue.default_provider)
