"""The port the HTTP side serves signed blob URLs through (implemented by the local
blob store, storage/local.py; an S3 deployment has none and S3 serves its own URLs)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

#: Unix seconds in ASCII digits; 12 of them reach past the year 33000, far beyond the
#: 7 days ahead that any URL is signed for.
_EXPIRES = re.compile(r"[0-9]{1,12}")
#: A hex HMAC-SHA256, as signed URLs carry it.
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class MalformedSignedUrl(ValueError):
    """A signed URL's `expires` or `signature` is missing or not in the form we write."""


def parse_signed_query(expires: str | None, signature: str | None) -> tuple[int, str]:
    """(expires, signature) of a signed URL's query, parsed strictly: `expires` is 1-12
    ASCII digits and `signature` 64 lowercase hex characters; MalformedSignedUrl
    (saying which) otherwise. Whether the signature is ours is a separate question."""
    if expires is None or signature is None:
        raise MalformedSignedUrl("this link needs both expires and signature; ask for a fresh URL")
    # str.isdigit() is also true for "²" and other non-ASCII digits that int() refuses.
    if not _EXPIRES.fullmatch(expires):
        raise MalformedSignedUrl("this link's expires is not a time in Unix seconds")
    if not _SIGNATURE.fullmatch(signature):
        raise MalformedSignedUrl("this link's signature is not 64 hexadecimal characters")
    return int(expires), signature


class SignedBlobFiles(Protocol):
    """Blobs kept as local files behind HMAC-signed, expiring URLs."""

    def verify(self, key: str, expires: int, signature: str) -> bool:
        """Whether a URL's signature is ours and it has not expired."""
        ...

    def signature_matches(self, key: str, expires: int, signature: str) -> bool:
        """Whether we signed this key and expiry, expired or not."""
        ...

    def file_for_serving(self, key: str) -> Path:
        """The file behind a key; NotFound if absent."""
        ...

    def content_type(self, key: str) -> str:
        """The blob's Content-Type."""
        ...

    def seconds_left(self, expires: int) -> int:
        """Seconds until a URL with this expiry stops working (0 if it has)."""
        ...
