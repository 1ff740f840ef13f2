"""The image library use cases: get, list, update, delete/restore/purge, fresh URLs,
downloads in another format, and edit lineage. Every call is scoped to its owner.

A download in another format carries the provenance marks again: the converted bytes
are marked with the stored image as the ingredient they were converted from (its own
manifest continues the chain). Uploads are the caller's own files and are never marked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from imagegen import imaging
from imagegen.domain import paging
from imagegen.domain.errors import ImageDeleted, InvalidRequest, NotFound
from imagegen.domain.library import ImageQuery, MetadataUpdate, check_query, check_update
from imagegen.domain.models import Identity, ImageFormat, StoredImage
from imagegen.provenance import Ingredient, Origin, ProvenanceFacts, ProvenanceMarker
from imagegen.repositories.images import ImageRepository, LibraryQueries
from imagegen.storage.base import BlobStore

log = logging.getLogger(__name__)

MAX_LINEAGE_DEPTH = 10
MAX_LINEAGE_ENTRIES = 100
MAX_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LibrarySettings:
    """URL lifetime, decode limit, download chunk size and the usage notice that
    converted downloads carry."""

    url_ttl: timedelta
    max_pixels: int
    #: the deployment's usage notice (IMAGEGEN_USAGE_NOTICE), written into conversions
    usage_notice: str
    chunk_bytes: int = MAX_CHUNK_BYTES
    encode: imaging.EncodeSettings = dataclasses.field(default_factory=imaging.EncodeSettings)


@dataclass(frozen=True)
class Download:
    """What a download streams: its type and size, then its chunks."""

    mime_type: str
    size_bytes: int
    width: int
    height: int
    file_name: str
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class Lineage:
    """An image with its ancestors and descendants (image, depth), nearest first."""

    image: StoredImage
    ancestors: list[tuple[StoredImage, int]]
    descendants: list[tuple[StoredImage, int]]
    truncated: bool


class LibraryService:
    """The caller's library."""

    def __init__(
        self,
        images: ImageRepository,
        queries: LibraryQueries,
        blobs: BlobStore,
        settings: LibrarySettings,
        marker: ProvenanceMarker,
    ) -> None:
        self._images = images
        self._queries = queries
        self._blobs = blobs
        self._settings = settings
        self._marker = marker

    async def _owned(self, identity: Identity, image_id: str) -> StoredImage:
        image = await self._images.get(identity.user_id, image_id)
        if image is None:
            raise NotFound(f"image {image_id!r} not found")
        return image

    async def _live(self, identity: Identity, image_id: str) -> StoredImage:
        """The caller's image if it is not soft-deleted; ImageDeleted
        (FAILED_PRECONDITION) if it is."""
        image = await self._owned(identity, image_id)
        if image.deleted:
            raise ImageDeleted(
                f"image images/{image.id} is deleted; undelete it first",
                image=f"images/{image.id}",
            )
        return image

    async def with_url(
        self, image: StoredImage, parents: tuple[str, ...] | None = None
    ) -> StoredImage:
        """The image with its parents and, unless deleted, a fresh signed URL."""
        if parents is None:
            parents = await self._images.parents_of(image.id)
        url = ""
        if not image.deleted:
            url = await self._blobs.signed_url(image.storage_key, self._settings.url_ttl)
        return dataclasses.replace(image, url=url, parent_ids=parents)

    async def _signed(self, image: StoredImage) -> StoredImage:
        """The image (read with its parents) with a fresh signed URL, unless deleted."""
        return await self.with_url(image, image.parent_ids)

    async def get(self, identity: Identity, image_id: str) -> StoredImage:
        return await self._signed(await self._owned(identity, image_id))

    async def list_images(
        self, identity: Identity, query: ImageQuery, *, page_size: int, page_token: str
    ) -> tuple[list[StoredImage], str]:
        """A page of the caller's images, newest first, and the next page's token."""
        size = paging.page_size(page_size)
        query = check_query(query)
        cursor = paging.decode_cursor(page_token, query.scope())
        page = await self._queries.list_for_user(
            identity.user_id, query, after=cursor, limit=size + 1
        )
        next_token = ""
        if len(page) > size:
            page = page[:size]
            last = page[-1]
            next_token = paging.encode_cursor(
                paging.Cursor(last.created_at, last.id), query.scope()
            )
        return [await self._signed(i) for i in page], next_token

    async def update(
        self, identity: Identity, image_id: str, update: MetadataUpdate
    ) -> StoredImage:
        """Change the named metadata fields of a live image; a soft-deleted one is
        ImageDeleted (undelete it first) and stays as it is."""
        checked = check_update(update)
        image = await self._queries.update_metadata(identity.user_id, image_id, checked)
        if image is None:
            # Nothing changed: either there is no such image, or it is soft-deleted.
            await self._live(identity, image_id)
            raise NotFound(f"image {image_id!r} not found")  # purged meanwhile
        return await self.with_url(image)

    async def set_deleted(self, identity: Identity, image_id: str, deleted: bool) -> StoredImage:
        image = await self._queries.set_deleted(identity.user_id, image_id, deleted)
        if image is None:
            raise NotFound(f"image {image_id!r} not found")
        return await self.with_url(image)

    async def purge(self, identity: Identity, image_id: str) -> None:
        """Remove the blob while the row's removal waits uncommitted: when the blob
        cannot be removed (StorageFailed) the row's removal is rolled back and the image
        is kept, as PurgeImage promises. Only a commit failing after the blob is gone
        leaves a row without its blob."""
        image = await self._queries.purge(identity.user_id, image_id, self._remove_blob)
        if image is None:
            raise NotFound(f"image {image_id!r} not found")

    async def _remove_blob(self, image: StoredImage) -> None:
        await self._blobs.delete(image.storage_key)

    async def url(
        self, identity: Identity, image_id: str, ttl: timedelta | None
    ) -> tuple[str, timedelta, str]:
        """A fresh signed URL of a live image and how long it works: `ttl` in whole
        seconds (a fraction rounds up), the configured lifetime when `ttl` is unset, zero
        or longer. IMG_003 for a negative `ttl`; ImageDeleted for a soft-deleted image."""
        if ttl is not None and ttl < timedelta(0):
            raise InvalidRequest(
                "ttl must not be negative (0 or unset for the maximum)", field="ttl"
            )
        image = await self._live(identity, image_id)
        lifetime = self._settings.url_ttl
        if ttl is not None and ttl > timedelta(0):
            lifetime = min(timedelta(seconds=math.ceil(ttl.total_seconds())), lifetime)
        return await self._blobs.signed_url(image.storage_key, lifetime), lifetime, image.mime_type

    async def download(
        self, identity: Identity, image_id: str, target: ImageFormat | None
    ) -> Download:
        """The image's bytes as stored (with their marks); in another format when asked
        (one decode and one encode, then the marks again, in a thread). ImageDeleted for
        a soft-deleted image."""
        image = await self._live(identity, image_id)
        data = await self._blobs.get(image.storage_key)
        mime_type = image.mime_type
        if target is not None and target.mime_type != image.mime_type:
            data = await asyncio.to_thread(self._converted, image, data, target)
            mime_type = target.mime_type
        extension = ImageFormat.from_mime(mime_type).extension
        return Download(
            mime_type=mime_type,
            size_bytes=len(data),
            width=image.width,
            height=image.height,
            file_name=f"{image.id}.{extension}",
            chunks=_chunks(data, min(self._settings.chunk_bytes, MAX_CHUNK_BYTES)),
        )

    def _converted(self, image: StoredImage, stored: bytes, target: ImageFormat) -> bytes:
        """`stored` in `target`, marked as converted from the stored image (an upload
        stays unmarked). Runs in a worker thread."""
        converted = imaging.convert_image(
            stored,
            target,
            max_pixels=self._settings.max_pixels,
            encode_settings=self._settings.encode,
        )
        if image.upload:
            return converted
        title = f"images/{image.id}"
        facts = ProvenanceFacts(
            origin=Origin.EDITED if image.is_edit else Origin.GENERATED,
            provider_id=image.provider or "unknown",
            model=image.model,
            created=image.created_at,
            usage_notice=self._settings.usage_notice,
            title=title,
            converted_from=Ingredient(data=stored, title=title),
        )
        return self._marker.mark(converted, target, facts)

    async def lineage(self, identity: Identity, image_id: str, max_depth: int) -> Lineage:
        if max_depth == 0:
            max_depth = MAX_LINEAGE_DEPTH
        if not 1 <= max_depth <= MAX_LINEAGE_DEPTH:
            raise InvalidRequest(
                f"max_depth must be 1 to {MAX_LINEAGE_DEPTH} (0 for {MAX_LINEAGE_DEPTH})",
                field="max_depth",
            )
        image = await self._owned(identity, image_id)
        # One link further than asked tells whether max_depth cut the chain.
        up, down = await self._queries.lineage(
            identity.user_id, image.id, max_depth + 1, MAX_LINEAGE_ENTRIES + 1
        )
        truncated = any(d > max_depth for _, d in (*up, *down))
        up = [(i, d) for i, d in up if d <= max_depth]
        down = [(i, d) for i, d in down if d <= max_depth]
        truncated |= len(up) > MAX_LINEAGE_ENTRIES or len(down) > MAX_LINEAGE_ENTRIES
        up, down = up[:MAX_LINEAGE_ENTRIES], down[:MAX_LINEAGE_ENTRIES]
        return Lineage(
            image=await self.with_url(image),
            ancestors=[(await self.with_url(i), d) for i, d in up],
            descendants=[(await self.with_url(i), d) for i, d in down],
            truncated=truncated,
        )


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
