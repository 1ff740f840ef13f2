"""One contract for both blob stores (S3 through the production aiobotocore client
against moto's server, and the local filesystem), plus each store's own promises."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiobotocore.session import get_session

from imagegen.api.http import build_http_app, start_http_server
from imagegen.config import S3Settings
from imagegen.domain.errors import NotFound, StorageFailed
from imagegen.storage.base import BlobStore
from imagegen.storage.keys import blob_key, source_key
from imagegen.storage.local import LocalBlobStore, load_or_create_signing_key
from imagegen.storage.s3 import S3BlobStore, open_s3_store
from tests.subjects import SUBJECTS

PNG = b"\x89PNG\r\n\x1a\n" + b"fake image body" * 10


@pytest.fixture(params=["s3", "local"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> AsyncIterator[BlobStore]:
    if request.param == "s3":
        async with open_s3_store(S3Settings(s3_endpoint, s3_bucket, "us-east-1", "pre")) as s3:
            yield s3
        return
    local = LocalBlobStore(tmp_path / "blobs", "", load_or_create_signing_key(tmp_path))
    runner, port = await start_http_server(
        build_http_app(local_store=local, metrics_text=lambda: (b"", "text/plain")),
        "127.0.0.1",
        0,
    )
    local.public_url = f"http://127.0.0.1:{port}"
    try:
        yield local
    finally:
        await runner.cleanup()


async def test_round_trip(store: BlobStore) -> None:
    key = blob_key("alice", "img1", "png", datetime.now(UTC))
    assert not await store.exists(key)
    await store.put(key, PNG, "image/png")
    assert await store.exists(key)
    assert await store.get(key) == PNG
    await store.put(key, PNG + b"2", "image/png")
    assert await store.get(key) == PNG + b"2"
    await store.delete(key)
    assert not await store.exists(key)
    await store.delete(key)  # deleting again is fine
    with pytest.raises(NotFound):
        await store.get(key)


async def test_signed_url_serves_the_bytes_with_their_type(store: BlobStore) -> None:
    key = blob_key("alice", "img2", "png", datetime.now(UTC))
    await store.put(key, PNG, "image/png")
    url = await store.signed_url(key, timedelta(minutes=5))
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(url)
    assert reply.status_code == 200
    assert reply.content == PNG
    assert reply.headers["content-type"] == "image/png"
    with pytest.raises(ValueError):
        await store.signed_url(key, timedelta(days=8))


async def test_s3_object_metadata_prefix_and_expiry(s3_endpoint: str, s3_bucket: str) -> None:
    async with open_s3_store(S3Settings(s3_endpoint, s3_bucket, "us-east-1", "tenant-a")) as store:
        await store.put("generated/k.png", PNG, "image/png")
        url = await store.signed_url("generated/k.png", timedelta(seconds=90))
    assert "X-Amz-Expires=90" in url
    async with get_session().create_client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
    ) as s3:
        head = await s3.head_object(Bucket=s3_bucket, Key="tenant-a/generated/k.png")
    assert head["ContentType"] == "image/png"
    assert "max-age" in head["CacheControl"]


def closed_endpoint() -> S3Settings:
    """S3 at a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    return S3Settings(f"http://127.0.0.1:{closed_port}", "bucket", "us-east-1", "")


async def test_s3_endpoint_down_is_storage_failed() -> None:
    async with open_s3_store(closed_endpoint(), connect_timeout=1, read_timeout=1) as store:
        with pytest.raises(StorageFailed):
            await store.put("k.png", PNG, "image/png")


async def test_local_urls_refuse_tampering_and_expire(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = LocalBlobStore(tmp_path / "b", "", b"k" * 32, clock=lambda: now[0])
    runner, port = await start_http_server(
        build_http_app(local_store=store, metrics_text=lambda: (b"m 1\n", "text/plain")),
        "127.0.0.1",
        0,
    )
    store.public_url = f"http://127.0.0.1:{port}"
    try:
        await store.put("generated/a/x.png", PNG, "image/png")
        url = await store.signed_url("generated/a/x.png", timedelta(seconds=10))
        tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(url)).status_code == 200
            assert (await http.get(tampered)).status_code == 403
            assert (await http.get(url.split("?")[0])).status_code == 400
            now[0] += 11
            expired = await http.get(url)
            assert expired.status_code == 403 and "expired" in expired.text
            assert (await http.get(f"{store.public_url}/metrics")).text == "m 1\n"
            assert (await http.get(f"{store.public_url}/healthz")).status_code == 200
        for bad in ("../etc/passwd", "a/../../b", "/abs", ""):
            with pytest.raises(NotFound):
                await store.put(bad, PNG, "image/png")
    finally:
        await runner.cleanup()


def test_blob_keys_are_dated_and_encode_escapes() -> None:
    key = blob_key("alice", "id-1", "webp", datetime(2026, 3, 4, 5, 6, 7, 8, tzinfo=UTC))
    assert key == "generated/alice/2026/03/20260304T050607000008Z-id-1.webp"
    for user in ("../x", "a/b", ".."):
        assert blob_key(user, "id", "png", datetime.now(UTC)).split("/")[1].startswith("_")
    with pytest.raises(ValueError):
        blob_key("", "id", "png", datetime.now(UTC))


