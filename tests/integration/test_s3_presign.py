"""Presigned S3 URLs signed by our own SigV4 signer: the same URL botocore makes, for
every key, endpoint form and credential set; fetched from moto; the lifetime carried."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import botocore.auth
import httpx
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioCredentials
from aiobotocore.session import get_session

from imagegen.config import S3Settings
from imagegen.domain.errors import StorageFailed
from imagegen.storage.keys import blob_key
from imagegen.storage.s3 import (
    PresignedUrlSigner,
    PresignTarget,
    S3BlobStore,
    open_s3_store,
    presigned_url_signer,
)
from tests.subjects import SUBJECTS

PNG = b"\x89PNG\r\n\x1a\n" + b"presigned body" * 10
CONFIG = AioConfig(s3={"addressing_style": "path"}, signature_version="s3v4")


class FixedClock:
    """A clock for both signers: ours reads `now()`, botocore's reads the patched
    `get_current_datetime`."""

    def __init__(self, when: datetime) -> None:
        self.when = when

    def now(self) -> float:
        return self.when.timestamp()

    def botocore_now(self, remove_tzinfo: bool = True) -> dt.datetime:
        return self.when.replace(tzinfo=None) if remove_tzinfo else self.when


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FixedClock]:
    fixed = FixedClock(datetime(2026, 11, 25, 23, 59, 58, 700_000, tzinfo=UTC))
    monkeypatch.setattr(botocore.auth, "get_current_datetime", fixed.botocore_now)
    yield fixed


async def _signer(
    client: Any, bucket: str, credentials: Any, clock: FixedClock
) -> PresignedUrlSigner:
    probe = await client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "imagegen-endpoint-probe"}, ExpiresIn=60
    )
    target = PresignTarget.from_probe_url(probe)
    assert target is not None
    return PresignedUrlSigner(target, credentials, clock=clock.now)


@pytest.mark.parametrize(
    ("endpoint", "region", "addressing"),
    [
        ("http://127.0.0.1:9000", "us-east-1", "path"),
        ("http://[::1]:9000", "us-east-1", "path"),
        ("https://objects.example.test:443", "eu-central-1", "path"),
        (None, "eu-west-1", "path"),  # AWS itself, resolved by botocore's ruleset
        (None, "eu-west-1", "virtual"),
    ],
)
@pytest.mark.parametrize("token", [None, "a/session+token=="])
async def test_our_urls_are_botocores_for_every_key(
    clock: FixedClock, endpoint: str | None, region: str, addressing: str, token: str | None
) -> None:
    config = AioConfig(s3={"addressing_style": addressing}, signature_version="s3v4")
    async with get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=config,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        aws_session_token=token,
    ) as client:
        credentials = AioCredentials(
            "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token
        )
        signer = await _signer(client, "my-bucket", credentials, clock)
        keys = [blob_key(user, "img", "png", datetime.now(UTC)) for user in SUBJECTS]
        keys += ["pre/a b+c%d?e#f&g=h~i'j(k)*!", "ünï/cødé/ключ.png", "a//b/./c/../d"]
        for ttl in (1, 900, 604_800):
            for key in keys:
                expected = await client.generate_presigned_url(
                    "get_object", Params={"Bucket": "my-bucket", "Key": key}, ExpiresIn=ttl
                )
                assert await signer.url(key, ttl) == expected, key
        # A new day derives a new signing key; the URL still matches.
        clock.when += timedelta(seconds=2)
        expected = await client.generate_presigned_url(
            "get_object", Params={"Bucket": "my-bucket", "Key": keys[0]}, ExpiresIn=60
        )
        assert "X-Amz-Date=20261126T000000Z" in expected
        assert await signer.url(keys[0], 60) == expected


async def test_the_store_signs_without_the_client(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = get_session()
    async with session.create_client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", config=CONFIG
    ) as client:
        signer = await presigned_url_signer(client, session, s3_bucket)
        assert signer is not None
        store = S3BlobStore(client, s3_bucket, "pre", signer=signer)
        await store.put("generated/x.png", PNG, "image/png")

        def no_more_resolving(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("presigning went through botocore's endpoint resolution")

        monkeypatch.setattr(client, "generate_presigned_url", no_more_resolving)
        before = datetime.now(UTC).replace(microsecond=0)
        url = await store.signed_url("generated/x.png", timedelta(minutes=10))
        after = datetime.now(UTC)
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["600"]
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    # Valid from the second it was signed in, for the whole lifetime asked.
    assert before <= signed_at <= after
    assert urlsplit(url).path == f"/{s3_bucket}/pre/generated/x.png"
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(url)
    assert reply.status_code == 200 and reply.content == PNG


async def test_every_subject_key_fetches_from_moto(s3_endpoint: str, s3_bucket: str) -> None:
    async with (
        open_s3_store(S3Settings(s3_endpoint, s3_bucket, "us-east-1", "tenant/a b")) as store,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        for user in SUBJECTS:
            key = blob_key(user, "img", "png", datetime.now(UTC))
            await store.put(key, PNG + user.encode(), "image/png")
            url = await store.signed_url(key, timedelta(seconds=30))
            assert "X-Amz-Expires=30&" in url
            reply = await http.get(url)
            assert reply.status_code == 200, (user, reply.text)
            assert reply.content == PNG + user.encode()


async def test_lifetime_bounds_are_checked(s3_endpoint: str, s3_bucket: str) -> None:
    async with open_s3_store(S3Settings(s3_endpoint, s3_bucket, "us-east-1", "")) as store:
        assert "X-Amz-Expires=604800&" in await store.signed_url("k", timedelta(days=7))
        assert "X-Amz-Expires=1&" in await store.signed_url("k", timedelta(seconds=1))
        for bad in (timedelta(days=7, seconds=1), timedelta(milliseconds=999), timedelta(0)):
            with pytest.raises(ValueError):
                await store.signed_url("k", bad)


def test_probe_urls_of_another_form_keep_the_clients_signing() -> None:
    sigv4 = (
        "https://b.s3.amazonaws.com/imagegen-endpoint-probe?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AK%2F20261125%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261125T"
        "000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=00"
    )
    target = PresignTarget.from_probe_url(sigv4)
    assert target == PresignTarget(
        origin="https://b.s3.amazonaws.com",
        host="b.s3.amazonaws.com",
        base_path="/",
        region="us-east-1",
        service="s3",
    )
    sigv2 = (
        "https://b.s3.amazonaws.com/imagegen-endpoint-probe?AWSAccessKeyId=AK&Signature=x&Expires=1"
    )
    assert PresignTarget.from_probe_url(sigv2) is None
    extra_param = sigv4.replace("X-Amz-Expires=60", "X-Amz-Expires=60&x-id=GetObject")
    assert PresignTarget.from_probe_url(extra_param) is None
    other_key = sigv4.replace("imagegen-endpoint-probe", "other")
    assert PresignTarget.from_probe_url(other_key) is None


async def test_no_credentials_is_storage_failed() -> None:
    target = PresignTarget("http://127.0.0.1:1", "127.0.0.1:1", "/b/", "us-east-1", "s3")
    with pytest.raises(StorageFailed):
        await PresignedUrlSigner(target, None).url("k", 60)
