"""Image rows (SQL lives here only)."""

from __future__ import annotations

import dataclasses
import uuid

import asyncpg

from imagegen.domain.models import StoredImage


def parse_id(value: str) -> uuid.UUID | None:
    """A UUID from text, or None when it is not one (so lookups answer NOT_FOUND)."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError):
        return None


def _image_from_row(row: asyncpg.Record) -> StoredImage:
    return StoredImage(
        id=str(row["id"]),
        user_id=row["user_id"],
        generation_id=str(row["generation_id"]) if row["generation_id"] else "",
        storage_key=row["storage_key"],
        mime_type=row["mime_type"],
        width=row["width"],
        height=row["height"],
        size_bytes=row["size_bytes"],
        provider=row["provider"],
        model=row["model"],
        prompt=row["prompt"],
        created_at=row["created_at"],
        index=row["batch_index"],
        deleted=row["deleted_at"] is not None,
        is_edit=row["is_edit"],
    )


class ImageRepository:
    """Stored images' metadata; every read is scoped to the owner."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert(
        self,
        conn: asyncpg.Connection,
        image: StoredImage,
        *,
        negative_prompt: str = "",
        style: str = "",
        seed: int | None = None,
    ) -> StoredImage | None:
        """Add the row of an image whose blob is already stored (caller's transaction).
        None when the job already has an image at that batch index (another attempt
        stored it first)."""
        row = await conn.fetchrow(
            """
            INSERT INTO images (id, user_id, generation_id, batch_index, storage_key, mime_type,
                                width, height, size_bytes, provider, model, prompt,
                                negative_prompt, style, seed, is_edit)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
            ON CONFLICT (generation_id, batch_index) DO NOTHING
            RETURNING *
            """,
            uuid.UUID(image.id),
            image.user_id,
            uuid.UUID(image.generation_id) if image.generation_id else None,
            image.index,
            image.storage_key,
            image.mime_type,
            image.width,
            image.height,
            image.size_bytes,
            image.provider,
            image.model,
            image.prompt,
            negative_prompt,
            style,
            seed,
            image.is_edit,
        )
        if row is None:
            return None
        for position, parent_id in enumerate(image.parent_ids):
            await conn.execute(
                "INSERT INTO image_parents (image_id, parent_id, position) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING",
                row["id"],
                uuid.UUID(parent_id),
                position,
            )
        stored = _image_from_row(row)
        return dataclasses.replace(stored, parent_ids=image.parent_ids)

    async def for_generation(self, generation_id: str) -> list[StoredImage]:
        """A job's images in batch order."""
        gid = parse_id(generation_id)
        if gid is None:
            return []
        rows = await self._pool.fetch(
            "SELECT * FROM images WHERE generation_id = $1 AND deleted_at IS NULL "
            "ORDER BY batch_index",
            gid,
        )
        return [_image_from_row(r) for r in rows]

    async def get(self, user_id: str, image_id: str) -> StoredImage | None:
        """The owner's image, or None (also for another user's or a malformed id)."""
        iid = parse_id(image_id)
        if iid is None:
            return None
        row = await self._pool.fetchrow(
            "SELECT * FROM images WHERE id = $1 AND user_id = $2", iid, user_id
        )
        return None if row is None else _image_from_row(row)

    async def parents_of(self, image_id: str) -> tuple[str, ...]:
        """The images an edit was made from, in source order."""
        iid = parse_id(image_id)
        if iid is None:
            return ()
        rows = await self._pool.fetch(
            "SELECT parent_id FROM image_parents WHERE image_id = $1 ORDER BY position", iid
        )
        return tuple(str(r["parent_id"]) for r in rows)

    async def get_by_id(self, image_id: str) -> StoredImage | None:
        """An image by id for internal use (workers), never for callers."""
        iid = parse_id(image_id)
        if iid is None:
            return None
        row = await self._pool.fetchrow("SELECT * FROM images WHERE id = $1", iid)
        return None if row is None else _image_from_row(row)