@pytest.mark.parametrize("user_id", SUBJECTS)
async def test_every_subject_round_trips_through_the_store(store: BlobStore, user_id: str) -> None:
    keys = [
        blob_key(user_id, "img3", "png", datetime.now(UTC)),
        source_key(user_id, "png", datetime.now(UTC)),
    ]
    async with httpx.AsyncClient(trust_env=False) as http:
        for key in keys:
            await store.put(key, PNG, "image/png")
            assert await store.get(key) == PNG
            reply = await http.get(await store.signed_url(key, timedelta(minutes=1)))
            assert reply.status_code == 200 and reply.content == PNG
            await store.delete(key)
            assert not await store.exists(key)


async def test_local_subject_folders_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = LocalBlobStore(root, "http://127.0.0.1:1", b"k" * 32)
    for user_id in SUBJECTS:
        await store.put(blob_key(user_id, "img4", "png", datetime.now(UTC)), PNG, "image/png")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 2 * len(SUBJECTS)  # each image and its Content-Type
    assert all(root in p.parents for p in written)
    users = {p.name for p in (root / "generated").iterdir()}
    assert len(users) == len(SUBJECTS)


async def test_listing_finds_every_blob_under_a_prefix_once(store: BlobStore) -> None:
    started = datetime.now(UTC) - timedelta(seconds=5)
    now = datetime.now(UTC)
    generated = {
        blob_key(user, f"img-{n}", "png", now): PNG + bytes([n])
        for n, user in enumerate(["alice", "alice", "bob", "Jane Doe"])
    }
    sources = {source_key("alice", "jpg", now): PNG * 2}
    for key, data in {**generated, **sources}.items():
        await store.put(key, data, "image/png")

    listed = [entry async for entry in store.list_keys("generated/")]
    assert sorted(e.key for e in listed) == sorted(generated)
    for entry in listed:
        assert entry.size_bytes == len(generated[entry.key])
        assert entry.modified_at.tzinfo is not None
        assert started <= entry.modified_at <= datetime.now(UTC) + timedelta(seconds=5)
    everything = {e.key async for e in store.list_keys("")}
    assert everything == set(generated) | set(sources)
    alice = {e.key async for e in store.list_keys("generated/alice/")}
    assert alice == {k for k in generated if k.startswith("generated/alice/")}
    assert [e async for e in store.list_keys("generated/nobody/")] == []
    assert [e async for e in store.list_keys("nothing-here/")] == []

    # A deleted blob is gone from the listing; its neighbours stay.
    first = sorted(generated)[0]
    await store.delete(first)
    assert {e.key async for e in store.list_keys("generated/")} == set(generated) - {first}


async def test_s3_listing_pages_and_strips_the_store_prefix(
    s3_endpoint: str, s3_bucket: str
) -> None:
    session = get_session()
    async with session.create_client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
    ) as client:
        store = S3BlobStore(client, s3_bucket, "tenant-b", list_page_size=2)
        other = S3BlobStore(client, s3_bucket, "tenant-c")
        keys = {f"generated/u/{n:02d}.png" for n in range(5)}
        for key in keys:
            await store.put(key, PNG, "image/png")
        await other.put("generated/u/99.png", PNG, "image/png")
        assert {e.key async for e in store.list_keys("generated/")} == keys
        assert [e.key async for e in other.list_keys("")] == ["generated/u/99.png"]


async def test_local_listing_skips_what_is_not_a_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs", "http://127.0.0.1:1", b"k" * 32)
    await store.put("generated/a/x.png", PNG, "image/png")
    # A write that crashed half-way leaves a temporary file: not a key.
    (tmp_path / "blobs" / "generated" / "a" / ".upload-abc").write_bytes(b"partial")
    assert [e.key async for e in store.list_keys("generated/")] == ["generated/a/x.png"]


async def test_delete_many_removes_the_blobs_and_ignores_missing_ones(store: BlobStore) -> None:
    now = datetime.now(UTC)
    keys = [blob_key("alice", f"many{n}", "png", now) for n in range(5)]
    for key in keys:
        await store.put(key, PNG, "image/png")
    missing = blob_key("alice", "never-stored", "png", now)
    assert await store.delete_many([*keys[:3], missing]) == {}
    assert [await store.exists(key) for key in keys] == [False] * 3 + [True] * 2
    assert await store.delete_many([]) == {}


async def test_s3_deletes_in_requests_of_its_batch_size(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("imagegen.storage.s3.DELETE_BATCH", 2)
    now = datetime.now(UTC)
    keys = [blob_key("alice", f"batch{n}", "png", now) for n in range(5)]
    async with open_s3_store(S3Settings(s3_endpoint, s3_bucket, "us-east-1", "pre")) as s3:
        for key in keys:
            await s3.put(key, PNG, "image/png")
        requests: list[int] = []
        real = s3._client.delete_objects

        async def counted(**kwargs: object) -> object:
            requests.append(len(kwargs["Delete"]["Objects"]))  # type: ignore[index]
            return await real(**kwargs)

        monkeypatch.setattr(s3._client, "delete_objects", counted)
        assert await s3.delete_many(keys) == {}
        assert requests == [2, 2, 1]
        assert not any([await s3.exists(key) for key in keys])


async def test_s3_delete_many_reports_every_key_when_the_store_is_down() -> None:
    async with open_s3_store(closed_endpoint(), connect_timeout=1, read_timeout=1) as s3:
        failures = await s3.delete_many(["a/1.png", "a/2.png"])
    assert set(failures) == {"a/1.png", "a/2.png"}
    assert all("S3" in message for message in failures.values())
