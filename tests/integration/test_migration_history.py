"""Migration 0004 on a database that already holds jobs and images: what it backfills,
and that what older jobs stored keeps working."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import asyncpg

from imagegen.repositories.migrator import apply_migrations, load_migrations, migrations_dir


def _migrations_before(version: int, tmp_path: Path) -> Path:
    directory = tmp_path / "before"
    directory.mkdir()
    for migration in load_migrations(migrations_dir()):
        if migration.version < version:
            shutil.copy(migrations_dir() / migration.name, directory / migration.name)
    return directory


async def _insert_job(
    conn: asyncpg.Connection, *, state: str, credits: int, sub_account: str, images: int
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    job_id = uuid.uuid4()
    spec = {
        "prompt": "old",
        "width": 256,
        "height": 256,
        "count": images,
        "format": "png",
        # A source as jobs stored it before uploads were library images.
        "sources": [
            {
                "sha256": "0" * 64,
                "storage_key": f"sources/alice/2026/01/x-{job_id}.png",
                "mime_type": "image/png",
                "width": 8,
                "height": 8,
                "image_id": "",
            }
        ],
    }
    await conn.execute(
        """
        INSERT INTO generations (id, user_id, sub_account, fingerprint, prompt, width, height,
                                 image_count, output_format, spec, provider, state, credits)
        VALUES ($1, 'alice', $2, '{}', 'old', 256, 256, $3, 'png', $4::jsonb, 'local', $5, $6)
        """,
        job_id,
        sub_account,
        images,
        json.dumps(spec),
        state,
        credits,
    )
    image_ids = []
    for index in range(images):
        image_id = uuid.uuid4()
        await conn.execute(
            """
            INSERT INTO images (id, user_id, generation_id, batch_index, storage_key, mime_type,
                                width, height, size_bytes, provider, prompt, is_edit)
            VALUES ($1, 'alice', $2, $3, $4, 'image/png', 256, 256, 100, 'local', 'old', true)
            """,
            image_id,
            job_id,
            index,
            f"generated/alice/{image_id}.png",
        )
        image_ids.append(image_id)
    return job_id, image_ids


async def test_0004_backfills_images_and_keeps_old_jobs_readable(
    empty_database_url: str, tmp_path: Path
) -> None:
    await apply_migrations(empty_database_url, directory=_migrations_before(4, tmp_path))
    conn = await asyncpg.connect(empty_database_url)
    try:
        done, done_images = await _insert_job(
            conn, state="completed", credits=6, sub_account="team-a", images=3
        )
        running, running_images = await _insert_job(
            conn, state="running", credits=8, sub_account="", images=1
        )
        await conn.execute(
            "INSERT INTO prompt_templates (id, owner_id, name, prompt) "
            "VALUES ($1, 'alice', 'Old', 'an old prompt')",
            uuid.uuid4(),
        )

        applied = await apply_migrations(empty_database_url)
        assert "0004_history.sql" in applied

        rows = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT id, upload, sub_account, credits, generation_duration, sha256 FROM images"
            )
        }
        for image_id in done_images:
            row = rows[image_id]
            # Each image's share of the settled charge, under the job's sub-account.
            assert (row["sub_account"], row["credits"]) == ("team-a", 2)
            assert not row["upload"] and row["generation_duration"] is None
            assert row["sha256"] is None
        # A job still running has only a reservation: nothing charged yet.
        assert rows[running_images[0]]["credits"] == 0
        # The old jobs' specs, sources under `sources/` included, are as they were.
        spec = json.loads(await conn.fetchval("SELECT spec FROM generations WHERE id = $1", done))
        assert spec["sources"][0]["storage_key"].startswith("sources/")
        assert await conn.fetchval("SELECT request_id FROM prompt_templates") is None

        # A job stores each batch index once; uploads stand outside the batch.
        extra = uuid.uuid4()
        status = await conn.execute(
            """
            INSERT INTO images (id, user_id, generation_id, batch_index, storage_key, mime_type,
                                width, height, size_bytes, provider, prompt)
            VALUES ($1, 'alice', $2, 0, 'generated/alice/again.png', 'image/png', 1, 1, 1,
                    'local', 'old')
            ON CONFLICT (generation_id, batch_index) WHERE NOT upload DO NOTHING
            """,
            extra,
            running,
        )
        assert status == "INSERT 0 0"
        await conn.execute(
            """
            INSERT INTO images (id, user_id, generation_id, batch_index, storage_key, mime_type,
                                width, height, size_bytes, provider, prompt, upload, sha256)
            VALUES ($1, 'alice', $2, 0, 'sources/alice/upload.png', 'image/png', 1, 1, 1,
                    '', 'old', true, 'abc')
            """,
            extra,
            running,
        )
    finally:
        await conn.close()


async def test_0010_keeps_the_blobs_old_jobs_name_by_key(
    empty_database_url: str, tmp_path: Path
) -> None:
    await apply_migrations(empty_database_url, directory=_migrations_before(10, tmp_path))
    conn = await asyncpg.connect(empty_database_url)
    try:
        legacy, _ = await _insert_job(conn, state="completed", credits=2, sub_account="", images=1)
        # A later job's sources are library images (uploads): their rows keep their blobs.
        later = uuid.uuid4()
        spec = {
            "prompt": "new",
            "width": 256,
            "height": 256,
            "count": 1,
            "format": "png",
            "sources": [{"storage_key": "sources/alice/new.png", "image_id": str(uuid.uuid4())}],
            "mask": {"storage_key": "sources/alice/old-mask.png", "image_id": ""},
        }
        await conn.execute(
            "INSERT INTO generations (id, user_id, fingerprint, prompt, width, height, "
            "image_count, output_format, spec, provider, state) "
            "VALUES ($1, 'alice', '{}', 'new', 256, 256, 1, 'png', $2::jsonb, 'local', 'queued')",
            later,
            json.dumps(spec),
        )
        applied = await apply_migrations(empty_database_url)
        assert "0010_retention.sql" in applied
        kept = {r["storage_key"] for r in await conn.fetch("SELECT * FROM retained_blob_keys")}
        assert kept == {f"sources/alice/2026/01/x-{legacy}.png", "sources/alice/old-mask.png"}
        # Every job's log starts at sequence 1 and none is compacted yet.
        rows = await conn.fetch("SELECT first_sequence, events_compacted_at FROM generations")
        assert {(r["first_sequence"], r["events_compacted_at"]) for r in rows} == {(1, None)}
    finally:
        await conn.close()
