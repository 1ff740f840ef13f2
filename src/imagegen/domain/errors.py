"""The error tree of imagegen. Clients match on the stable IMG codes.

    ImageGenError
    ├── ProviderNotConfigured      IMG_001  provider credentials not configured
    ├── ProviderFailed             IMG_002  the provider failed (retryable or not)
    ├── InvalidRequest             IMG_003  invalid prompt or request (names the field)
    │   └── ImageDeleted           IMG_003  the image named is soft-deleted (undelete it first)
    ├── StorageFailed              IMG_004  storing the image failed
    ├── RateLimited                IMG_005  a plan limit was hit (carries retry_after)
    ├── InsufficientCredits        IMG_006  not enough credits
    ├── ImageTooLarge              IMG_007  a source or reply image is over a byte or pixel limit
    ├── StorageQuotaExceeded       IMG_008  the user's storage quota would be exceeded
    ├── RequestIdReused            IMG_009  request_id reused with other parameters
    ├── ContentPolicyRefused       IMG_010  refused by the provider's content policy
    ├── ContentBlocked             IMG_011  blocked by our moderation (names the categories);
    │                                       with retry_after while the user is suspended
    ├── ModerationUnavailable      IMG_012  a moderator could not answer and the policy fails
    │                                       closed (carries retry_after)
    ├── NotFound                   (no code) the resource does not exist for this caller
    ├── PermissionDenied           (no code) visible but not changeable by this caller
    ├── Unauthenticated            (no code) missing or bad credentials
    ├── Cancelled                  (no code) the job was cancelled
    ├── ShuttingDown               (no code) this replica is draining
    └── StreamLimit                (no code) the plan's maximum of open streams is reached

Adapters translate foreign errors (httpx, botocore, asyncpg) into these; `api/`
translates these into gRPC status in one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta


class ImageGenError(Exception):
    """Base of every error the service reports to a caller."""

    code: str = ""
    #: whether trying the same request again later may succeed
    retryable: bool = False

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class ProviderNotConfigured(ImageGenError):
    """The chosen provider has no credentials; raised before any request is sent."""

    code = "IMG_001"


class ProviderFailed(ImageGenError):
    """The provider's call failed, timed out or answered something unusable."""

    code = "IMG_002"

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        retry_after: timedelta | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retryable = retryable
        self.retry_after = retry_after


class InvalidRequest(ImageGenError):
    """A field of the request is missing, malformed or past its limit."""

    code = "IMG_003"

    def __init__(self, message: str, *, field: str = "", metadata: Mapping[str, str] | None = None):
        merged = dict(metadata or {})
        if field:
            merged.setdefault("field", field)
        super().__init__(message, metadata=merged)
        self.field = field


class ImageDeleted(InvalidRequest):
    """The request names one of the caller's images that is soft-deleted, for a use that
    needs it live (a URL, a download, a change, an edit source): a precondition of the
    image's state rather than a malformed field, so FAILED_PRECONDITION with IMG_003."""

    def __init__(self, message: str, *, field: str = "name", image: str = "") -> None:
        super().__init__(message, field=field, metadata={"image": image} if image else None)


class StorageFailed(ImageGenError):
    """The blob store could not be written or read."""

    code = "IMG_004"
    retryable = True


class RateLimited(ImageGenError):
    """A plan's request or concurrency limit was reached."""

    code = "IMG_005"
    retryable = True

    def __init__(
        self, message: str, *, retry_after: timedelta, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after


class InsufficientCredits(ImageGenError):
    """The user's balance does not cover the request's price."""

    code = "IMG_006"


class ImageTooLarge(ImageGenError):
    """An image is over the byte or pixel limit."""

    code = "IMG_007"


class StorageQuotaExceeded(ImageGenError):
    """Storing the result would take the user past their storage quota."""

    code = "IMG_008"


class RequestIdReused(ImageGenError):
    """The request_id was used before with different parameters."""

    code = "IMG_009"


class ContentPolicyRefused(ImageGenError):
    """The provider refused the prompt or image on content-policy grounds."""

    code = "IMG_010"


class ContentBlocked(ImageGenError):
    """Our moderation blocked a text that would become a prompt. Names the categories,
    never the matched words. With `retry_after` the caller is suspended for repeated
    blocks until then (PERMISSION_DENIED instead of INVALID_ARGUMENT)."""

    code = "IMG_011"

    def __init__(
        self,
        message: str,
        *,
        categories: tuple[str, ...] = (),
        retry_after: timedelta | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        merged = dict(metadata or {})
        if categories:
            merged.setdefault("categories", ",".join(categories))
        super().__init__(message, metadata=merged)
        self.categories = categories
        self.retry_after = retry_after

    @property
    def suspended(self) -> bool:
        return self.retry_after is not None


class ModerationUnavailable(ImageGenError):
    """A moderator could not answer (down, timed out, refused us) and the plan's policy
    fails closed; trying again later may succeed."""

    code = "IMG_012"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: timedelta | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after


class NotFound(ImageGenError):
    """The resource does not exist, or belongs to someone else (never told apart)."""


class PermissionDenied(ImageGenError):
    """The caller can see the resource but may not change it."""


class Unauthenticated(ImageGenError):
    """No credentials, or credentials that do not verify."""


class Cancelled(ImageGenError):
    """The job was cancelled before it finished."""


class ShuttingDown(ImageGenError):
    """This replica is draining; the caller should retry on another one."""

    retryable = True


class StreamLimit(ImageGenError):
    """The caller already has their plan's maximum of open streams (GenerateImage and
    WatchGeneration); one ending frees a slot (carries retry_after: streams end when
    their jobs do, for most jobs seconds away)."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: timedelta = timedelta(seconds=5),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after
