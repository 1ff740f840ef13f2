"""The reply-to-stored-image step inside a real server: a reply of the asked format and
size is stored with its pixel data byte for byte (only the provenance marks are added),
another size is fitted to exactly the asked one, the whole job decodes the reply once at
most (none for a pass-through), and a truncated reply or a bomb is IMG_002 with nothing
stored (the bomb never decoded)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from imagegen.v1 import common_pb2
from PIL import Image

from tests.fakes.forge_server import ForgeFake, Reply
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import assert_failed_with, fetch, forge_spec, generate
from tests.unit.test_imaging_check import encode, picture


async def stored_object(s3_endpoint: str, bucket: str, key: str) -> bytes:
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
    ) as s3:
        reply = await s3.get_object(Bucket=bucket, Key=key)
        async with reply["Body"] as body:
            data: bytes = await body.read()
            return data


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks as (type, whole chunk with its length and CRC), in file order."""
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        end = offset + 12 + length
        chunks.append((data[offset + 4 : offset + 8], data[offset:end]))
        offset = end
    return chunks


def idat_chunks(data: bytes) -> list[bytes]:
    """The IDAT chunks of a PNG, each whole."""
    return [chunk for kind, chunk in png_chunks(data) if kind == b"IDAT"]


@pytest.fixture
def forge_env(s3_endpoint: str, s3_bucket: str) -> dict[str, str]:
    return {"IMAGEGEN_S3_ENDPOINT": s3_endpoint, "IMAGEGEN_S3_BUCKET": s3_bucket}


async def run(
    tmp_path: Path, database_url: str, env: dict[str, str], reply: bytes, **spec: object
) -> tuple[list, object]:
    async with ForgeFake.start() as fake:
        fake.default = Reply(image=reply)
        full_env = {**env, "BUILT_IN_FORGE_API_URL": fake.url, "BUILT_IN_FORGE_API_KEY": "k"}
        async with serve_in_process(tmp_path, database_url, env=full_env) as server:
            return await generate(server.grpc_port, forge_spec(**spec))


async def test_a_reply_of_the_asked_format_and_size_is_stored_as_it_came(
    tmp_path: Path, database_url: str, forge_env: dict[str, str], s3_endpoint: str, s3_bucket: str
) -> None:
    reply = encode(picture(512, 512), "PNG")
    _, err = await run(tmp_path, database_url, forge_env, reply)
    assert err is None, err
    rows = await fetch(database_url, "SELECT storage_key, width, height, size_bytes FROM images")
    stored = await stored_object(s3_endpoint, s3_bucket, rows[0]["storage_key"])
    assert [(r["width"], r["height"], r["size_bytes"]) for r in rows] == [(512, 512, len(stored))]
    # The marks add metadata chunks; the header and the pixel data are the reply's own.
    assert idat_chunks(stored) == idat_chunks(reply) != []
    assert png_chunks(stored)[0] == png_chunks(reply)[0]
    kinds = [kind for kind, _ in png_chunks(stored)]
    assert b"caBX" in kinds and b"iTXt" in kinds


@pytest.mark.parametrize(("width", "height"), [(256, 256), (1024, 1536), (1536, 1024)])
async def test_another_size_is_fitted_to_exactly_the_asked_one(
    tmp_path: Path,
    database_url: str,
    forge_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    width: int,
    height: int,
) -> None:
    reply = encode(picture(1024, 1024) if width != height else picture(1536, 1024), "PNG")
    _, err = await run(
        tmp_path,
        database_url,
        forge_env,
        reply,
        size=common_pb2.ImageSize(width=width, height=height),
        format=common_pb2.IMAGE_FORMAT_WEBP,
    )
    assert err is None, err
    rows = await fetch(database_url, "SELECT storage_key, mime_type, width, height FROM images")
    assert [(r["mime_type"], r["width"], r["height"]) for r in rows] == [
        ("image/webp", width, height)
    ]
    stored = await stored_object(s3_endpoint, s3_bucket, rows[0]["storage_key"])
    with Image.open(io.BytesIO(stored)) as image:
        assert (image.format, image.size) == ("WEBP", (width, height))


async def test_a_truncated_reply_is_img_002_and_stores_nothing(
    tmp_path: Path, database_url: str, forge_env: dict[str, str]
) -> None:
    whole = encode(picture(512, 512), "PNG")
    events, err = await run(tmp_path, database_url, forge_env, whole[: len(whole) - 100])
    assert_failed_with(events, err, "IMG_002")
    assert await fetch(database_url, "SELECT id FROM images") == []


@pytest.mark.parametrize(
    ("reply_size", "asked", "fmt", "decodes"),
    [
        ((512, 512), (512, 512), common_pb2.IMAGE_FORMAT_PNG, 0),
        ((512, 512), (512, 512), common_pb2.IMAGE_FORMAT_JPEG, 1),
        ((1024, 1024), (256, 256), common_pb2.IMAGE_FORMAT_WEBP, 1),
        ((1024, 1024), (1536, 1024), common_pb2.IMAGE_FORMAT_PNG, 1),
    ],
    ids=["pass-through", "converted", "fitted-and-converted", "fitted"],
)
async def test_the_served_job_decodes_the_reply_at_most_once(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    reply_size: tuple[int, int],
    asked: tuple[int, int],
    fmt: int,
    decodes: int,
) -> None:
    # Every pixel decode of the server, whoever asks for it: libvips' loaders (the codec)
    # and Pillow's (a provider or the marks could use it); the job runs in this process.
    from PIL import ImageFile

    from imagegen.imaging import codec

    loads: list[str] = []
    vips_load, pillow_load = codec._load, ImageFile.ImageFile.load

    def counted_vips(data: bytes, image_format: object) -> object:
        loads.append("vips")
        return vips_load(data, image_format)  # type: ignore[arg-type]

    def counted_pillow(self: ImageFile.ImageFile) -> object:
        loads.append("pillow")
        return pillow_load(self)

    reply = encode(picture(*reply_size), "PNG")
    monkeypatch.setattr(codec, "_load", counted_vips)
    monkeypatch.setattr(ImageFile.ImageFile, "load", counted_pillow)
    _events, err = await run(
        tmp_path,
        database_url,
        {},
        reply,
        size=common_pb2.ImageSize(width=asked[0], height=asked[1]),
        format=fmt,
    )
    monkeypatch.undo()
    assert err is None, err
    rows = await fetch(database_url, "SELECT width, height FROM images")
    assert [(r["width"], r["height"]) for r in rows] == [asked]
    assert loads == ["vips"] * decodes


async def test_a_bomb_reply_is_img_002_without_a_decode(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagegen.imaging import codec
    from tests.fakes.forge_server import bomb_png

    def refuse(data: bytes, image_format: object) -> object:
        raise AssertionError("a bomb was decoded")

    monkeypatch.setattr(codec, "_load", refuse)
    events, err = await run(tmp_path, database_url, {}, bomb_png(60000))
    monkeypatch.undo()
    assert_failed_with(events, err, "IMG_002")
    assert "pixel limit" in events[-1].error.message
    assert await fetch(database_url, "SELECT id FROM images") == []
