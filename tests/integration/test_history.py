"""Uploads and history through a real server in this process: edit sources and masks
kept as the caller's library images, jobs read back as the same resource from
GetGeneration and ListGenerations (images, full spec, duration, credits), reruns of
edits, and a job whose source vanished before it ran (issue 9 items 5 and 6)."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from imagegen.v1 import common_pb2, generation_pb2, library_pb2

from imagegen.providers.local import MODEL as LOCAL_MODEL
from tests.fakes.forge_server import ForgeFake, Reply
from tests.fakes.openai_server import OpenAIFake
from tests.inprocess import UNLIMITED_PLANS, serve_in_process
from tests.integration.callers import Stubs, caller, completed, error_info
from tests.integration.test_edits import noise_png, png
from tests.integration.test_pipeline import CHANNEL_OPTIONS, reason_of

E = generation_pb2
L = library_pb2


def without_urls(generation: E.Generation) -> E.Generation:
    """The job with its signed URLs (fresh on every read) cleared."""
    copy = E.Generation()
    copy.CopyFrom(generation)
    for image in copy.images:
        image.ClearField("uri")
        image.ClearField("uri_expire_time")
    return copy


async def test_sources_and_mask_are_kept_as_the_callers_uploads(
    tmp_path: Path, database_url: str
) -> None:
    source, mask = png(40, 30), png(40, 30, (0, 0, 0))
    async with OpenAIFake.start() as fake:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.url}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                alice = Stubs(channel, "alice", "team-a")
                spec = common_pb2.GenerationSpec(
                    prompt="add a hat",
                    provider="openai",
                    size=common_pb2.ImageSize(width=1024, height=1024),
                    sources=[common_pb2.ImageSource(data=source)],
                    mask=common_pb2.ImageSource(
                        uri="data:image/png;base64," + base64.b64encode(mask).decode()
                    ),
                )
                job_name = completed(await alice.generate(spec))
                job = await alice.get(job_name)

                uploads = await alice.images(kind=L.IMAGE_KIND_UPLOAD)
                by_name = {i.name: i for i in uploads}
                assert len(uploads) == 2, "the source and the mask are the caller's uploads"
                source_name = job.spec.sources[0].image
                mask_name = job.spec.mask.image
                assert set(by_name) == {source_name, mask_name}
                for upload, data in ((by_name[source_name], source), (by_name[mask_name], mask)):
                    assert upload.upload and not upload.edit
                    assert upload.generation == job_name
                    assert upload.prompt == "add a hat"
                    assert upload.size_bytes == len(data)
                    assert upload.credits == 0 and not upload.HasField("generation_duration")
                    assert upload.sub_account == "team-a"
                    assert upload.uri, "an upload is fetched like any library image"
                    async with httpx.AsyncClient(trust_env=False) as http:
                        assert (await http.get(upload.uri)).content == data

                # The provider was sent exactly those bytes.
                call = fake.calls[0]
                assert call.is_edit and call.images == [source] and call.mask == mask

                (result,) = job.images
                assert list(result.parents) == [source_name], "the mask is not a parent"
                assert result.edit and not result.upload
                assert result.credits == job.credits > 0
                # The time its provider call took, as recorded with the image (no test
                # asserts how long that was).
                conn = await asyncpg.connect(database_url)
                try:
                    recorded = await conn.fetchval(
                        "SELECT generation_duration FROM images WHERE id = $1",
                        uuid.UUID(result.name.removeprefix("images/")),
                    )
                finally:
                    await conn.close()
                assert result.HasField("generation_duration")
                assert result.generation_duration.ToTimedelta() == recorded
                assert result.sub_account == "team-a"
                assert job.edit and job.sub_account == "team-a"
                assert job.HasField("duration")

                assert [i.name for i in await alice.images(kind=L.IMAGE_KIND_GENERATED)] == [
                    result.name
                ]
                assert [i.name for i in await alice.images(kind=L.IMAGE_KIND_EDIT)] == [result.name]
                assert await alice.images(kind=L.IMAGE_KIND_ORIGINAL) == []
                assert {i.name for i in await alice.images()} == {
                    result.name,
                    source_name,
                    mask_name,
                }

                # The same content again reuses the caller's upload; another user's is theirs.
                again = await alice.get(completed(await alice.generate(spec)))
                assert again.spec.sources[0].image == source_name
                assert again.spec.mask.image == mask_name
                assert len(await alice.images(kind=L.IMAGE_KIND_UPLOAD)) == 2
                bob = Stubs(channel, "bob")
                bobs = await bob.get(completed(await bob.generate(spec)))
                assert bobs.spec.sources[0].image not in by_name


async def test_an_upload_counts_toward_the_storage_quota(tmp_path: Path, database_url: str) -> None:
    source = noise_png(96, 96)
    spec = common_pb2.GenerationSpec(
        prompt="grayscale", sources=[common_pb2.ImageSource(data=source)]
    )
    # How many bytes the result of this edit takes, made by someone else first.
    async with serve_in_process(tmp_path, database_url) as server:
        async with caller(server.grpc_port, "probe") as probe:
            probe_job = await probe.get(completed(await probe.generate(spec)))
    result_bytes = probe_job.images[0].size_bytes
    # Room for the result and the upload together, less one byte.
    plans = json.loads(UNLIMITED_PLANS.read_text())
    plans["plans"]["free"]["storage_bytes"] = result_bytes + len(source) - 1
    plans_file = tmp_path / "quota.json"
    plans_file.write_text(json.dumps(plans))
    async with serve_in_process(
        tmp_path, database_url, env={"IMAGEGEN_PLANS_FILE": str(plans_file)}
    ) as server:
        async with caller(server.grpc_port, "alice") as alice:
            try:
                events = await alice.generate(spec)
            except grpc.aio.AioRpcError as refused:
                # Refused at submit: the upload alone already leaves too little room.
                assert reason_of(refused) == "IMG_008"
            else:
                assert events[-1].type == E.GENERATION_EVENT_TYPE_FAILED
                assert events[-1].error.code == "IMG_008"
            assert await alice.images(kind=L.IMAGE_KIND_GENERATED) == []


async def test_get_and_list_return_the_same_jobs_with_images_and_full_spec(
    tmp_path: Path, database_url: str
) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        async with caller(server.grpc_port) as alice:
            text = completed(
                await alice.generate(
                    common_pb2.GenerationSpec(
                        prompt="three foxes",
                        count=3,
                        size=common_pb2.ImageSize(width=256, height=256),
                        model=LOCAL_MODEL,
                        seed=7,
                    )
                )
            )
            first = await alice.get(text)
            kept, deleted, purged = (i.name for i in first.images)
            await alice.lib.DeleteImage(L.DeleteImageRequest(name=deleted), metadata=alice.md)
            await alice.lib.PurgeImage(L.PurgeImageRequest(name=purged), metadata=alice.md)
            edit = completed(
                await alice.generate(
                    common_pb2.GenerationSpec(
                        prompt="grayscale", sources=[common_pb2.ImageSource(image=kept)]
                    )
                )
            )

            listed = await alice.listed()
            assert [g.name for g in listed] == [edit, text]
            for from_list in listed:
                from_get = await alice.get(from_list.name)
                assert without_urls(from_list) == without_urls(from_get)

            text_job, edit_job = listed[1], listed[0]
            assert [i.name for i in text_job.images] == [kept, deleted], "a purged one is gone"
            assert text_job.images[0].uri and not text_job.images[0].HasField("delete_time")
            assert text_job.images[1].uri == "" and text_job.images[1].HasField("delete_time")
            assert text_job.spec.model == LOCAL_MODEL and text_job.spec.seed == 7
            assert text_job.spec.count == 3 and not text_job.edit
            # Each image carries its share of the job's charge (the purged one's too).
            assert [i.credits for i in text_job.images] == [text_job.credits // 3] * 2
            assert list(edit_job.spec.sources) == [common_pb2.ImageSource(image=kept)]
            assert [list(i.parents) for i in edit_job.images] == [[kept]]
            assert edit_job.edit and edit_job.HasField("duration")

            # Another user's job is NOT_FOUND and not listed.
            async with caller(server.grpc_port, "bob") as bob:
                assert await bob.listed() == []
                with pytest.raises(grpc.aio.AioRpcError) as hidden:
                    await bob.get(text)
                assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_edit_reruns_on_the_same_library_images(tmp_path: Path, database_url: str) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        async with caller(server.grpc_port) as alice:
            # No size: the edit keeps its source's 64x64, which is not an offered size.
            original = await alice.get(
                completed(
                    await alice.generate(
                        common_pb2.GenerationSpec(
                            prompt="invert", sources=[common_pb2.ImageSource(data=png(64, 64))]
                        )
                    )
                )
            )
            assert (original.spec.size.width, original.spec.size.height) == (64, 64)
            upload = original.spec.sources[0].image

            rerun = (
                await alice.gen.RerunGeneration(
                    E.RerunGenerationRequest(name=original.name), metadata=alice.md
                )
            ).generation
            assert rerun.name != original.name
            assert list(rerun.spec.sources) == [common_pb2.ImageSource(image=upload)]
            done = await alice.wait(rerun.name)
            assert done.state == E.GENERATION_STATE_COMPLETED
            assert [list(i.parents) for i in done.images] == [[upload]]
            assert (done.images[0].width, done.images[0].height) == (64, 64)
            assert len(await alice.images(kind=L.IMAGE_KIND_UPLOAD)) == 1, "no second upload"

            # A soft-deleted source must be undeleted first; a purged one is named.
            await alice.lib.DeleteImage(L.DeleteImageRequest(name=upload), metadata=alice.md)
            with pytest.raises(grpc.aio.AioRpcError) as deleted:
                await alice.gen.RerunGeneration(
                    E.RerunGenerationRequest(name=original.name), metadata=alice.md
                )
            assert deleted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(deleted.value).metadata["image"] == upload
            await alice.lib.PurgeImage(L.PurgeImageRequest(name=upload), metadata=alice.md)
            with pytest.raises(grpc.aio.AioRpcError) as purged:
                await alice.gen.RerunGeneration(
                    E.RerunGenerationRequest(name=original.name), metadata=alice.md
                )
            assert purged.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason_of(purged.value) == "IMG_003"
            assert upload in (purged.value.details() or "")
            assert len(await alice.listed()) == 2, "refused reruns made no job"


async def test_a_job_whose_source_was_purged_before_it_ran_fails_img_003(
    tmp_path: Path, database_url: str
) -> None:
    async with ForgeFake.start() as fake:
        # One worker, held by a slow job, so the edit waits queued while its source goes.
        fake.script(Reply.slow(60))
        env = {
            "BUILT_IN_FORGE_API_URL": fake.url,
            "BUILT_IN_FORGE_API_KEY": "k",
            "IMAGEGEN_WORKERS": "1",
        }
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with caller(server.grpc_port) as alice:
                blocker = (
                    await alice.gen.SubmitGeneration(
                        E.SubmitGenerationRequest(
                            spec=common_pb2.GenerationSpec(prompt="slow", provider="forge")
                        ),
                        metadata=alice.md,
                    )
                ).generation
                await fake.requests.wait_for(1)
                edit = (
                    await alice.gen.SubmitGeneration(
                        E.SubmitGenerationRequest(
                            spec=common_pb2.GenerationSpec(
                                prompt="sky to pink",
                                provider="forge",
                                sources=[common_pb2.ImageSource(data=png(32, 32))],
                            )
                        ),
                        metadata=alice.md,
                    )
                ).generation
                upload = edit.spec.sources[0].image
                await alice.lib.PurgeImage(L.PurgeImageRequest(name=upload), metadata=alice.md)
                await alice.gen.CancelGeneration(
                    E.CancelGenerationRequest(name=blocker.name), metadata=alice.md
                )
                failed = await alice.wait(edit.name)
    assert failed.state == E.GENERATION_STATE_FAILED
    assert failed.error.code == "IMG_003"
    assert upload in failed.error.message
    assert "sources/" not in failed.error.message, "no storage key in the message"
    assert len(fake.requests) == 1, "the provider was never called for the edit"


async def test_a_job_stored_before_uploads_shows_and_reruns_its_source(
    tmp_path: Path, database_url: str
) -> None:
    source = png(48, 48)
    async with serve_in_process(tmp_path, database_url) as server:
        async with caller(server.grpc_port) as alice:
            job = await alice.get(
                completed(
                    await alice.generate(
                        common_pb2.GenerationSpec(
                            prompt="mirror", sources=[common_pb2.ImageSource(data=source)]
                        )
                    )
                )
            )
            # As a job submitted before migration 0004 stored it: the source under
            # `sources/` in its spec, with no library image.
            upload_id = uuid.UUID(job.spec.sources[0].image.removeprefix("images/"))
            conn = await asyncpg.connect(database_url)
            try:
                async with conn.transaction():
                    key = await conn.fetchval(
                        "DELETE FROM images WHERE id = $1 RETURNING storage_key", upload_id
                    )
                    await conn.execute(
                        "UPDATE generations SET spec = jsonb_set(spec, '{sources,0,image_id}', "
                        "'\"\"') WHERE id = $1",
                        uuid.UUID(job.name.removeprefix("generations/")),
                    )
            finally:
                await conn.close()
            assert key.startswith("sources/")

            old = await alice.get(job.name)
            (shown,) = old.spec.sources
            assert shown.WhichOneof("source") == "uri", "a signed URL, never the data"
            async with httpx.AsyncClient(trust_env=False) as http:
                assert (await http.get(shown.uri)).content == source

            rerun = (
                await alice.gen.RerunGeneration(
                    E.RerunGenerationRequest(name=job.name), metadata=alice.md
                )
            ).generation
            done = await alice.wait(rerun.name)
            assert done.state == E.GENERATION_STATE_COMPLETED
            (upload,) = await alice.images(kind=L.IMAGE_KIND_UPLOAD)
            assert list(done.spec.sources) == [common_pb2.ImageSource(image=upload.name)]
            assert upload.generation == rerun.name and upload.size_bytes == len(source)


async def test_a_word_search_keeps_the_kind_filter_and_the_parents(
    tmp_path: Path, database_url: str
) -> None:
    # A word search takes another statement (LIST_IMAGES_TEXT_SQL) than a plain page:
    # the kinds and the parents must come out the same through it.
    async with serve_in_process(tmp_path, database_url) as server:
        async with caller(server.grpc_port) as alice:
            original = await alice.get(
                completed(
                    await alice.generate(common_pb2.GenerationSpec(prompt="a lighthouse at dusk"))
                )
            )
            edit = await alice.get(
                completed(
                    await alice.generate(
                        common_pb2.GenerationSpec(
                            prompt="grayscale lighthouse",
                            sources=[common_pb2.ImageSource(data=noise_png(64, 64))],
                        )
                    )
                )
            )
            upload = edit.spec.sources[0].image
            for word in ("", "lighthouse"):
                by_kind = {
                    kind: [i.name for i in await alice.images(query=word, kind=kind)]
                    for kind in (
                        L.IMAGE_KIND_ORIGINAL,
                        L.IMAGE_KIND_EDIT,
                        L.IMAGE_KIND_UPLOAD,
                        L.IMAGE_KIND_GENERATED,
                    )
                }
                assert by_kind[L.IMAGE_KIND_ORIGINAL] == [original.images[0].name], word
                assert by_kind[L.IMAGE_KIND_EDIT] == [edit.images[0].name], word
                if word == "":
                    assert by_kind[L.IMAGE_KIND_UPLOAD] == [upload]
                assert upload not in by_kind[L.IMAGE_KIND_GENERATED], word
                listed = {i.name: i for i in await alice.images(query=word)}
                assert list(listed[edit.images[0].name].parents) == [upload], word


async def test_a_fetched_source_is_kept_as_the_callers_upload_and_the_parent(
    tmp_path: Path, database_url: str
) -> None:
    from aiohttp import web

    body = png(90, 30)
    fetches: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        fetches.append(request.path_qs)
        return web.Response(body=body, content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/cat.png?token=secret"
    try:
        env = {"IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1"}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with caller(server.grpc_port) as alice:
                spec = common_pb2.GenerationSpec(
                    prompt="flip", sources=[common_pb2.ImageSource(uri=url)]
                )
                job = await alice.get(completed(await alice.generate(spec)))
                (upload,) = await alice.images(kind=L.IMAGE_KIND_UPLOAD)
                assert upload.upload and upload.generation == job.name
                assert upload.size_bytes == len(body)
                async with httpx.AsyncClient(trust_env=False) as http:
                    assert (await http.get(upload.uri)).content == body
                # The job names the library image, never the URL it came from.
                assert list(job.spec.sources) == [common_pb2.ImageSource(image=upload.name)]
                assert "secret" not in str(job)
                (result,) = job.images
                assert list(result.parents) == [upload.name] and result.edit
                assert job.edit

                # Rerun uses the kept upload: nothing is fetched or stored again.
                rerun = (
                    await alice.gen.RerunGeneration(
                        E.RerunGenerationRequest(name=job.name), metadata=alice.md
                    )
                ).generation
                done = await alice.wait(rerun.name)
                assert done.state == E.GENERATION_STATE_COMPLETED
                assert [list(i.parents) for i in done.images] == [[upload.name]]
                assert len(await alice.images(kind=L.IMAGE_KIND_UPLOAD)) == 1
                assert fetches == ["/cat.png?token=secret"], "fetched once, for the first job"
    finally:
        await runner.cleanup()
