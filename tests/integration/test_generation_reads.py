"""GetGeneration and ListGenerations cost at most two statements each, whatever the page
holds: the job rows, then the images of all of them (issue 9 item 6)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from imagegen.v1 import common_pb2

from imagegen.domain.errors import NotFound
from imagegen.domain.models import Generation, Identity
from imagegen.domain.plans import PlanTable
from imagegen.jobs.signals import JobSignals
from imagegen.repositories.db import open_pool
from imagegen.repositories.unit_of_work import PostgresDatabase
from imagegen.services.generations import GenerationReads
from imagegen.storage.local import LocalBlobStore
from tests.inprocess import serve_in_process
from tests.integration.callers import caller, completed


def unsigned(generation: Generation) -> Generation:
    """The job without its signed URLs (their expiry follows the clock)."""
    images = tuple(dataclasses.replace(i, url="") for i in generation.images)
    return dataclasses.replace(generation, images=images)


class CountingPool:
    """The pool, counting each statement sent through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.statements: list[str] = []

    async def fetch(self, query: str, *args: Any) -> Any:
        self.statements.append(query)
        return await self._pool.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        self.statements.append(query)
        return await self._pool.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.statements.append(query)
        return await self._pool.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> Any:
        self.statements.append(query)
        return await self._pool.execute(query, *args)


async def test_list_takes_two_statements_for_any_page_and_get_one(
    tmp_path: Path, database_url: str
) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        async with caller(server.grpc_port) as alice:
            for count in (1, 2, 3, 4):
                completed(
                    await alice.generate(
                        common_pb2.GenerationSpec(
                            prompt=f"{count} lanterns",
                            count=count,
                            size=common_pb2.ImageSize(width=256, height=256),
                        )
                    )
                )
            first = (await alice.listed())[-1].images[0].name
            completed(
                await alice.generate(
                    common_pb2.GenerationSpec(
                        prompt="grayscale", sources=[common_pb2.ImageSource(image=first)]
                    )
                )
            )

    pool = await open_pool(database_url)
    try:
        counting = CountingPool(pool)
        reads = GenerationReads(
            db=PostgresDatabase(counting),  # type: ignore[arg-type]
            blobs=LocalBlobStore(tmp_path / "blobs", "http://127.0.0.1:9", b"k" * 32),
            signals=JobSignals(),
            url_ttl=timedelta(minutes=5),
            plans=PlanTable.default(),
        )
        alice_identity = Identity("alice")
        page, _ = await reads.list_generations(alice_identity, page_size=10)
        assert len(counting.statements) == 2
        assert [len(g.images) for g in page] == [1, 4, 3, 2, 1]
        assert page[0].images[0].parent_ids == (first.removeprefix("images/"),)
        assert all(image.url for g in page for image in g.images)
        for generation in page:
            counting.statements.clear()
            got = await reads.get(alice_identity, generation.id)
            assert len(counting.statements) == 1
            assert unsigned(got) == unsigned(generation)
        with pytest.raises(NotFound):
            await reads.get(Identity("bob"), page[0].id)
    finally:
        await pool.close()
