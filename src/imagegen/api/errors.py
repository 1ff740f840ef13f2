"""The one table that turns domain errors into gRPC rich status (AIP-193).

Every refusal carries a `google.rpc.ErrorInfo` whose `reason` is the stable IMG code
or, for code-less errors, the class name in UPPER_SNAKE, which must be one of
`OTHER_REASONS` (the list in proto/imagegen/v1/common.proto); its `domain` is
`imagegen.v1` and its `metadata` the error's specifics. Rate limits add `RetryInfo`;
a moderation suspension and an unavailable moderator add `RetryInfo` too;
invalid fields add `BadRequest.FieldViolation`.

Anything that is not an `ImageGenError` is a bug: it is logged with its traceback and
the caller gets a generic INTERNAL with a `RequestInfo` naming the request id to quote,
and no ErrorInfo (a bug has no stable reason for clients to match). An RPC that is not
implemented is UNIMPLEMENTED, without ErrorInfo, as gRPC itself answers an unknown one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagegen.api.context import current_request_id
from imagegen.domain import errors as domain

log = logging.getLogger(__name__)

ERROR_DOMAIN = "imagegen.v1"

#: Delay advertised when a rate-limit error was rebuilt from a stored code that has no
#: retry-after of its own (see `error_from_code`).
DEFAULT_RETRY_AFTER = timedelta(seconds=60)

#: A status travels in trailers, which a client refuses past gRPC's default 8 KiB of
#: metadata (the caller then sees a bare RESOURCE_EXHAUSTED, not our status). The
#: message is sent twice (grpc-message, percent-encoded, and inside the details) and
#: may quote the caller's input, so it is cut to this many UTF-8 bytes, and each
#: ErrorInfo metadata value to the second figure.
MAX_MESSAGE_BYTES = 400
MAX_METADATA_VALUE_BYTES = 200

_StatusFor = Callable[[domain.ImageGenError], grpc.StatusCode]


def _fixed(code: grpc.StatusCode) -> _StatusFor:
    return lambda _exc: code


def _by_suspension(exc: domain.ImageGenError) -> grpc.StatusCode:
    # The same code, IMG_011, for a blocked text (fix the prompt) and for a caller
    # suspended for repeated blocks (wait for the RetryInfo's delay): see common.proto.
    suspended = isinstance(exc, domain.ContentBlocked) and exc.suspended
    return grpc.StatusCode.PERMISSION_DENIED if suspended else grpc.StatusCode.INVALID_ARGUMENT


def _by_retryable(exc: domain.ImageGenError) -> grpc.StatusCode:
    # A provider hiccup (timeout, 5xx, its own rate limit) is worth retrying; a reply we
    # cannot use is not, and UNAVAILABLE would invite clients to loop on it.
    return grpc.StatusCode.UNAVAILABLE if exc.retryable else grpc.StatusCode.INTERNAL


#: Domain error class -> gRPC status code, in one place: the table at the top of
#: proto/imagegen/v1/common.proto.
STATUS_TABLE: dict[type[domain.ImageGenError], _StatusFor] = {
    domain.ProviderNotConfigured: _fixed(grpc.StatusCode.FAILED_PRECONDITION),  # IMG_001
    domain.ProviderFailed: _by_retryable,  # IMG_002
    domain.InvalidRequest: _fixed(grpc.StatusCode.INVALID_ARGUMENT),  # IMG_003
    domain.ImageDeleted: _fixed(grpc.StatusCode.FAILED_PRECONDITION),  # IMG_003
    domain.StorageFailed: _fixed(grpc.StatusCode.UNAVAILABLE),  # IMG_004
    domain.RateLimited: _fixed(grpc.StatusCode.RESOURCE_EXHAUSTED),  # IMG_005
    domain.InsufficientCredits: _fixed(grpc.StatusCode.FAILED_PRECONDITION),  # IMG_006
    domain.ImageTooLarge: _fixed(grpc.StatusCode.INVALID_ARGUMENT),  # IMG_007
    domain.StorageQuotaExceeded: _fixed(grpc.StatusCode.RESOURCE_EXHAUSTED),  # IMG_008
    domain.RequestIdReused: _fixed(grpc.StatusCode.FAILED_PRECONDITION),  # IMG_009
    domain.ContentPolicyRefused: _fixed(grpc.StatusCode.INVALID_ARGUMENT),  # IMG_010
    domain.ContentBlocked: _by_suspension,  # IMG_011
    domain.ModerationUnavailable: _fixed(grpc.StatusCode.UNAVAILABLE),  # IMG_012
    domain.NotFound: _fixed(grpc.StatusCode.NOT_FOUND),
    domain.PermissionDenied: _fixed(grpc.StatusCode.PERMISSION_DENIED),
    domain.Unauthenticated: _fixed(grpc.StatusCode.UNAUTHENTICATED),
    domain.Cancelled: _fixed(grpc.StatusCode.CANCELLED),
    domain.ShuttingDown: _fixed(grpc.StatusCode.UNAVAILABLE),
    domain.StreamLimit: _fixed(grpc.StatusCode.RESOURCE_EXHAUSTED),
}


#: ErrorInfo reasons that are not IMG codes, and only these (proto/imagegen/v1/common.proto).
OTHER_REASONS = frozenset(
    {"UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "SHUTTING_DOWN", "STREAM_LIMIT"}
)
_IMG_CODE = re.compile(r"IMG_[0-9]{3}")


def is_allowed_reason(reason: str) -> bool:
    """Whether `reason` may appear in an ErrorInfo: an IMG code or one of OTHER_REASONS."""
    return bool(_IMG_CODE.fullmatch(reason)) or reason in OTHER_REASONS


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


#: ErrorInfo reason -> domain class, to rebuild an error stored by its code. A subclass
#: that shares its base's code (ImageDeleted) only refines the status; the code rebuilds
#: the base.
_CLASS_BY_REASON: dict[str, type[domain.ImageGenError]] = {
    cls.code or _upper_snake(cls.__name__): cls
    for cls in STATUS_TABLE
    if not (cls.code and getattr(cls.__mro__[1], "code", "") == cls.code)
}


def error_reason(exc: BaseException) -> str:
    """The ErrorInfo reason of an error: its IMG code, else its class name in UPPER_SNAKE
    ("" for what is not an ImageGenError: a bug or an unimplemented RPC)."""
    if isinstance(exc, domain.ImageGenError):
        return exc.code or _upper_snake(type(exc).__name__)
    return ""


def _status_code_for(exc: domain.ImageGenError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        status_for = STATUS_TABLE.get(cls)
        if status_for is not None:
            return status_for(exc)
    # An ImageGenError outside the table (a new subclass, or one rebuilt from an unknown
    # stored code) still speaks to the caller; only its retryability decides the code.
    return _by_retryable(exc)


def _cut(text: str, limit: int) -> str:
    """`text`, or as much of it as fits in `limit` UTF-8 bytes followed by "..."."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "..."


