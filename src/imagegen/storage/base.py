"""The one interface for blob storage; S3 and the local filesystem implement it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol


@dataclass(frozen=True)
class BlobEntry:
    """One stored blob as a listing shows it."""

    key: str
    size_bytes: int
    #: when it was last written (timezone-aware)
    modified_at: datetime


class BlobStore(Protocol):
    """Stores encoded images by key. Failures raise imagegen.domain.errors.StorageFailed."""

    @property
    def bucket(self) -> str:
        """Where the blobs live, as spans report it: the S3 bucket, or `local`."""
        ...

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write (or overwrite) a blob with its Content-Type and a long Cache-Control."""
        ...

    async def get(self, key: str) -> bytes:
        """Read a blob. Raises NotFound if it does not exist."""
        ...

    async def delete(self, key: str) -> None:
        """Remove a blob; removing a missing blob is not an error."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        """Remove these blobs in as few calls as the store allows (missing ones are not
        an error). Never raises StorageFailed: returns why, by key, for each blob that
        could not be removed (empty when all were)."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether a blob exists."""
        ...

    async def signed_url(self, key: str, ttl: timedelta) -> str:
        """A URL that fetches the blob without credentials until `ttl` has passed."""
        ...

    def list_keys(self, prefix: str) -> AsyncIterator[BlobEntry]:
        """Every blob whose key starts with `prefix`, each once (in no promised order),
        read a page at a time as the caller iterates (the orphan sweep walks a whole store
        this way). Raises StorageFailed when the store cannot be listed."""
        ...
