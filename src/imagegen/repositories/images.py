"""Image rows (SQL lives here only)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from imagegen.domain.library import ImageQuery, MetadataUpdate
from imagegen.domain.models import StoredImage
from imagegen.domain.paging import Cursor
from imagegen.repositories.db import Executor


def parse_id(value: str) -> uuid.UUID | None:
    """A UUID from text, or None when it is not one (so lookups answer NOT_FOUND)."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError):
        return None


#: The columns an image is read from (`_image_from_row`): named rather than `i.*` so the
#: generated `search` tsvector, as long as the prompt and title together, never travels.
_IMAGE_COLUMNS = """
    i.id, i.user_id, i.generation_id, i.storage_key, i.mime_type, i.width, i.height,
    i.size_bytes, i.provider, i.model, i.prompt, i.created_at, i.batch_index, i.deleted_at,
    i.is_edit, i.negative_prompt, i.style, i.seed, i.title, i.description, i.tags,
    i.favorite, i.updated_at, i.upload, i.sub_account, i.credits, i.generation_duration,
    i.sha256
"""

#: The select list of an image with its parents (in source order), in one statement.
_WITH_PARENTS = f"""
    {_IMAGE_COLUMNS}, array(SELECT p.parent_id FROM image_parents p
                WHERE p.image_id = i.id ORDER BY p.position) AS parent_ids
"""  # noqa: S608 - column names of this module only


#: The prefix of an image's columns where they share a row with another table's
#: (`IMAGE_COLUMNS_PREFIXED`); `image_from_prefixed` reads them back.
_PREFIX = "image__"

#: `_WITH_PARENTS` under names of their own, for a statement that reads a job's row and
#: its images' together (one row per image, the job's columns repeated).
IMAGE_COLUMNS_PREFIXED = ", ".join(
    [
        f"{column} AS {_PREFIX}{column.removeprefix('i.')}"
        for column in (c.strip() for c in _IMAGE_COLUMNS.split(","))
    ]
    + [
        # fixed names of this module only
        f"array(SELECT p.parent_id FROM image_parents p WHERE p.image_id = i.id"  # noqa: S608
        f" ORDER BY p.position) AS {_PREFIX}parent_ids"
    ]
)


def image_from_prefixed(row: asyncpg.Record) -> StoredImage | None:
    """The image in a row read with `IMAGE_COLUMNS_PREFIXED`; None when the row has none
    (a job without images, through a LEFT JOIN)."""
    if row[f"{_PREFIX}id"] is None:
        return None
    return _image_from_row(
        {key.removeprefix(_PREFIX): value for key, value in row.items() if key.startswith(_PREFIX)}
    )


def _image_from_row(row: Mapping[str, Any]) -> StoredImage:
    keys = row.keys()
    parents = tuple(str(p) for p in row["parent_ids"]) if "parent_ids" in keys else ()
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
        negative_prompt=row["negative_prompt"],
        style=row["style"],
        seed=row["seed"],
        title=row["title"],
        description=row["description"],
        tags=tuple(row["tags"]),
        favorite=row["favorite"],
        updated_at=row["updated_at"],
        deleted_at=row["deleted_at"],
        parent_ids=parents,
        upload=row["upload"],
        sub_account=row["sub_account"],
        credits=row["credits"],
        generation_duration=row["generation_duration"],
        sha256=row["sha256"] or "",
    )


