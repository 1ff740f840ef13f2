"""A blob store on S3 (or any S3 endpoint) through aiobotocore."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from imagegen.config import MAX_URL_TTL, S3Settings
from imagegen.domain.errors import NotFound, StorageFailed

CACHE_CONTROL = "private, max-age=31536000, immutable"


class S3BlobStore:
    """Blobs as objects in one bucket, under an optional prefix."""

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", *, op_timeout: float = 60
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._op_timeout = op_timeout

    @property
    def bucket(self) -> str:
        """The bucket's name (for spans)."""
        return self._bucket

    def _key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.put_object(
                    Bucket=self._bucket,
                    Key=self._key(key),
                    Body=data,
                    ContentType=content_type,
                    CacheControl=CACHE_CONTROL,
                )
        except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
            raise StorageFailed(f"uploading the image to S3 failed: {_describe(exc)}") from exc

    async def get(self, key: str) -> bytes:
        try:
            async with asyncio.timeout(self._op_timeout):
                reply = await self._client.get_object(Bucket=self._bucket, Key=self._key(key))
                async with reply["Body"] as body:
                    data: bytes = await body.read()
                    return data
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"blob {key!r} not found") from None
            raise StorageFailed(f"reading the image from S3 failed: {_describe(exc)}") from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise StorageFailed(f"reading the image from S3 failed: {_describe(exc)}") from exc

    async def delete(self, key: str) -> None:
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.delete_object(Bucket=self._bucket, Key=self._key(key))
        except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
            raise StorageFailed(f"deleting the image from S3 failed: {_describe(exc)}") from exc

    async def exists(self, key: str) -> bool:
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.head_object(Bucket=self._bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StorageFailed(f"checking the image in S3 failed: {_describe(exc)}") from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise StorageFailed(f"checking the image in S3 failed: {_describe(exc)}") from exc

    async def signed_url(self, key: str, ttl: timedelta) -> str:
        if not timedelta(seconds=1) <= ttl <= MAX_URL_TTL:
            raise ValueError("presigned URL lifetime must be between 1 second and 7 days")
        url: str = await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": self._key(key)},
            ExpiresIn=int(ttl.total_seconds()),
        )
        return url


@contextlib.asynccontextmanager
async def open_s3_store(
    settings: S3Settings, *, connect_timeout: float = 5, read_timeout: float = 30
) -> AsyncIterator[S3BlobStore]:
    """An S3BlobStore with its own client, closed on exit. Credentials come from the
    standard AWS variables; the endpoint, region, bucket and prefix from settings."""
    config = AioConfig(
        retries={"max_attempts": 2, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path"},
        signature_version="s3v4",
    )
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=settings.endpoint or None,
        region_name=settings.region,
        config=config,
    ) as client:
        yield S3BlobStore(client, settings.bucket, settings.prefix)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ClientError):
        return _code(exc) or "error"
    return type(exc).__name__
