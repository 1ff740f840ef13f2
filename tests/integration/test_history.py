"""Uploads through a real server in this process: edit sources and masks kept as the
caller's library images, counted in their storage quota (issue 9 item 5)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import httpx
from imagegen.v1 import common_pb2, generation_pb2, library_pb2

from tests.fakes.openai_server import OpenAIFake
from tests.inprocess import UNLIMITED_PLANS, serve_in_process
from tests.integration.callers import Stubs, caller, completed
from tests.integration.test_edits import noise_png, png
from tests.integration.test_pipeline import CHANNEL_OPTIONS, reason_of

E = generation_pb2
L = library_pb2


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

                uploads = await alice.images(kind=L.IMAGE_KIND_UPLOAD)
                assert len(uploads) == 2, "the source and the mask are the caller's uploads"
                by_bytes: dict[bytes, common_pb2.Image] = {}
                for upload in uploads:
                    assert upload.upload and not upload.edit
                    assert upload.generation == job_name
                    assert upload.prompt == "add a hat"
                    assert upload.sub_account == "team-a"
                    assert upload.credits == 0 and not upload.HasField("generation_duration")
                    assert upload.uri, "an upload is fetched like any library image"
                    async with httpx.AsyncClient(trust_env=False) as http:
                        by_bytes[(await http.get(upload.uri)).content] = upload
                assert set(by_bytes) == {source, mask}
                assert by_bytes[source].size_bytes == len(source)
                source_name, mask_name = by_bytes[source].name, by_bytes[mask].name

                # The provider was sent exactly those bytes.
                call = fake.calls[0]
                assert call.is_edit and call.images == [source] and call.mask == mask

                (result,) = await alice.images(kind=L.IMAGE_KIND_GENERATED)
                assert list(result.parents) == [source_name], "the mask is not a parent"
                assert result.edit and not result.upload
                assert [i.name for i in await alice.images(kind=L.IMAGE_KIND_EDIT)] == [result.name]
                assert await alice.images(kind=L.IMAGE_KIND_ORIGINAL) == []
                assert {i.name for i in await alice.images()} == {
                    result.name,
                    source_name,
                    mask_name,
                }

                # The same content again reuses the caller's upload; another user's is theirs.
                completed(await alice.generate(spec))
                assert {i.name for i in await alice.images(kind=L.IMAGE_KIND_UPLOAD)} == {
                    source_name,
                    mask_name,
                }
                bob = Stubs(channel, "bob")
                completed(await bob.generate(spec))
                bobs = await bob.images(kind=L.IMAGE_KIND_UPLOAD)
                assert len(bobs) == 2 and not {i.name for i in bobs} & {source_name, mask_name}


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
