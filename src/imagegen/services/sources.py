"""Turning the source images and mask a caller names (URL, data: URL, bytes, library
image) into checked edit sources, before a job exists.

Every source ends up as one of the caller's library images. A library image is used in
place. Anything else (bytes, a data: URL, a fetched URL) is checked and kept as an
upload (`Image.upload`): its blob is stored here, and its row is inserted together with
the job (submission.py), so it belongs to the job it was supplied to, counts toward the
owner's storage quota and becomes the edit's parent (a mask is kept the same way but is
not a parent). The same content uploaded again by the same owner reuses their live
upload of it (found by SHA-256) instead of storing a second copy; two submits racing
with new content may each keep one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from imagegen import imaging
from imagegen.domain.data_url import decode_data_url
from imagegen.domain.errors import ImageDeleted, ImageTooLarge, InvalidRequest, NotFound
from imagegen.domain.models import (
    EditSource,
    FetchedBody,
    Identity,
    Size,
    SourceRef,
    StoredImage,
)
from imagegen.repositories.images import ImageRepository
from imagegen.storage.base import BlobStore
from imagegen.storage.keys import source_key

MAX_SOURCES = 4
IMAGES_PREFIX = "images/"


class SourceFetcher(Protocol):
    """Fetches caller-given URLs through the SSRF guard."""

    async def fetch(self, url: str) -> FetchedBody: ...


@dataclass(frozen=True)
class SourceLimits:
    """Byte and pixel bounds for every source image."""

    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class ResolvedSources:
    """An edit's checked sources and mask, each a library image, and the uploads among
    them that are new: their blobs are stored, their rows are still to be inserted (with
    the job, in its unit of work)."""

    sources: tuple[EditSource, ...]
    mask: EditSource | None
    new_uploads: tuple[StoredImage, ...]


@dataclass(frozen=True)
class _Target:
    """Which job the uploads are supplied to, and by whom."""

    identity: Identity
    generation_id: str
    prompt: str
    #: a rerun: a library source that is gone is the stored job's problem, not the caller's
    rerun: bool


class SourceResolver:
    """Fetches, checks and stores edit sources as uploads; library images are used in
    place."""

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
        self,
        identity: Identity,
        source_refs: tuple[SourceRef, ...],
        mask_ref: SourceRef | None = None,
        *,
        generation_id: str,
        prompt: str,
        rerun: bool = False,
    ) -> ResolvedSources:
        """Every source (at most four) and the mask checked, each as a library image;
        new uploads are stored for job `generation_id` (whose prompt they carry). On any
        refusal nothing stays stored. A rerun's purged library source is IMG_003 naming it."""
        if len(source_refs) > MAX_SOURCES:
            raise InvalidRequest(f"at most {MAX_SOURCES} source images", field="sources")
        target = _Target(identity, generation_id, prompt, rerun)
        uploads: list[StoredImage] = []
        #: uploads of this request by content, so one content given twice is kept once
        by_digest: dict[str, EditSource] = {}
        resolved: list[EditSource] = []
        try:
            for position, ref in enumerate((*source_refs, *((mask_ref,) if mask_ref else ()))):
                field = "mask" if position == len(source_refs) else "sources"
                resolved.append(
                    await self._resolve_one(target, ref, position, field, uploads, by_digest)
                )
        except BaseException:
            await self.discard(ResolvedSources((), None, tuple(uploads)))
            raise
        if mask_ref is not None:
            return ResolvedSources(tuple(resolved[:-1]), resolved[-1], tuple(uploads))
        return ResolvedSources(tuple(resolved), None, tuple(uploads))

    async def size_of(self, identity: Identity, ref: SourceRef) -> Size | None:
        """A source's size without fetching, storing or decoding it, for a quote: a
        library image's (NOT_FOUND if it is not the caller's, IMG_003 if it is deleted),
        or read from the header of given bytes or a data: URL (IMG_007 past the limits,
        IMG_003 if they are not an image); None for a URL, which is not fetched."""
        if ref.kind == "image":
            name = IMAGES_PREFIX + ref.image_id
            image = await self._images.get(identity.user_id, ref.image_id)
            if image is None:
                raise NotFound(f"image {name!r} not found")
            if image.deleted:
                raise ImageDeleted(
                    f"source image {name} is deleted; undelete it first",
                    field="sources",
                    image=name,
                )
            return Size(image.width, image.height)
        if ref.kind == "bytes" or (ref.kind == "uri" and ref.uri.lower().startswith("data:")):
            data = await self._bytes_of(ref, 0, "sources")
            limits = imaging.ImageLimits(
                max_pixels=self._limits.max_pixels, max_bytes=self._limits.max_bytes
            )
            try:
                header = await asyncio.to_thread(imaging.read_header, data, limits)
            except imaging.ImageDecodeError as exc:
                raise InvalidRequest(
                    f"a source is not a PNG, JPEG or WebP image ({exc})", field="sources"
                ) from exc
            return Size(header.width, header.height)
        return None

    async def discard(self, resolved: ResolvedSources) -> None:
        """Remove the blobs of the new uploads (never a library image's)."""
        for upload in resolved.new_uploads:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._blobs.delete(upload.storage_key))

    async def _resolve_one(
        self,
        target: _Target,
        ref: SourceRef,
        position: int,
        field: str,
        uploads: list[StoredImage],
        by_digest: dict[str, EditSource],
    ) -> EditSource:
        if ref.kind == "image":
            return await self._library_source(target, ref.image_id, field)
        data = await self._bytes_of(ref, position, field)
        info = await self._inspect(data, field)
        digest = await asyncio.to_thread(_sha256_hex, data)
        if digest in by_digest:
            return by_digest[digest]
        existing = await self._images.find_upload(target.identity.user_id, digest)
        if existing is not None:
            source = EditSource(
                digest,
                existing.storage_key,
                existing.mime_type,
                existing.width,
                existing.height,
                image_id=existing.id,
            )
        else:
            upload = await self._store_upload(target, data, info, digest, position)
            uploads.append(upload)
            source = EditSource(
                digest, upload.storage_key, upload.mime_type, info.width, info.height, upload.id
            )
        by_digest[digest] = source
        return source

    async def _store_upload(
        self,
        target: _Target,
        data: bytes,
        info: imaging.ImageInfo,
        digest: str,
        position: int,
    ) -> StoredImage:
        """Put the blob of a new upload; its row is inserted with the job."""
        now = datetime.now(UTC)
        key = source_key(target.identity.user_id, info.format.extension, now)
        await self._blobs.put(key, data, info.mime_type)
        return StoredImage(
            id=str(uuid.uuid4()),
            user_id=target.identity.user_id,
            generation_id=target.generation_id,
            storage_key=key,
            mime_type=info.mime_type,
            width=info.width,
            height=info.height,
            size_bytes=len(data),
            provider="",
            model="",
            prompt=target.prompt,
            created_at=now,
            index=position,
            upload=True,
            sub_account=target.identity.sub_account,
            sha256=digest,
        )

    async def _bytes_of(self, ref: SourceRef, position: int, field: str) -> bytes:
        if ref.kind == "stored":
            # A source a job stored before uploads were library images (a rerun of it).
            try:
                return await self._blobs.get(ref.storage_key)
            except NotFound:
                raise InvalidRequest(
                    f"source {position + 1} of the job is no longer stored; it cannot be "
                    "rerun, submit the edit again with its source",
                    field=field,
                ) from None
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
            raise InvalidRequest("source URLs are not enabled on this server", field=field)
        fetched = await self._fetcher.fetch(ref.uri)
        return fetched.data

    async def _inspect(self, data: bytes, field: str) -> imaging.ImageInfo:
        try:
            return await asyncio.to_thread(
                imaging.inspect_image,
                data,
                max_pixels=self._limits.max_pixels,
                max_bytes=self._limits.max_bytes,
            )
        except imaging.ImageDecodeError as exc:
            raise InvalidRequest(
                f"a source is not a PNG, JPEG or WebP image ({exc})", field=field
            ) from exc

    async def _library_source(self, target: _Target, image_id: str, field: str) -> EditSource:
        name = IMAGES_PREFIX + image_id
        image = await self._images.get(target.identity.user_id, image_id)
        if image is None:
            if target.rerun:
                raise InvalidRequest(
                    f"source image {name} of the job was purged; it cannot be rerun",
                    field=field,
                    metadata={"image": name},
                )
            raise NotFound(f"image {name!r} not found")
        if image.deleted:
            raise ImageDeleted(
                f"source image {name} is deleted; undelete it first", field=field, image=name
            )
        digest = image.sha256
        if not digest:
            try:
                # Generated images are stored without their digest (hashing every one
                # would cost the hot path); an edit of one pays for it here instead.
                digest = await asyncio.to_thread(
                    _sha256_hex, await self._blobs.get(image.storage_key)
                )
            except NotFound:
                raise InvalidRequest(
                    f"source image {name} is no longer stored", field=field
                ) from None
        return EditSource(
            digest,
            image.storage_key,
            image.mime_type,
            image.width,
            image.height,
            image_id=image.id,
        )


def _sha256_hex(data: bytes) -> str:
    # Up to IMAGEGEN_MAX_INPUT_BYTES of source: callers run it in a thread.
    return hashlib.sha256(data).hexdigest()
