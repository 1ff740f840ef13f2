"""The ports through which use cases reach the database: a unit of work per
multi-statement write, and the repositories on the pool for single statements.

Implemented by repositories/unit_of_work.py (PostgreSQL). A unit of work is one
transaction: `async with db.unit_of_work() as uow:` ... `await uow.commit()`; leaving the
block without committing rolls everything back.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

from imagegen.repositories.batches import BatchRepository
from imagegen.repositories.credits import CreditLedger
from imagegen.repositories.generations import GenerationRepository
from imagegen.repositories.images import ImageRepository
from imagegen.repositories.usage import UsageRepository
from imagegen.repositories.user_settings import UserSettingsRepository
from imagegen.repositories.webhooks import WebhookOutbox


class UnitOfWork(Protocol):
    """One transaction, and the repositories whose statements run inside it."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    async def commit(self) -> None:
        """Make the unit of work's changes permanent; without it they are rolled back."""
        ...

    @property
    def generations(self) -> GenerationRepository:
        """Jobs and their event logs."""
        ...

    @property
    def images(self) -> ImageRepository:
        """Image rows."""
        ...

    @property
    def credits(self) -> CreditLedger:
        """The credit ledger."""
        ...

    @property
    def usage(self) -> UsageRepository:
        """Usage records."""
        ...

    @property
    def webhooks(self) -> WebhookOutbox:
        """Callbacks to deliver, written with the end of their job."""
        ...

    @property
    def batches(self) -> BatchRepository:
        """Batches of jobs submitted together, counted down as their jobs end."""
        ...


class Database(Protocol):
    """Repositories for single statements, and units of work for everything larger."""

    @property
    def failures(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean the database could not be reached or refused a write."""
        ...

    def unit_of_work(self) -> UnitOfWork:
        """A new unit of work, entered with `async with`."""
        ...

    @property
    def generations(self) -> GenerationRepository:
        """Jobs and their event logs."""
        ...

    @property
    def images(self) -> ImageRepository:
        """Image rows."""
        ...

    @property
    def credits(self) -> CreditLedger:
        """The credit ledger."""
        ...

    @property
    def user_settings(self) -> UserSettingsRepository:
        """Users' stored settings."""
        ...

    @property
    def webhooks(self) -> WebhookOutbox:
        """Callbacks to deliver and their attempts."""
        ...
