"""Each RPC of ImageLibraryService does what its comment in library.proto says, for the
cases where it once did not (issue 9 item 7): a soft-deleted image is not downloaded,
URL'd or changed (FAILED_PRECONDITION), `ttl=0` gives the maximum, a purge whose bytes
cannot be removed keeps the image, and a replayed watch signs no deleted image."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from imagegen.v1 import common_pb2, generation_pb2, library_pb2

from imagegen.domain.errors import StorageFailed
from imagegen.storage.local import LocalBlobStore
from tests.inprocess import serve_in_process
from tests.integration.callers import Stubs, completed, error_info
from tests.integration.test_pipeline import CHANNEL_OPTIONS, reason_of

E = generation_pb2
L = library_pb2
URL_TTL = 600


async def make_image(alice: Stubs) -> str:
    job = await alice.get(
        completed(
            await alice.generate(
                common_pb2.GenerationSpec(
                    prompt="a quiet harbour", size=common_pb2.ImageSize(width=256, height=256)
                )
            )
        )
    )
    return job.images[0].name


async def download(alice: Stubs, name: str) -> bytes:
    chunks = [
        c
        async for c in alice.lib.DownloadImage(L.DownloadImageRequest(name=name), metadata=alice.md)
    ]
    return b"".join(c.data for c in chunks)


async def test_a_soft_deleted_image_is_not_downloaded_linked_or_changed(
    tmp_path: Path, database_url: str
) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            alice = Stubs(channel)
            name = await make_image(alice)
            before = await download(alice, name)
            await alice.lib.DeleteImage(L.DeleteImageRequest(name=name), metadata=alice.md)

            refusals = {
                "DownloadImage": download(alice, name),
                "GetImageUrl": alice.lib.GetImageUrl(
                    L.GetImageUrlRequest(name=name), metadata=alice.md
                ),
                "UpdateImage": alice.lib.UpdateImage(
                    L.UpdateImageRequest(
                        image=common_pb2.Image(name=name, title="renamed in the bin"),
                        update_mask=field_mask_pb2.FieldMask(paths=["title"]),
                    ),
                    metadata=alice.md,
                ),
            }
            for rpc, call in refusals.items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, rpc
                info = error_info(refused.value)
                assert (info.reason, info.metadata["image"]) == ("IMG_003", name), rpc
                assert "undelete" in (refused.value.details() or ""), rpc

            image = (
                await alice.lib.GetImage(L.GetImageRequest(name=name), metadata=alice.md)
            ).image
            assert image.title == "" and image.HasField("delete_time"), "nothing changed"

            # Restored, every one of them works again.
            await alice.lib.UndeleteImage(L.UndeleteImageRequest(name=name), metadata=alice.md)
            assert await download(alice, name) == before
            url = await alice.lib.GetImageUrl(L.GetImageUrlRequest(name=name), metadata=alice.md)
            assert url.uri
            renamed = await alice.lib.UpdateImage(
                L.UpdateImageRequest(
                    image=common_pb2.Image(name=name, title="back"),
                    update_mask=field_mask_pb2.FieldMask(paths=["title"]),
                ),
                metadata=alice.md,
            )
            assert renamed.image.title == "back"

            # Another user's image stays NOT_FOUND, deleted or not.
            bob = Stubs(channel, "bob")
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await bob.lib.GetImageUrl(L.GetImageUrlRequest(name=name), metadata=bob.md)
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


def ttl(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


async def test_url_ttl_zero_unset_or_too_long_gives_the_maximum(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_URL_TTL": str(URL_TTL)}
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            alice = Stubs(channel)
            name = await make_image(alice)

            async def lifetime(request: L.GetImageUrlRequest) -> float:
                asked = time.time()
                reply = await alice.lib.GetImageUrl(request, metadata=alice.md)
                assert reply.uri
                return reply.expire_time.ToSeconds() - asked

            for request in (
                L.GetImageUrlRequest(name=name),
                L.GetImageUrlRequest(name=name, ttl=ttl(0)),
                L.GetImageUrlRequest(name=name, ttl=ttl(URL_TTL + 1)),
            ):
                # Within a few seconds of the maximum (the clock ticks between the calls).
                assert URL_TTL - 5 <= await lifetime(request) <= URL_TTL + 1
            assert 55 <= await lifetime(L.GetImageUrlRequest(name=name, ttl=ttl(60))) <= 61
            # A fraction of a second is rounded up to a whole one, not refused.
            half_second = L.GetImageUrlRequest(name=name, ttl=ttl(0, 500_000_000))
            assert 0 <= await lifetime(half_second) <= 2
            with pytest.raises(grpc.aio.AioRpcError) as negative:
                await alice.lib.GetImageUrl(
                    L.GetImageUrlRequest(name=name, ttl=ttl(-1)), metadata=alice.md
                )
            assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason_of(negative.value) == "IMG_003"


async def test_a_purge_whose_bytes_cannot_be_removed_keeps_the_image(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            alice = Stubs(channel)
            name = await make_image(alice)
            before = await download(alice, name)

            async def storage_down(self: LocalBlobStore, key: str) -> None:
                raise StorageFailed("deleting the image from local storage failed: injected")

            with monkeypatch.context() as patched:
                patched.setattr(LocalBlobStore, "delete", storage_down)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await alice.lib.PurgeImage(L.PurgeImageRequest(name=name), metadata=alice.md)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(failed.value) == "IMG_004"
            kept = await alice.lib.GetImage(L.GetImageRequest(name=name), metadata=alice.md)
            assert kept.image.uri and await download(alice, name) == before

            # Retried once storage is back, it goes for good.
            await alice.lib.PurgeImage(L.PurgeImageRequest(name=name), metadata=alice.md)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await alice.lib.GetImage(L.GetImageRequest(name=name), metadata=alice.md)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_replayed_watch_signs_no_deleted_image(tmp_path: Path, database_url: str) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            alice = Stubs(channel)
            job_name = completed(
                await alice.generate(
                    common_pb2.GenerationSpec(
                        prompt="two boats",
                        count=2,
                        size=common_pb2.ImageSize(width=256, height=256),
                    )
                )
            )
            job = await alice.get(job_name)
            deleted, purged = (i.name for i in job.images)
            await alice.lib.DeleteImage(L.DeleteImageRequest(name=deleted), metadata=alice.md)
            await alice.lib.PurgeImage(L.PurgeImageRequest(name=purged), metadata=alice.md)

            replay = [
                r.event
                async for r in alice.gen.WatchGeneration(
                    E.WatchGenerationRequest(name=job_name), metadata=alice.md, timeout=30
                )
            ]
    ready = [e for e in replay if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY]
    assert len(ready) == 2, "the log keeps both events"
    shown = {e.image.name: e.image for e in ready if e.HasField("image")}
    assert set(shown) == {deleted}, "a purged image is gone from its event"
    assert shown[deleted].uri == "" and shown[deleted].HasField("delete_time")
    assert not shown[deleted].HasField("uri_expire_time")
