"""Each user's webhook signing secret: read it (made on first use), rotate it, and the
keys that sign a callback now (the current one, and the previous one during a rotation's
grace period, IMAGEGEN_WEBHOOK_SECRET_GRACE)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from imagegen.domain.models import Identity
from imagegen.domain.validation import check_request_id
from imagegen.domain.webhooks import encode_secret, new_secret_key
from imagegen.repositories.webhook_secrets import StoredSecret, WebhookSecretStore


@dataclass(frozen=True)
class WebhookSecretView:
    """A secret as its owner sees it."""

    #: `whsec_` + base64 of the key bytes
    secret: str
    created_at: datetime
    #: until when the previous secret also signs; None outside a rotation's grace period
    previous_expire_time: datetime | None


class WebhookSecrets:
    """Read, rotate and sign with users' webhook secrets."""

    def __init__(
        self,
        store: WebhookSecretStore,
        *,
        grace: timedelta,
        request_id_ttl: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._grace = grace
        self._request_id_ttl = request_id_ttl
        self._clock = clock

    async def get(self, identity: Identity) -> WebhookSecretView:
        """The caller's current secret, made on first use."""
        return self._view(await self._current(identity.user_id))

    async def rotate(self, identity: Identity, request_id: str = "") -> WebhookSecretView:
        """A new secret for the caller; the previous one goes on signing for the grace
        period. A retry with the same request_id returns the same new secret."""
        check_request_id(request_id)
        stored = await self._store.rotate(
            identity.user_id,
            new_secret_key(),
            request_id=request_id,
            grace=self._grace,
            request_id_ttl=self._request_id_ttl,
        )
        return self._view(stored)

    async def signing_keys(self, user_id: str) -> list[bytes]:
        """The keys that sign the user's callbacks now, newest first: the current one,
        and the previous one while the rotation's grace period lasts."""
        newest = await self._store.newest(user_id)
        if not newest:
            # Signed all the same: the owner reads this secret whenever they first ask.
            return [(await self._current(user_id)).key]
        keys = [newest[0].key]
        expires = newest[0].previous_expires_at
        if len(newest) > 1 and expires is not None and self._clock() < expires:
            keys.append(newest[1].key)
        return keys

    async def _current(self, user_id: str) -> StoredSecret:
        newest = await self._store.newest(user_id)
        if newest:
            return newest[0]
        return await self._store.create_first(user_id, new_secret_key())

    def _view(self, stored: StoredSecret) -> WebhookSecretView:
        expires = stored.previous_expires_at
        return WebhookSecretView(
            secret=encode_secret(stored.key),
            created_at=stored.created_at,
            previous_expire_time=expires if expires is not None and self._clock() < expires
            else None,
        )