class ImageRepository:
    """Stored images' metadata; every read is scoped to the owner."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def insert(
        self,
        image: StoredImage,
        *,
        negative_prompt: str = "",
        style: str = "",
        seed: int | None = None,
    ) -> StoredImage | None:
        """Add the row of an image whose blob is already stored (in a unit of work).
        None when the job already has a result at that batch index (another attempt
        stored it first); an upload never conflicts."""
        row = await self._db.fetchrow(
            """
            INSERT INTO images (id, user_id, generation_id, batch_index, storage_key, mime_type,
                                width, height, size_bytes, provider, model, prompt,
                                negative_prompt, style, seed, is_edit, upload, sub_account,
                                credits, generation_duration, sha256)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                    $17, $18, $19, $20, $21)
            ON CONFLICT (generation_id, batch_index) WHERE NOT upload DO NOTHING
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
            image.upload,
            image.sub_account,
            image.credits,
            image.generation_duration,
            image.sha256 or None,
        )
        if row is None:
            return None
        for position, parent_id in enumerate(image.parent_ids):
            await self._db.execute(
                "INSERT INTO image_parents (image_id, parent_id, position) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING",
                row["id"],
                uuid.UUID(parent_id),
                position,
            )
        stored = _image_from_row(row)
        return dataclasses.replace(stored, parent_ids=image.parent_ids)

    async def for_generation(self, generation_id: str) -> list[StoredImage]:
        """The images a job made, in batch order: soft-deleted ones too (they were
        delivered and charged, and a retried attempt must not make them again), never the
        uploads it was given."""
        gid = parse_id(generation_id)
        if gid is None:
            return []
        rows = await self._db.fetch(
            "SELECT * FROM images WHERE generation_id = $1 AND NOT upload ORDER BY batch_index",
            gid,
        )
        return [_image_from_row(r) for r in rows]

    async def for_generations(
        self, user_id: str, generation_ids: list[str]
    ) -> dict[str, list[StoredImage]]:
        """The images each of the owner's jobs made (soft-deleted ones too, no uploads),
        in batch order and with their parents, by job id: one statement for a whole page."""
        if not generation_ids:
            return {}
        rows = await self._db.fetch(
            f"""
            SELECT {_WITH_PARENTS}
              FROM images i
             WHERE i.generation_id = ANY($1::uuid[]) AND NOT i.upload AND i.user_id = $2
             ORDER BY i.generation_id, i.batch_index
            """,  # noqa: S608 - _WITH_PARENTS is a fixed fragment
            [uuid.UUID(g) for g in generation_ids],
            user_id,
        )
        found: dict[str, list[StoredImage]] = {}
        for row in rows:
            image = _image_from_row(row)
            found.setdefault(image.generation_id, []).append(image)
        return found

    async def find_upload(self, user_id: str, sha256: str) -> StoredImage | None:
        """The owner's live (not soft-deleted) upload of this content, if any; the
        oldest when there are several."""
        row = await self._db.fetchrow(
            "SELECT * FROM images WHERE user_id = $1 AND sha256 = $2 AND upload "
            "AND deleted_at IS NULL ORDER BY created_at, id LIMIT 1",
            user_id,
            sha256,
        )
        return None if row is None else _image_from_row(row)

    async def get(self, user_id: str, image_id: str) -> StoredImage | None:
        """The owner's image with its parents, or None (also for another user's or a
        malformed id)."""
        iid = parse_id(image_id)
        if iid is None:
            return None
        row = await self._db.fetchrow(
            f"SELECT {_WITH_PARENTS} FROM images i WHERE i.id = $1 AND i.user_id = $2",  # noqa: S608 - fixed
            iid,
            user_id,
        )
        return None if row is None else _image_from_row(row)

    async def storage_used(self, user_id: str) -> int:
        """Bytes of the user's stored images (soft-deleted ones too, until purged): the
        counter a trigger keeps with every image row's insert and delete
        (migrations/0003_counters.sql), one row however many images there are."""
        value = await self._db.fetchval(
            "SELECT used_bytes FROM storage_usage WHERE user_id = $1", user_id
        )
        return int(value or 0)

    async def lock_storage_used(self, user_id: str) -> int:
        """`storage_used`, with the user's counter row locked until the transaction ends
        (inside a unit of work): the quota is decided against it and the image row
        inserted before any other transaction can store an image of this user."""
        value = await self._db.fetchval(
            """
            INSERT INTO storage_usage AS s (user_id) VALUES ($1)
            ON CONFLICT (user_id) DO UPDATE SET user_id = s.user_id
            RETURNING used_bytes
            """,
            user_id,
        )
        return int(value)

    async def parents_of(self, image_id: str) -> tuple[str, ...]:
        """The images an edit was made from, in source order."""
        iid = parse_id(image_id)
        if iid is None:
            return ()
        rows = await self._db.fetch(
            "SELECT parent_id FROM image_parents WHERE image_id = $1 ORDER BY position", iid
        )
        return tuple(str(r["parent_id"]) for r in rows)

    async def get_by_id(self, image_id: str) -> StoredImage | None:
        """An image by id, with its parents, for internal use (workers, a job's own
        events), never for callers."""
        iid = parse_id(image_id)
        if iid is None:
            return None
        row = await self._db.fetchrow(
            f"SELECT {_WITH_PARENTS} FROM images i WHERE i.id = $1",  # noqa: S608 - fixed
            iid,
        )
        return None if row is None else _image_from_row(row)


