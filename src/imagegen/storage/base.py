"""The one interface for blob storage; S3 and the local filesystem implement it."""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol


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

    async def exists(self, key: str) -> bool:
        """Whether a blob exists."""
        ...

    async def signed_url(self, key: str, ttl: timedelta) -> str:
        """A URL that fetches the blob without credentials until `ttl` has passed."""
        ...
