"""Any JWT subject works: generate, edit, list, download, delete and purge over real gRPC,
with the local blob store and with S3, for every form of `sub` identity providers issue
(and pairs that an encoding might fold together, which must stay apart), each also as
the token's sub-account, which the images carry back."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import httpx
import pytest
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
)
from PIL import Image

from imagegen.identity import mint_token
from imagegen.storage.keys import user_segment
from tests.conftest import list_bucket_keys
from tests.inprocess import TEST_JWT_KEY, serve_in_process
from tests.integration.test_edits import png
from tests.integration.test_pipeline import CHANNEL_OPTIONS
from tests.subjects import LOOKALIKE_PAIRS, SUBJECTS

E = generation_pb2
L = library_pb2


def md(user: str) -> tuple[tuple[str, str], ...]:
    # The subject is its own sub-account too: that claim takes any text a `sub` may.
    token = mint_token(TEST_JWT_KEY, user_id=user, sub_account=user)
    return (("authorization", f"Bearer {token}"),)


def twin_of(user: str) -> str:
    """The subject this one must never see the images of (its lookalike, else another)."""
    for first, second in LOOKALIKE_PAIRS:
        if user == first:
            return second
        if user == second:
            return first
    return SUBJECTS[(SUBJECTS.index(user) + 1) % len(SUBJECTS)]


async def generate(channel: grpc.aio.Channel, user: str, spec: common_pb2.GenerationSpec) -> str:
    stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
    events = [
        r.event
        async for r in stub.GenerateImage(E.GenerateImageRequest(spec=spec), metadata=md(user))
    ]
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED, (user, events[-1])
    return next(e.image.name for e in events if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY)


async def download(library: library_pb2_grpc.ImageLibraryServiceStub, user: str, name: str):
    chunks = [
        r async for r in library.DownloadImage(L.DownloadImageRequest(name=name), metadata=md(user))
    ]
    return chunks[0].metadata, b"".join(c.data for c in chunks)


async def status_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def walk_one_subject(channel: grpc.aio.Channel, user: str) -> list[str]:
    """The whole path for one subject; returns the names of the images it made."""
    library = library_pb2_grpc.ImageLibraryServiceStub(channel)
    made = await generate(
        channel,
        user,
        common_pb2.GenerationSpec(
            prompt=f"a lighthouse for {user[:40]}", size=common_pb2.ImageSize(width=256, height=256)
        ),
    )
    # An uploaded source is stored under the user's folder too (sources/...).
    edited = await generate(
        channel,
        user,
        common_pb2.GenerationSpec(
            prompt="grayscale", sources=[common_pb2.ImageSource(data=png(64, 48))]
        ),
    )
    listed = await library.ListImages(L.ListImagesRequest(page_size=100), metadata=md(user))
    names = {image.name for image in listed.images}
    assert {made, edited} <= names, user
    assert {i.sub_account for i in listed.images if i.name in (made, edited)} == {user}

    metadata, data = await download(library, user, made)
    picture = Image.open(io.BytesIO(data))
    assert picture.size == (metadata.width, metadata.height) == (256, 256)
    url = await library.GetImageUrl(L.GetImageUrlRequest(name=edited), metadata=md(user))
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(url.uri)
    assert reply.status_code == 200, (user, reply.text)
    assert Image.open(io.BytesIO(reply.content)).size == (64, 48)

    # Nobody else, not even a lookalike, reaches these images.
    other = twin_of(user)
    for name in (made, edited):
        assert (
            await status_of(library.GetImage(L.GetImageRequest(name=name), metadata=md(other)))
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await status_of(download(library, other, name))  # type: ignore[arg-type]
            == grpc.StatusCode.NOT_FOUND
        )

    await library.DeleteImage(L.DeleteImageRequest(name=made), metadata=md(user))
    after_delete = await library.ListImages(L.ListImagesRequest(page_size=100), metadata=md(user))
    assert made not in {image.name for image in after_delete.images}
    return [made, edited]


async def purge_all(channel: grpc.aio.Channel, user: str) -> None:
    library = library_pb2_grpc.ImageLibraryServiceStub(channel)
    listed = await library.ListImages(
        L.ListImagesRequest(page_size=100, show_deleted=True), metadata=md(user)
    )
    for image in listed.images:
        await library.PurgeImage(L.PurgeImageRequest(name=image.name), metadata=md(user))
    left = await library.ListImages(
        L.ListImagesRequest(page_size=100, show_deleted=True), metadata=md(user)
    )
    assert not left.images, user


def generated_keys_of(keys: list[str], user: str) -> list[str]:
    return [k for k in keys if k.startswith(f"generated/{user_segment(user)}/")]


@pytest.mark.parametrize("store", ["local", "s3"])
async def test_every_subject_walks_the_whole_path(
    store: str, tmp_path: Path, database_url: str, s3_endpoint: str, s3_bucket: str
) -> None:
    users = list(dict.fromkeys([*SUBJECTS, *(s for pair in LOOKALIKE_PAIRS for s in pair)]))
    env = {"IMAGEGEN_S3_ENDPOINT": s3_endpoint, "IMAGEGEN_S3_BUCKET": s3_bucket}
    blob_root = tmp_path / "data" / "blobs"

    async def stored_keys() -> list[str]:
        if store == "s3":
            return await list_bucket_keys(s3_endpoint, s3_bucket)
        return [
            p.relative_to(blob_root).as_posix()
            for p in blob_root.rglob("*")
            if p.is_file() and not p.name.endswith(".type")
        ]

    async with serve_in_process(tmp_path, database_url, env=env if store == "s3" else {}) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            made = dict(
                zip(
                    users,
                    await asyncio.gather(*(walk_one_subject(channel, user) for user in users)),
                    strict=True,
                )
            )
            keys = await stored_keys()
            for user in users:
                # Each user's generated blobs sit in that user's own folder, none in another's.
                assert len(generated_keys_of(keys, user)) == len(made[user]), user
            assert len([k for k in keys if k.startswith("generated/")]) == 2 * len(users)
            segments = {user_segment(user) for user in users}
            for key in keys:
                folder, segment, *_ = key.split("/")
                assert folder in ("generated", "sources") and segment in segments, key

            await asyncio.gather(*(purge_all(channel, user) for user in users))
            keys = await stored_keys()
            for user in users:
                assert generated_keys_of(keys, user) == [], user