#: The ListImages `kind` filter ($7), on the columns of `images`.
_KIND_FILTER = """CASE $7 WHEN 'all' THEN true WHEN 'original' THEN NOT is_edit AND NOT upload
               WHEN 'edit' THEN is_edit WHEN 'upload' THEN upload WHEN 'generated' THEN NOT upload
       END"""

#: The library's page query, each image with its parents; a module constant so the
#: benchmark can EXPLAIN the real thing. It walks images_user_created_idx newest first
#: and stops after a page: right when nothing or a common word filters the rows, but for
#: a word few images contain it would read the user's whole history
#: (LIST_IMAGES_TEXT_SQL is used then).
LIST_IMAGES_SQL = f"""
SELECT {_WITH_PARENTS} FROM images i
 WHERE user_id = $1
   AND (cardinality($2::text[]) = 0 OR tags @> $2::text[])
   AND ($3 = '' OR search @@ plainto_tsquery('english', $3))
   AND (NOT $4 OR favorite)
   AND ($5::timestamptz IS NULL OR created_at >= $5)
   AND ($6::timestamptz IS NULL OR created_at < $6)
   AND {_KIND_FILTER}
   AND ($8 OR deleted_at IS NULL)
   AND ($9::timestamptz IS NULL OR (created_at, id) < ($9, $10::uuid))
 ORDER BY created_at DESC, id DESC
 LIMIT $11
"""  # noqa: S608 - _WITH_PARENTS is a fixed fragment

#: How many of the user's newest images (after the page cursor) a word search reads
#: in date order before it asks the full-text index for the older ones.
TEXT_WALK_ROWS = 1000

# Every filter of a page but the word and the cursor, on the columns of `images`.
_PAGE_FILTERS = f"""
       user_id = $1
   AND (cardinality($2::text[]) = 0 OR tags @> $2::text[])
   AND (NOT $4 OR favorite)
   AND ($5::timestamptz IS NULL OR created_at >= $5)
   AND ($6::timestamptz IS NULL OR created_at < $6)
   AND {_KIND_FILTER}
   AND ($8 OR deleted_at IS NULL)
"""
_AFTER_CURSOR = "($9::timestamptz IS NULL OR (created_at, id) < ($9, $10::uuid))"

#: A page of the images whose text matches a word (parameters as LIST_IMAGES_SQL's).
#: The planner cannot know how many images a word matches (a word that no image holds
#: is estimated like any uncommon one), so the statement does not ask it to choose:
#: 1. `recent_hits` walks the user's newest TEXT_WALK_ROWS images in date order and
#:    keeps the matching ones, stopping at a full page: a common word ends here after
#:    a few dozen rows.
#: 2. Only when that found less than a page (a rare word) does the second branch run
#:    (its one-time filter), driven by the full-text GIN index (`matches`, a
#:    materialized CTE, so it is planned on the word alone): the matching images older
#:    than the walked window. Its cost follows how many images hold the word, never
#:    the length of the history.
LIST_IMAGES_TEXT_SQL = f"""
WITH recent_hits AS MATERIALIZED (
    SELECT * FROM (
        SELECT * FROM images
         WHERE {_PAGE_FILTERS} AND {_AFTER_CURSOR}
         ORDER BY created_at DESC, id DESC
         LIMIT {TEXT_WALK_ROWS}) recent
     WHERE search @@ plainto_tsquery('english', $3)
     ORDER BY created_at DESC, id DESC
     LIMIT $11
), matches AS MATERIALIZED (
    SELECT * FROM images WHERE user_id = $1 AND search @@ plainto_tsquery('english', $3)
), page AS (
    SELECT * FROM recent_hits
    UNION ALL
    (SELECT * FROM matches
      WHERE (SELECT count(*) FROM recent_hits) < $11
        AND {_PAGE_FILTERS}
        AND (created_at, id) < (
            SELECT created_at, id FROM images
             WHERE {_PAGE_FILTERS} AND {_AFTER_CURSOR}
             ORDER BY created_at DESC, id DESC
             OFFSET {TEXT_WALK_ROWS - 1} LIMIT 1)
      ORDER BY created_at DESC, id DESC
      LIMIT $11)
    ORDER BY created_at DESC, id DESC
    LIMIT $11
)
SELECT {_WITH_PARENTS} FROM page i
 ORDER BY i.created_at DESC, i.id DESC
"""  # noqa: S608 - built from this module's constants only; every value is a parameter