def _pack(status: status_pb2.Status, detail: Message) -> None:
    status.details.add().Pack(detail)


def rich_status(exc: BaseException) -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    """The gRPC code, message and `google.rpc.Status` (with ErrorInfo) for an exception."""
    extra: list[Message] = []
    if isinstance(exc, domain.ImageGenError):
        code = _status_code_for(exc)
        message = exc.message
        metadata = exc.metadata
    elif isinstance(exc, NotImplementedError):
        # The generated servicer base raises this for RPCs a servicer does not override;
        # the caller should see UNIMPLEMENTED, as it would without our interceptors.
        log.warning("unimplemented RPC called (request id %s)", current_request_id.get() or "-")
        code = grpc.StatusCode.UNIMPLEMENTED
        message = "this method is not implemented by this server"
        metadata = {}
    else:
        # A bug, not a refusal: the caller learns only where to look; the traceback stays
        # in our log, tied to the request id.
        request_id = current_request_id.get()
        log.error("unexpected error (request id %s)", request_id or "-", exc_info=exc)
        code = grpc.StatusCode.INTERNAL
        message = "internal error in imagegen; it has been logged" + (
            f": quote request id {request_id} when reporting it" if request_id else ""
        )
        metadata = {}
        if request_id:
            extra.append(error_details_pb2.RequestInfo(request_id=request_id))
    message = _cut(message, MAX_MESSAGE_BYTES)
    metadata = {key: _cut(value, MAX_METADATA_VALUE_BYTES) for key, value in metadata.items()}
    status = status_pb2.Status(code=code.value[0], message=message)
    reason = error_reason(exc)
    if is_allowed_reason(reason):
        _pack(
            status,
            error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata),
        )
    elif reason:
        # A domain error whose reason is not in the contract's list (Cancelled, or a new
        # class nobody listed) is our mistake, not something a client should match on.
        log.warning("error reason %s is not in the contract; sent without ErrorInfo", reason)
    for detail in extra:
        _pack(status, detail)
    retry_after = (
        getattr(exc, "retry_after", None) if isinstance(exc, domain.ImageGenError) else None
    )
    if isinstance(exc, domain.RateLimited) or isinstance(retry_after, timedelta):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(max(retry_after or timedelta(0), timedelta(0)))
        _pack(status, error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(exc, domain.InvalidRequest) and exc.field:
        _pack(
            status,
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=exc.field, description=message
                    )
                ]
            ),
        )
    return code, message, status


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the RPC with `exc`'s rich status; never returns (raises grpc's AbortError)."""
    code, message, status = rich_status(exc)
    if isinstance(exc, domain.ImageGenError):
        log.info(
            "rpc refused: %s %s (request id %s)",
            code.name,
            error_reason(exc),
            current_request_id.get() or "-",
        )
    # The status is built and the error logged: let go of the frames of its traceback
    # (and of what it was chained to). The AbortError raised below keeps `exc` as its
    # context for as long as gRPC keeps that, and those frames hold the request, up to a
    # whole source image (bench/oversize_bench.py).
    _drop_tracebacks(exc)
    # context.abort with the details in trailing metadata, not abort_with_status: the
    # OpenTelemetry interceptor records the right span status only this way.
    await context.abort(
        code,
        message,
        trailing_metadata=((rpc_status.GRPC_DETAILS_METADATA_KEY, status.SerializeToString()),),
    )


def _drop_tracebacks(exc: BaseException) -> None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


def error_from_code(code: str, message: str, retryable: bool) -> domain.ImageGenError:
    """Rebuild the domain error a job stored as (code, message, retryable).

    An IMG code this build does not know (from a newer replica) still yields an
    ImageGenError that reports that code as its reason. A stored failure without an IMG
    code is reported as the generation having failed (IMG_002), as the job runner
    reports any failure it did not expect.
    """
    cls = _CLASS_BY_REASON.get(code)
    if cls is None and not _IMG_CODE.fullmatch(code):
        return domain.ProviderFailed(message, retryable=retryable)
    exc: domain.ImageGenError
    if cls is domain.ProviderFailed:
        exc = domain.ProviderFailed(message, retryable=retryable)
    elif cls is domain.RateLimited:
        exc = domain.RateLimited(message, retry_after=DEFAULT_RETRY_AFTER)
    elif cls is domain.ModerationUnavailable:
        exc = domain.ModerationUnavailable(message, retry_after=DEFAULT_RETRY_AFTER)
    elif cls is not None:
        exc = cls(message)
    else:
        exc = domain.ImageGenError(message)
        exc.code = code
        exc.retryable = retryable
    return exc
