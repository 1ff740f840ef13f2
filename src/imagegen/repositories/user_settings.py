"""Per-user generation settings (SQL lives here only)."""

from __future__ import annotations

import asyncpg


class UserSettingsRepository:
    """A user's stored default provider; empty when they chose none."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def default_provider(self, user_id: str) -> str:
        value = await self._pool.fetchval(
            "SELECT default_provider FROM user_settings WHERE user_id = $1", user_id
        )
        return str(value or "")

    async def set_default_provider(self, user_id: str, provider: str) -> str:
        """Store (or clear, with "") the user's default provider; returns it."""
        value = await self._pool.fetchval(
            """
            INSERT INTO user_settings (user_id, default_provider) VALUES ($1, $2)
            ON CONFLICT (user_id) DO UPDATE
               SET default_provider = EXCLUDED.default_provider, updated_at = now()
            RETURNING default_provider
            """,
            user_id,
            provider,
        )
        return str(value)
