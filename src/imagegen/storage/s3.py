"""A blob store on S3 (or any S3 endpoint) through aiobotocore.

Presigned GET URLs are signed here (SigV4 query authentication, as botocore's
`S3SigV4QueryAuth` does it) against an endpoint resolved once per client: botocore's
`generate_presigned_url` resolves the endpoint ruleset again for every URL (about
0.2 ms each; a library page signs 20), and its signer alone builds a request object
per URL (about 0.06 ms). Here a URL costs a quote, one SHA-256 and one HMAC (about
4 us). The test suite checks that both give the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from imagegen.config import MAX_URL_TTL, S3Settings
from imagegen.domain.errors import NotFound, StorageFailed
from imagegen.storage.base import BlobEntry

CACHE_CONTROL = "private, max-age=31536000, immutable"


#: A key whose URL shows where every key's URL goes; it only has to need no escaping.
_PROBE_KEY = "imagegen-endpoint-probe"
_SIGV4 = "AWS4-HMAC-SHA256"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_DEFAULT_PORTS = {"http": 80, "https": 443}


#: Keys per DeleteObjects request: S3's own maximum.
DELETE_BATCH = 1000


@dataclass(frozen=True)
class PresignTarget:
    """Where a bucket's presigned GET URLs point and how they are scoped, as the
    client's endpoint resolution answered once: `origin` + `base_path` + the
    URL-encoded key."""

    origin: str
    host: str
    base_path: str
    region: str
    service: str

    @classmethod
    def from_probe_url(cls, url: str) -> PresignTarget | None:
        """The target behind a SigV4 presigned URL of `_PROBE_KEY`; None for any other
        form (another signature version), where the client's own presigning is kept."""
        parts = urlsplit(url)
        suffix = "/" + _PROBE_KEY
        if not parts.path.endswith(suffix) or parts.fragment:
            return None
        query = dict(pair.partition("=")[::2] for pair in parts.query.split("&"))
        if query.get("X-Amz-Algorithm") != _SIGV4:
            return None
        scope = unquote(query.get("X-Amz-Credential", "")).split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            return None
        # Only the auth parameters may be in the query: anything else would have to be
        # signed and sent with every URL.
        expected = {
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-Expires",
            "X-Amz-SignedHeaders",
            "X-Amz-Security-Token",
            "X-Amz-Signature",
        }
        if not set(query) <= expected or query.get("X-Amz-SignedHeaders") != "host":
            return None
        base_path = parts.path[: -len(_PROBE_KEY)]
        return cls(
            origin=f"{parts.scheme}://{parts.netloc}",
            host=_host_header(parts.scheme, parts.hostname or "", parts.port, parts.netloc),
            base_path=base_path,
            region=scope[2],
            service=scope[3],
        )


def _host_header(scheme: str, hostname: str, port: int | None, netloc: str) -> str:
    """The Host header a client sends, as SigV4 signs it: lowercase, IPv6 in brackets,
    no user info, the port only when it is not the scheme's default."""
    host = f"[{hostname}]" if netloc.rpartition("@")[2].startswith("[") else hostname
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return host


def _quote(value: str) -> str:
    # SigV4's URI encoding of a query value: everything but unreserved characters.
    return quote(value, safe="-_.~")


@dataclass(frozen=True)
class _SharedParts:
    """What every URL signed in the same second, with the same credentials and lifetime,
    has in common: all but the path and the signature."""

    query: str
    canonical_tail: str
    string_to_sign_head: str
    signing_key: bytes


