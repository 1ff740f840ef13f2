"""The port the HTTP side serves signed blob URLs through (implemented by the local
blob store, storage/local.py; an S3 deployment has none and S3 serves its own URLs)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class SignedBlobFiles(Protocol):
    """Blobs kept as local files behind HMAC-signed, expiring URLs."""

    def verify(self, key: str, expires: str, signature: str) -> bool:
        """Whether a URL's signature is ours and it has not expired."""
        ...

    def signature_matches(self, key: str, expires: str, signature: str) -> bool:
        """Whether we signed this key and expiry, expired or not."""
        ...

    def file_for_serving(self, key: str) -> Path:
        """The file behind a key; NotFound if absent."""
        ...

    def content_type(self, key: str) -> str:
        """The blob's Content-Type."""
        ...

    def seconds_left(self, expires: str) -> int:
        """Seconds until a URL with this expiry stops working (0 if it has)."""
        ...
