"""Units of work: one asyncpg connection and one transaction per multi-statement write,
in the style of cosmicpython's unit_of_work.py.

    async with database.unit_of_work() as uow:
        await uow.generations.lock_user(user_id)
        ...
        await uow.commit()

Leaving the block without `commit()` (an exception, or an early return) rolls back.
The repositories a unit of work exposes send their statements on its connection, inside
its transaction; those of `PostgresDatabase` itself go to the pool, one statement each.
"""

from __future__ import annotations

from types import TracebackType

import asyncpg

from imagegen.repositories.batches import BatchRepository
from imagegen.repositories.credits import CreditLedger
from imagegen.repositories.generations import GenerationRepository
from imagegen.repositories.images import ImageRepository
from imagegen.repositories.usage import UsageRepository
from imagegen.repositories.user_settings import UserSettingsRepository
from imagegen.repositories.webhooks import WebhookOutbox


class PostgresUnitOfWork:
    """One transaction on one pooled connection; rolled back unless committed."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: asyncpg.Connection | None = None
        self._transaction: asyncpg.transaction.Transaction | None = None
        self._ended = False

    async def __aenter__(self) -> PostgresUnitOfWork:
        conn = await self._pool.acquire()
        try:
            transaction = conn.transaction()
            await transaction.start()
        except BaseException:
            await self._pool.release(conn)
            raise
        self._conn, self._transaction, self._ended = conn, transaction, False
        self._generations = GenerationRepository(conn)
        self._images = ImageRepository(conn)
        self._credits = CreditLedger(conn)
        self._usage = UsageRepository(conn)
        self._webhooks = WebhookOutbox(conn)
        self._batches = BatchRepository(conn)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        conn, transaction = self._conn, self._transaction
        assert conn is not None and transaction is not None, "the unit of work was not entered"
        self._conn = self._transaction = None
        try:
            if not self._ended:
                await transaction.rollback()
        finally:
            await self._pool.release(conn)

    async def commit(self) -> None:
        """Make every statement of this unit of work permanent (and send its NOTIFYs)."""
        assert self._transaction is not None, "commit() outside `async with`"
        # Marked first: after a failed COMMIT the server has already rolled back.
        self._ended = True
        await self._transaction.commit()

    @property
    def generations(self) -> GenerationRepository:
        """Jobs and their event logs, on this unit of work's connection."""
        return self._generations

    @property
    def images(self) -> ImageRepository:
        """Image rows, on this unit of work's connection."""
        return self._images

    @property
    def credits(self) -> CreditLedger:
        """The credit ledger, on this unit of work's connection."""
        return self._credits

    @property
    def usage(self) -> UsageRepository:
        """Usage records, on this unit of work's connection."""
        return self._usage

    @property
    def webhooks(self) -> WebhookOutbox:
        """The webhook outbox, on this unit of work's connection."""
        return self._webhooks

    @property
    def batches(self) -> BatchRepository:
        """Batches of jobs, on this unit of work's connection."""
        return self._batches


class PostgresDatabase:
    """The generation use cases' way into PostgreSQL: repositories on the pool for single
    statements, and a fresh unit of work for each write of several."""

    #: What asyncpg raises when the database cannot be reached or refuses a statement.
    failures: tuple[type[BaseException], ...] = (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
    )

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._generations = GenerationRepository(pool)
        self._images = ImageRepository(pool)
        self._credits = CreditLedger(pool)
        self._user_settings = UserSettingsRepository(pool)
        self._webhooks = WebhookOutbox(pool)

    def unit_of_work(self) -> PostgresUnitOfWork:
        """A new unit of work; enter it with `async with`."""
        return PostgresUnitOfWork(self._pool)

    @property
    def generations(self) -> GenerationRepository:
        """Jobs and their event logs, on the pool."""
        return self._generations

    @property
    def images(self) -> ImageRepository:
        """Image rows, on the pool."""
        return self._images

    @property
    def credits(self) -> CreditLedger:
        """The credit ledger, on the pool."""
        return self._credits

    @property
    def user_settings(self) -> UserSettingsRepository:
        """Users' stored settings, on the pool."""
        return self._user_settings

    @property
    def webhooks(self) -> WebhookOutbox:
        """The webhook outbox, on the pool."""
        return self._webhooks
