"""Turning the source images a caller names (URL, data: URL, bytes, library id) into
checked, stored edit sources, before a job exists."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from imagegen import imaging
from imagegen.domain.data_url import decode_data_url
from imagegen.domain.errors import ImageTooLarge, InvalidRequest, NotFound
from imagegen.domain.models import EditSource, FetchedBody, Identity, SourceRef
from imagegen.repositories.images import ImageRepository
from imagegen.storage.base import BlobStore
from imagegen.storage.keys import source_key

MAX_SOURCES = 4


class SourceFetcher(Protocol):
    """Fetches caller-given URLs through the SSRF guard."""

    async def fetch(self, url: str) -> FetchedBody: ...


@dataclass(frozen=True)
class SourceLimits:
    """Byte and pixel bounds for every source image."""

    max_bytes: int
    max_pixels: int


class SourceResolver:
    """Fetches, checks and stores edit sources; library images are used in place."""

    def __init__(
        self,
        blobs: BlobStore,
        images: ImageRepository,
        limits: SourceLimits,
        fetcher: SourceFetcher | None = None,
    ) -> None:
        self._blobs = blobs
        self._images = images
        self._limits = limits
        self._fetcher = fetcher

    async def resolve(
        self, identity: Identity, refs: tuple[SourceRef, ...]
    ) -> tuple[EditSource, ...]:
        """Every source checked and stored; on any refusal nothing stays stored."""
        if len(refs) > MAX_SOURCES:
            raise InvalidRequest(f"at most {MAX_SOURCES} source images", field="sources")
        resolved: list[EditSource] = []
        try:
            for ref in refs:
                resolved.append(await self._resolve_one(identity, ref))
        except BaseException:
            await self.discard(tuple(resolved))
            raise
        return tuple(resolved)

    async def discard(self, sources: tuple[EditSource, ...]) -> None:
        """Remove the blobs this resolver stored (never a library image's)."""
        for source in sources:
            if not source.image_id:
                with contextlib.suppress(Exception):
                    await self._blobs.delete(source.storage_key)

    async def _resolve_one(self, identity: Identity, ref: SourceRef) -> EditSource:
        if ref.kind == "image":
            return await self._library_source(identity, ref.image_id)
        data = await self._bytes_of(ref)
        info = await self._inspect(data)
        digest = hashlib.sha256(data).hexdigest()
        key = source_key(identity.user_id, info.format.extension, datetime.now(UTC))
        await self._blobs.put(key, data, info.mime_type)
        return EditSource(digest, key, info.mime_type, info.width, info.height)

    async def _bytes_of(self, ref: SourceRef) -> bytes:
        if ref.kind == "bytes":
            if len(ref.data) > self._limits.max_bytes:
                raise ImageTooLarge(
                    f"the source image is {len(ref.data)} bytes; the limit is "
                    f"{self._limits.max_bytes}",
                    metadata={"limit": str(self._limits.max_bytes)},
                )
            return ref.data
        if ref.uri.lower().startswith("data:"):
            return decode_data_url(ref.uri, max_bytes=self._limits.max_bytes)
        if self._fetcher is None:
            raise InvalidRequest("source URLs are not enabled on this server", field="sources")
        fetched = await self._fetcher.fetch(ref.uri)
        return fetched.data

    async def _inspect(self, data: bytes) -> imaging.ImageInfo:
        try:
            return await asyncio.to_thread(
                imaging.inspect_image,
                data,
                max_pixels=self._limits.max_pixels,
                max_bytes=self._limits.max_bytes,
            )
        except imaging.ImageDecodeError as exc:
            raise InvalidRequest(
                f"a source is not a PNG, JPEG or WebP image ({exc})", field="sources"
            ) from exc

    async def _library_source(self, identity: Identity, image_id: str) -> EditSource:
        image = await self._images.get(identity.user_id, image_id)
        if image is None or image.deleted:
            raise NotFound(f"image {image_id!r} not found")
        data = await self._blobs.get(image.storage_key)
        return EditSource(
            hashlib.sha256(data).hexdigest(),
            image.storage_key,
            image.mime_type,
            image.width,
            image.height,
            image_id=image.id,
        )
