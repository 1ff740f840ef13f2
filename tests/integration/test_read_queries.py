"""The library's hot reads make one statement each: GetImage (the image and its parents)
and a ListImages page (the page and every image's parents), against PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagegen.config import ProvenanceSettings
from imagegen.domain.errors import NotFound
from imagegen.domain.library import ImageQuery
from imagegen.domain.models import Identity, StoredImage
from imagegen.provenance import open_marker
from imagegen.repositories.db import open_pool
from imagegen.repositories.images import ImageRepository, LibraryQueries
from imagegen.services.library import LibraryService, LibrarySettings
from imagegen.storage.local import LocalBlobStore

ALICE = Identity("alice", "", "free")
BOB = Identity("bob", "", "free")


class CountingPool:
    """The pool, with every statement sent through it written down."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.statements: list[str] = []

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        return await self._pool.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        return await self._pool.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        return await self._pool.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        return await self._pool.execute(sql, *args)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    opened = await open_pool(database_url)
    try:
        yield opened
    finally:
        await opened.close()


def image(user: str, number: int, *, parents: tuple[str, ...] = ()) -> StoredImage:
    image_id = str(uuid.uuid4())
    return StoredImage(
        id=image_id,
        user_id=user,
        generation_id="",
        storage_key=f"generated/{user}/{image_id}.png",
        mime_type="image/png",
        width=64,
        height=64,
        size_bytes=100,
        provider="local",
        model="",
        prompt=f"picture {number}",
        created_at=datetime.now(UTC),
        is_edit=bool(parents),
        parent_ids=parents,
    )


async def seed(pool: asyncpg.Pool) -> list[StoredImage]:
    """25 of alice's images, every third an edit of the two before it, each newer than
    the last; one of bob's."""
    images = ImageRepository(pool)
    stored: list[StoredImage] = []
    base = datetime.now(UTC) - timedelta(hours=1)
    for number in range(25):
        parents = (stored[-1].id, stored[-2].id) if number % 3 == 2 else ()
        made = await images.insert(image("alice", number, parents=parents))
        assert made is not None
        stored.append(made)
        await pool.execute(
            "UPDATE images SET created_at = $2 WHERE id = $1",
            uuid.UUID(made.id),
            base + timedelta(seconds=number),
        )
    await images.insert(image("bob", 0))
    return stored


def service(db: CountingPool, tmp_path: Path) -> LibraryService:
    blobs = LocalBlobStore(tmp_path / "blobs", "http://127.0.0.1:1", b"k" * 32)
    return LibraryService(
        ImageRepository(db),  # type: ignore[arg-type]
        LibraryQueries(db),  # type: ignore[arg-type]
        blobs,
        LibrarySettings(url_ttl=timedelta(minutes=10), max_pixels=1 << 24, usage_notice="AI"),
        open_marker(ProvenanceSettings(cert=None, key=None, usage_notice="AI"), tmp_path),
    )


async def test_get_image_is_one_statement_with_its_parents_in_order(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    stored = await seed(pool)
    db = CountingPool(pool)
    library = service(db, tmp_path)
    edit = stored[5]
    got = await library.get(ALICE, edit.id)
    assert got.parent_ids == (stored[4].id, stored[3].id)
    assert got.url.startswith("http://127.0.0.1:1/blobs/")
    assert len(db.statements) == 1
    original = await library.get(ALICE, stored[4].id)
    assert original.parent_ids == () and not original.is_edit
    assert len(db.statements) == 2
    # Someone else's image, or no image at all: NotFound, still one statement.
    with pytest.raises(NotFound):
        await library.get(BOB, edit.id)
    with pytest.raises(NotFound):
        await library.get(ALICE, str(uuid.uuid4()))
    assert len(db.statements) == 4


async def test_a_page_of_twenty_is_one_statement_with_every_images_parents(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    stored = await seed(pool)
    db = CountingPool(pool)
    library = service(db, tmp_path)
    page, token = await library.list_images(ALICE, ImageQuery(), page_size=20, page_token="")
    assert len(db.statements) == 1
    assert [i.id for i in page] == [i.id for i in reversed(stored)][:20]
    expected = {i.id: i.parent_ids for i in stored}
    assert {i.id: i.parent_ids for i in page} == {i.id: expected[i.id] for i in page}
    assert sum(1 for i in page if i.parent_ids) == 7
    assert all(i.url for i in page)
    rest, last = await library.list_images(ALICE, ImageQuery(), page_size=20, page_token=token)
    assert len(db.statements) == 2
    assert [i.id for i in rest] == [i.id for i in reversed(stored)][20:] and last == ""
    assert {i.id: i.parent_ids for i in rest} == {i.id: expected[i.id] for i in rest}


async def test_a_deleted_image_is_read_with_its_parents_and_no_url(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    stored = await seed(pool)
    db = CountingPool(pool)
    library = service(db, tmp_path)
    await library.set_deleted(ALICE, stored[2].id, True)
    got = await library.get(ALICE, stored[2].id)
    assert got.deleted and got.url == ""
    assert got.parent_ids == (stored[1].id, stored[0].id)
    page, _ = await library.list_images(
        ALICE, ImageQuery(show_deleted=True), page_size=50, page_token=""
    )
    deleted = next(i for i in page if i.id == stored[2].id)
    assert deleted.url == "" and deleted.parent_ids == (stored[1].id, stored[0].id)