def page_statement(text: str) -> str:
    """The page query for a ListImages request whose word filter is `text`."""
    return LIST_IMAGES_TEXT_SQL if text else LIST_IMAGES_SQL


class LibraryQueries:
    """The library's reads and owner changes; every statement is scoped to the owner."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def list_for_user(
        self, user_id: str, query: ImageQuery, *, after: Cursor | None, limit: int
    ) -> list[StoredImage]:
        """The owner's images, newest first, strictly after `after`."""
        rows = await self._pool.fetch(
            page_statement(query.text),
            user_id,
            list(query.tags),
            query.text,
            query.favorites_only,
            query.created_from,
            query.created_before,
            query.kind.value,
            query.show_deleted,
            after.created_at if after else None,
            uuid.UUID(after.id) if after else None,
            limit,
        )
        return [_image_from_row(r) for r in rows]

    async def update_metadata(
        self, user_id: str, image_id: str, update: MetadataUpdate
    ) -> StoredImage | None:
        """Change only the named fields of a live image; None (nothing changed) if the
        caller has no such image or it is soft-deleted."""
        iid = parse_id(image_id)
        if iid is None:
            return None
        row = await self._pool.fetchrow(
            """
            UPDATE images SET
                title = CASE WHEN $3 THEN $4 ELSE title END,
                description = CASE WHEN $5 THEN $6 ELSE description END,
                tags = CASE WHEN $7 THEN $8::text[] ELSE tags END,
                favorite = CASE WHEN $9 THEN $10 ELSE favorite END,
                updated_at = now()
             WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL
            RETURNING *
            """,
            iid,
            user_id,
            "title" in update.fields,
            update.title,
            "description" in update.fields,
            update.description,
            "tags" in update.fields,
            list(update.tags),
            "favorite" in update.fields,
            update.favorite,
        )
        return None if row is None else _image_from_row(row)

    async def set_deleted(self, user_id: str, image_id: str, deleted: bool) -> StoredImage | None:
        """Soft-delete or restore (idempotent); None if the caller has no such image."""
        iid = parse_id(image_id)
        if iid is None:
            return None
        row = await self._pool.fetchrow(
            """
            UPDATE images
               SET deleted_at = CASE WHEN $3 THEN coalesce(deleted_at, now()) ELSE NULL END,
                   updated_at = now()
             WHERE id = $1 AND user_id = $2
            RETURNING *
            """,
            iid,
            user_id,
            deleted,
        )
        return None if row is None else _image_from_row(row)

    async def purge(
        self,
        user_id: str,
        image_id: str,
        remove_blob: Callable[[StoredImage], Awaitable[None]],
    ) -> StoredImage | None:
        """Remove the row for good (its edit links go with it) and, before that commits,
        call `remove_blob` with what it was: if that raises, the row stays. None if the
        caller has no such image."""
        iid = parse_id(image_id)
        if iid is None:
            return None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "DELETE FROM images WHERE id = $1 AND user_id = $2 RETURNING *", iid, user_id
            )
            if row is None:
                return None
            image = _image_from_row(row)
            await remove_blob(image)
        return image

    async def lineage(
        self, user_id: str, image_id: str, max_depth: int, limit: int
    ) -> tuple[list[tuple[StoredImage, int]], list[tuple[StoredImage, int]]]:
        """Ancestors and descendants (nearest first) within `max_depth` links."""
        iid = uuid.UUID(image_id)
        result: list[list[tuple[StoredImage, int]]] = []
        for near, far in (("image_id", "parent_id"), ("parent_id", "image_id")):
            rows = await self._pool.fetch(
                f"""
                WITH RECURSIVE chain(id, depth) AS (
                    SELECT p.{far}, 1 FROM image_parents p WHERE p.{near} = $1
                    UNION
                    SELECT p.{far}, c.depth + 1
                      FROM image_parents p JOIN chain c ON p.{near} = c.id
                     WHERE c.depth < $3
                )
                SELECT i.*, min(c.depth) AS depth
                  FROM chain c JOIN images i ON i.id = c.id
                 WHERE i.user_id = $2
                 GROUP BY i.id
                 ORDER BY depth, i.created_at
                 LIMIT $4
                """,  # noqa: S608 - the two column names are fixed above, never input
                iid,
                user_id,
                max_depth,
                limit,
            )
            result.append([(_image_from_row(r), int(r["depth"])) for r in rows])
        return result[0], result[1]
