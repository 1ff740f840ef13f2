"""ImageLibraryService through a served process, against PostgreSQL and the S3 endpoint."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from imagegen.v1 import common_pb2, generation_pb2, library_pb2, library_pb2_grpc
from PIL import Image

from tests.conftest import list_bucket_keys
from tests.inprocess import serve_in_process
from tests.integration.test_edits import run
from tests.integration.test_pipeline import CHANNEL_OPTIONS, metadata, reason_of

L = library_pb2
E = generation_pb2


async def make(port: int, prompt: str, user: str = "alice", **kwargs: object) -> str:
    spec = common_pb2.GenerationSpec(prompt=prompt, **kwargs)  # type: ignore[arg-type]
    if not spec.sources:
        spec.size.CopyFrom(common_pb2.ImageSize(width=256, height=256))
    events = await run(port, spec, user=user)
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    return next(e.image.name for e in events if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY)


async def names(stub, user: str = "alice", **filters: object) -> list[str]:
    reply = await stub.ListImages(L.ListImagesRequest(**filters), metadata=metadata(user))
    return [i.name for i in reply.images]


async def test_library_filters_updates_deletes_and_isolation(
    tmp_path: Path, database_url: str, s3_endpoint: str, s3_bucket: str
) -> None:
    env = {"IMAGEGEN_S3_ENDPOINT": s3_endpoint, "IMAGEGEN_S3_BUCKET": s3_bucket}
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        port = server.grpc_port
        fox = await make(port, "a red fox in snow")
        cats = await make(port, "two cats on a roof")
        den = await make(port, "a fox den under a tree")
        bobs = await make(port, "bob's fox", user="bob")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            stub = library_pb2_grpc.ImageLibraryServiceStub(ch)
            md = metadata()

            async def update(name: str, paths: list[str], **values: object) -> common_pb2.Image:
                reply = await stub.UpdateImage(
                    L.UpdateImageRequest(
                        image=common_pb2.Image(name=name, **values),
                        update_mask=field_mask_pb2.FieldMask(paths=paths),
                    ),
                    metadata=md,
                )
                return reply.image

            tagged = await update(fox, ["tags"], tags=["animal", " winter ", "animal"])
            assert list(tagged.tags) == ["animal", "winter"]
            await update(cats, ["tags", "favorite"], tags=["animal"], favorite=True)
            titled = await update(den, ["title"], title="Den", description="ignored")
            assert titled.title == "Den" and titled.description == "" and not titled.favorite

            assert await names(stub) == [den, cats, fox]
            assert bobs not in await names(stub)
            assert await names(stub, tags=["animal"]) == [cats, fox]
            assert await names(stub, tags=["animal", "winter"]) == [fox]
            assert await names(stub, query="foxes") == [den, fox], "stemmed full-text search"
            assert await names(stub, query="fox", tags=["animal"]) == [fox]
            assert await names(stub, favorites_only=True) == [cats]
            assert await names(stub, query="Den") == [den], "titles are searched too"

            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(
                    "UPDATE images SET created_at = '2020-06-01T00:00:00Z' WHERE id = $1",
                    uuid.UUID(fox.removeprefix("images/")),
                )
            finally:
                await conn.close()
            cutoff = timestamp_pb2.Timestamp()
            cutoff.FromJsonString("2021-01-01T00:00:00Z")
            assert await names(stub, create_time_end=cutoff) == [fox]
            assert await names(stub, create_time_start=cutoff) == [den, cats]

            edit = await make(port, "grayscale", sources=[common_pb2.ImageSource(image=cats)])
            assert await names(stub, kind=L.IMAGE_KIND_EDIT) == [edit]
            assert await names(stub, kind=L.IMAGE_KIND_ORIGINAL) == [den, cats, fox]

            page = await stub.ListImages(L.ListImagesRequest(page_size=2), metadata=md)
            rest = await stub.ListImages(
                L.ListImagesRequest(page_size=2, page_token=page.next_page_token), metadata=md
            )
            assert [i.name for i in page.images] + [i.name for i in rest.images] == [
                edit,
                den,
                cats,
                fox,
            ]
            assert rest.next_page_token == ""

            # Out-of-range values are IMG_003 and change nothing.
            for paths, values in (
                (["title"], {"title": "t" * 201}),
                (["description"], {"description": "d" * 1001}),
                (["tags"], {"tags": [f"t{i}" for i in range(21)]}),
                (["tags"], {"tags": ["x" * 51]}),
                (["prompt"], {"prompt": "rewrite history"}),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await update(den, paths, **values)
                assert reason_of(bad.value) == "IMG_003"
            unchanged = (await stub.GetImage(L.GetImageRequest(name=den), metadata=md)).image
            assert unchanged.title == "Den" and list(unchanged.tags) == []
            assert unchanged.uri

            # Soft delete hides; undelete restores; purge removes row and blob.
            deleted = (await stub.DeleteImage(L.DeleteImageRequest(name=den), metadata=md)).image
            assert deleted.HasField("delete_time") and not deleted.uri
            assert den not in await names(stub)
            assert den in await names(stub, show_deleted=True)
            await stub.UndeleteImage(L.UndeleteImageRequest(name=den), metadata=md)
            assert den in await names(stub)
            keys_before = set(await list_bucket_keys(s3_endpoint, s3_bucket))
            await stub.PurgeImage(L.PurgeImageRequest(name=den), metadata=md)
            keys_after = set(await list_bucket_keys(s3_endpoint, s3_bucket))
            assert len(keys_before - keys_after) == 1
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.GetImage(L.GetImageRequest(name=den), metadata=md)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND

            fresh = await stub.GetImageUrl(L.GetImageUrlRequest(name=fox), metadata=md)
            async with httpx.AsyncClient(trust_env=False) as http:
                assert (await http.get(fresh.uri)).status_code == 200
            assert fresh.mime_type == "image/png"

            # Another user sees none of it: every call on alice's ids is NOT_FOUND.
            other = metadata("bob")
            calls = [
                stub.GetImage(L.GetImageRequest(name=fox), metadata=other),
                stub.UpdateImage(
                    L.UpdateImageRequest(image=common_pb2.Image(name=fox, title="x")),
                    metadata=other,
                ),
                stub.DeleteImage(L.DeleteImageRequest(name=fox), metadata=other),
                stub.UndeleteImage(L.UndeleteImageRequest(name=fox), metadata=other),
                stub.PurgeImage(L.PurgeImageRequest(name=fox), metadata=other),
                stub.GetImageUrl(L.GetImageUrlRequest(name=fox), metadata=other),
                stub.GetImageLineage(L.GetImageLineageRequest(name=fox), metadata=other),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await call
                assert denied.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                async for _ in stub.DownloadImage(L.DownloadImageRequest(name=fox), metadata=other):
                    pass
            assert denied.value.code() == grpc.StatusCode.NOT_FOUND
            assert (await stub.GetImage(L.GetImageRequest(name=fox), metadata=md)).image.title == ""


async def test_lineage_of_an_edit_chain(tmp_path: Path, database_url: str) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        port = server.grpc_port
        root = await make(port, "a lighthouse")
        first = await make(port, "sepia", sources=[common_pb2.ImageSource(image=root)])
        second = await make(port, "add a border", sources=[common_pb2.ImageSource(image=first)])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            stub = library_pb2_grpc.ImageLibraryServiceStub(ch)
            middle = await stub.GetImageLineage(
                L.GetImageLineageRequest(name=first), metadata=metadata()
            )
            assert [(e.image.name, e.depth) for e in middle.ancestors] == [(root, 1)]
            assert [(e.image.name, e.depth) for e in middle.descendants] == [(second, 1)]
            assert list(middle.image.parents) == [root]
            top = await stub.GetImageLineage(
                L.GetImageLineageRequest(name=root), metadata=metadata()
            )
            assert [(e.image.name, e.depth) for e in top.descendants] == [(first, 1), (second, 2)]
            short = await stub.GetImageLineage(
                L.GetImageLineageRequest(name=root, max_depth=1), metadata=metadata()
            )
            assert [e.image.name for e in short.descendants] == [first] and short.truncated


@pytest.mark.parametrize(
    ("fmt", "pil_name"),
    [
        (common_pb2.IMAGE_FORMAT_PNG, "PNG"),
        (common_pb2.IMAGE_FORMAT_JPEG, "JPEG"),
        (common_pb2.IMAGE_FORMAT_WEBP, "WEBP"),
    ],
)
async def test_download_streams_a_large_image_in_chunks(
    tmp_path: Path, database_url: str, fmt: int, pil_name: str
) -> None:
    noise = Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    env = {"IMAGEGEN_DOWNLOAD_CHUNK_BYTES": str(256 * 1024)}
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        big = await make(
            server.grpc_port, "upscale", sources=[common_pb2.ImageSource(data=buffer.getvalue())]
        )
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as ch:
            stub = library_pb2_grpc.ImageLibraryServiceStub(ch)
            chunks = [
                m
                async for m in stub.DownloadImage(
                    L.DownloadImageRequest(name=big, format=fmt), metadata=metadata()
                )
            ]
    assert len(chunks) > 2
    assert all(len(c.data) <= 256 * 1024 for c in chunks)
    assert chunks[0].HasField("metadata") and not any(c.HasField("metadata") for c in chunks[1:])
    data = b"".join(c.data for c in chunks)
    assert chunks[0].metadata.size_bytes == len(data)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pil_name and image.size == (2048, 2048)


async def test_storage_quota_at_its_edge_and_freed_by_purge(
    tmp_path: Path, database_url: str
) -> None:
    import json

    async with serve_in_process(tmp_path / "probe", database_url) as server:
        first = await make(server.grpc_port, "a quota probe", seed=7)
    conn = await asyncpg.connect(database_url)
    try:
        size = await conn.fetchval("SELECT size_bytes FROM images")
    finally:
        await conn.close()
    plans = tmp_path / "plans.json"
    # Room for exactly two images of this size (the same prompt renders the same bytes).
    plans.write_text(
        json.dumps({"plans": {"free": {"storage_bytes": size * 2, "monthly_credits": 100}}})
    )
    # The probe's data directory again: the same C2PA signer, so the same marks' size.
    async with serve_in_process(
        tmp_path / "probe", database_url, env={"IMAGEGEN_PLANS_FILE": str(plans)}
    ) as server:
        port = server.grpc_port
        await make(port, "a quota probe", seed=7)  # exactly at the quota: accepted
        from tests.integration.test_pipeline import generate

        events, err = await generate(
            port,
            common_pb2.GenerationSpec(
                prompt="a quota probe", seed=7, size=common_pb2.ImageSize(width=256, height=256)
            ),
        )
        # At the quota: refused at submit, before a job exists.
        assert events == []
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(err) == "IMG_008"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            stub = library_pb2_grpc.ImageLibraryServiceStub(ch)
            await stub.PurgeImage(L.PurgeImageRequest(name=first), metadata=metadata())
        again = await run(
            port,
            common_pb2.GenerationSpec(
                prompt="a quota probe", seed=7, size=common_pb2.ImageSize(width=256, height=256)
            ),
        )
        assert again[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED


async def test_paging_150_images_returns_each_once_in_order_while_new_ones_arrive(
    tmp_path: Path, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # 100 images of alice's and 50 of bob's, a second apart, some sharing a timestamp.
        await conn.execute(
            """
            INSERT INTO images (id, user_id, storage_key, mime_type, width, height, size_bytes,
                                provider, prompt, created_at)
            SELECT gen_random_uuid(), CASE WHEN n % 3 = 0 THEN 'bob' ELSE 'alice' END,
                   'generated/seed/' || n || '.png', 'image/png', 64, 64, 100, 'local',
                   'seeded image ' || n,
                   timestamptz '2026-01-01' + make_interval(secs => n / 2)
              FROM generate_series(1, 150) AS n
            """
        )
        expected = [
            f"images/{r['id']}"
            for r in await conn.fetch(
                "SELECT id FROM images WHERE user_id = 'alice' ORDER BY created_at DESC, id DESC"
            )
        ]
    finally:
        await conn.close()
    assert len(expected) == 100
    async with serve_in_process(tmp_path, database_url) as server:
        port = server.grpc_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            stub = library_pb2_grpc.ImageLibraryServiceStub(ch)
            seen: list[str] = []
            token = ""
            pages = 0
            while True:
                page = await stub.ListImages(
                    L.ListImagesRequest(page_size=20, page_token=token), metadata=metadata()
                )
                pages += 1
                seen += [i.name for i in page.images]
                if pages == 2:
                    # New images arrive mid-way; they are newer than the cursor.
                    await make(port, "arrives while paging")
                token = page.next_page_token
                if not token:
                    break
    assert seen[:20] == expected[:20]
    assert seen == expected, "each of the owner's images exactly once, in order"
    assert pages == 5