class PresignedUrlSigner:
    """Presigned GET URLs for one target, signed with the client's credentials.

    The credentials are read per URL (a refreshable set refreshes itself). A page of
    URLs is signed within one second, so the parts they share (the query, the scope,
    the signing key derived from the secret, day, region and service) are built once
    per second and credential set; a URL then costs a quote, a SHA-256 and an HMAC.
    """

    def __init__(
        self,
        target: PresignTarget,
        credentials: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._target = target
        self._credentials = credentials
        self._clock = clock
        self._shared_for: tuple[object, ...] = ()
        self._shared = _SharedParts("", "", "", b"")
        self._signing_key_for: tuple[str, str] = ("", "")
        self._signing_key = b""

    def _key_for(self, secret: str, day: str) -> bytes:
        if self._signing_key_for != (secret, day):
            key = hmac.digest(f"AWS4{secret}".encode(), day.encode(), "sha256")
            for part in (self._target.region, self._target.service, "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._signing_key_for, self._signing_key = (secret, day), key
        return self._signing_key

    def _shared_parts(self, second: int, frozen: Any, expires_in: int) -> _SharedParts:
        wanted = (second, frozen.access_key, frozen.secret_key, frozen.token, expires_in)
        if wanted == self._shared_for:
            return self._shared
        target = self._target
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
        day = stamp[:8]
        scope = f"{day}/{target.region}/{target.service}/aws4_request"
        query = (
            f"X-Amz-Algorithm={_SIGV4}"
            f"&X-Amz-Credential={_quote(frozen.access_key + '/' + scope)}"
            f"&X-Amz-Date={stamp}&X-Amz-Expires={expires_in}&X-Amz-SignedHeaders=host"
        )
        if frozen.token is not None:
            # Sorted into place for the canonical form; appended in the URL as botocore
            # does (servers do not care about the order).
            token = f"X-Amz-Security-Token={_quote(frozen.token)}"
            canonical_query = query.replace(
                "&X-Amz-SignedHeaders=", f"&{token}&X-Amz-SignedHeaders=", 1
            )
            query = f"{query}&{token}"
        else:
            canonical_query = query
        self._shared = _SharedParts(
            query=query,
            canonical_tail=f"{canonical_query}\nhost:{target.host}\n\nhost\n{_UNSIGNED_PAYLOAD}",
            string_to_sign_head=f"{_SIGV4}\n{stamp}\n{scope}\n",
            signing_key=self._key_for(frozen.secret_key, day),
        )
        self._shared_for = wanted
        return self._shared

    async def url(self, full_key: str, expires_in: int) -> str:
        """A URL that GETs `full_key` (the object key, prefix included) for
        `expires_in` seconds from now (from the start of the current second)."""
        if self._credentials is None:
            raise StorageFailed("no AWS credentials are configured to sign S3 URLs")
        try:
            frozen = await self._credentials.get_frozen_credentials()
        except BotoCoreError as exc:
            raise StorageFailed(f"refreshing the AWS credentials failed: {_describe(exc)}") from exc
        shared = self._shared_parts(int(self._clock()), frozen, expires_in)
        # The key's bytes as S3 sees them: every character but unreserved ones and "/"
        # escaped, exactly as botocore puts it in the URL; S3 signs that path as it is.
        path = self._target.base_path + quote(full_key.encode(), safe="/~")
        canonical_request = f"GET\n{path}\n{shared.canonical_tail}"
        string_to_sign = (
            shared.string_to_sign_head + hashlib.sha256(canonical_request.encode()).hexdigest()
        )
        signature = hmac.digest(shared.signing_key, string_to_sign.encode(), "sha256").hex()
        return f"{self._target.origin}{path}?{shared.query}&X-Amz-Signature={signature}"


class S3BlobStore:
    """Blobs as objects in one bucket, under an optional prefix."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        op_timeout: float = 60,
        signer: PresignedUrlSigner | None = None,
        list_page_size: int = 1000,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._op_timeout = op_timeout
        self._signer = signer
        #: keys per ListObjectsV2 request (S3 answers at most 1,000)
        self._list_page_size = list_page_size

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

    async def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        failures: dict[str, str] = {}
        for start in range(0, len(keys), DELETE_BATCH):
            batch = {self._key(key): key for key in keys[start : start + DELETE_BATCH]}
            try:
                async with asyncio.timeout(self._op_timeout):
                    reply = await self._client.delete_objects(
                        Bucket=self._bucket,
                        # Quiet: the answer lists only the keys that failed.
                        Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                    )
            except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
                message = f"deleting the image from S3 failed: {_describe(exc)}"
                failures.update(dict.fromkeys(batch.values(), message))
                continue
            for error in reply.get("Errors", ()):
                key = batch.get(str(error.get("Key", "")))
                if key is not None:
                    failures[key] = (
                        "deleting the image from S3 failed: "
                        f"{error.get('Code', 'error')}: {error.get('Message', '')}"
                    )
        return failures

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

    async def list_keys(self, prefix: str) -> AsyncIterator[BlobEntry]:
        """Every object under `prefix` (below the store's own prefix), through
        ListObjectsV2's paginator: one page (up to 1,000 keys) per request, each within
        the operation timeout."""
        strip = len(self._key(""))
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket,
            Prefix=self._key(prefix),
            PaginationConfig={"PageSize": self._list_page_size},
        )
        iterator = pages.__aiter__()
        while True:
            try:
                async with asyncio.timeout(self._op_timeout):
                    page = await anext(iterator)
            except StopAsyncIteration:
                return
            except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
                raise StorageFailed(f"listing S3 failed: {_describe(exc)}") from exc
            for item in page.get("Contents", ()):
                yield BlobEntry(item["Key"][strip:], int(item["Size"]), item["LastModified"])

    async def signed_url(self, key: str, ttl: timedelta) -> str:
        if not timedelta(seconds=1) <= ttl <= MAX_URL_TTL:
            raise ValueError("presigned URL lifetime must be between 1 second and 7 days")
        if self._signer is not None:
            return await self._signer.url(self._key(key), int(ttl.total_seconds()))
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
        yield S3BlobStore(
            client,
            settings.bucket,
            settings.prefix,
            signer=await presigned_url_signer(client, session, settings.bucket),
        )


async def presigned_url_signer(client: Any, session: Any, bucket: str) -> PresignedUrlSigner | None:
    """A signer for `bucket`'s GET URLs from one presigned URL the client makes (no
    network call), or None when that URL is not in the SigV4 query form we sign."""
    try:
        probe: str = await client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY}, ExpiresIn=60
        )
    except NoCredentialsError:
        # Kept as before: the store opens, and each use says what is missing.
        return None
    target = PresignTarget.from_probe_url(probe)
    if target is None:
        return None
    # The session resolved these same credentials for the client (none were passed).
    return PresignedUrlSigner(target, await session.get_credentials())


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ClientError):
        return _code(exc) or "error"
    return type(exc).__name__
