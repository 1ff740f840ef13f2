"""The domain-error -> gRPC rich status table (api/errors.py)."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from imagegen.api.context import current_request_id
from imagegen.api.errors import (
    ERROR_DOMAIN,
    OTHER_REASONS,
    STATUS_TABLE,
    error_from_code,
    error_reason,
    is_allowed_reason,
    rich_status,
)
from imagegen.domain import errors as domain

ROOT = Path(__file__).resolve().parents[2]
#: Domain errors that never reach a caller; if one did, it would carry no ErrorInfo.
NOT_FOR_CALLERS = {"CANCELLED"}

CASES: list[tuple[domain.ImageGenError, grpc.StatusCode, str]] = [
    (
        domain.ProviderNotConfigured("set FORGE keys"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMG_001",
    ),
    (domain.ProviderFailed("boom", retryable=True), grpc.StatusCode.UNAVAILABLE, "IMG_002"),
    (domain.ProviderFailed("bad reply"), grpc.StatusCode.INTERNAL, "IMG_002"),
    (domain.InvalidRequest("prompt empty"), grpc.StatusCode.INVALID_ARGUMENT, "IMG_003"),
    (domain.ImageDeleted("undelete it"), grpc.StatusCode.FAILED_PRECONDITION, "IMG_003"),
    (domain.StorageFailed("s3 down"), grpc.StatusCode.UNAVAILABLE, "IMG_004"),
    (
        domain.RateLimited("slow down", retry_after=timedelta(seconds=30)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "IMG_005",
    ),
    (domain.InsufficientCredits("buy more"), grpc.StatusCode.FAILED_PRECONDITION, "IMG_006"),
    (domain.ImageTooLarge("too big"), grpc.StatusCode.INVALID_ARGUMENT, "IMG_007"),
    (domain.StorageQuotaExceeded("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "IMG_008"),
    (domain.RequestIdReused("reused"), grpc.StatusCode.FAILED_PRECONDITION, "IMG_009"),
    (domain.ContentPolicyRefused("refused"), grpc.StatusCode.INVALID_ARGUMENT, "IMG_010"),
    (
        domain.ContentBlocked("blocked", categories=("sexual", "violence")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "IMG_011",
    ),
    (
        domain.ModerationUnavailable("moderator down", retry_after=timedelta(seconds=30)),
        grpc.StatusCode.UNAVAILABLE,
        "IMG_012",
    ),
    (domain.NotFound("no such image"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (domain.PermissionDenied("read only"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (domain.Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (domain.Cancelled("cancelled"), grpc.StatusCode.CANCELLED, "CANCELLED"),
    (domain.ShuttingDown("draining"), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    (domain.StreamLimit("too many"), grpc.StatusCode.RESOURCE_EXHAUSTED, "STREAM_LIMIT"),
]


def details_of(status: status_pb2.Status) -> dict[str, object]:
    found: dict[str, object] = {}
    for any_detail in status.details:
        for message_type in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.BadRequest,
        ):
            if any_detail.Is(message_type.DESCRIPTOR):
                message = message_type()
                any_detail.Unpack(message)
                found[message_type.__name__] = message
    return found


@pytest.mark.parametrize(
    ("exc", "code", "reason"), CASES, ids=[c[2] + "-" + str(c[1]) for c in CASES]
)
def test_each_error_maps_to_its_status(
    exc: domain.ImageGenError, code: grpc.StatusCode, reason: str
) -> None:
    got_code, message, status = rich_status(exc)
    assert got_code == code
    assert message == exc.message
    assert status.code == code.value[0]
    assert status.message == message
    if reason in NOT_FOR_CALLERS:
        assert "ErrorInfo" not in details_of(status)
        return
    info = details_of(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == reason
    assert info.domain == ERROR_DOMAIN


def test_every_reason_a_caller_can_see_is_in_the_contract() -> None:
    for cls in STATUS_TABLE:
        if cls is domain.RateLimited:
            reason = error_reason(domain.RateLimited("x", retry_after=timedelta(0)))
        else:
            reason = error_reason(cls("x"))
        assert is_allowed_reason(reason) or reason in NOT_FOR_CALLERS, cls
    assert not is_allowed_reason("INTERNAL")
    assert not is_allowed_reason("UNIMPLEMENTED")
    assert not is_allowed_reason("IMG_01")
    assert is_allowed_reason("IMG_011")


def _other_reasons_listed(text: str) -> set[str]:
    """The reasons of the `Reasons that are not IMG codes` list (to its first blank line)."""
    lines = text[text.index("not IMG codes") :].splitlines()[1:]
    while lines and not lines[0].strip():
        lines.pop(0)
    block = lines[: lines.index("")] if "" in lines else lines
    row = re.compile(r"^(?://\s+|\|\s*)`?([A-Z][A-Z_]*[A-Z])`?\s")
    return {m.group(1) for m in map(row.match, block) if m}


def test_contract_and_readme_list_the_same_other_reasons() -> None:
    proto = (ROOT / "proto" / "imagegen" / "v1" / "common.proto").read_text()
    readme = (ROOT / "README.md").read_text()
    assert _other_reasons_listed(proto) == OTHER_REASONS
    assert _other_reasons_listed(readme) == OTHER_REASONS


def test_every_domain_class_is_covered() -> None:
    covered = {type(exc) for exc, _, _ in CASES}
    defined = {
        cls
        for cls in vars(domain).values()
        if isinstance(cls, type) and issubclass(cls, domain.ImageGenError)
    }
    assert defined - covered == {domain.ImageGenError}


def test_metadata_is_carried() -> None:
    exc = domain.InsufficientCredits("buy more", metadata={"needed": "4", "balance": "1"})
    info = details_of(rich_status(exc)[2])["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert dict(info.metadata) == {"needed": "4", "balance": "1"}


def test_rate_limit_carries_retry_info() -> None:
    exc = domain.RateLimited("10 per hour", retry_after=timedelta(seconds=90, milliseconds=500))
    retry = details_of(rich_status(exc)[2])["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta() == timedelta(seconds=90, milliseconds=500)


def test_retryable_provider_failure_with_retry_after_carries_retry_info() -> None:
    exc = domain.ProviderFailed("busy", retryable=True, retry_after=timedelta(seconds=5))
    retry = details_of(rich_status(exc)[2])["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 5


def test_stream_limit_carries_retry_info() -> None:
    retry = details_of(rich_status(domain.StreamLimit("10 open"))[2])["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta() == timedelta(seconds=5)


def test_blocked_content_names_categories_and_has_no_retry_info() -> None:
    found = details_of(rich_status(domain.ContentBlocked("no", categories=("hate",)))[2])
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "IMG_011" and dict(info.metadata) == {"categories": "hate"}
    assert "RetryInfo" not in found


def test_suspension_is_img_011_permission_denied_with_retry_info() -> None:
    exc = domain.ContentBlocked(
        "suspended", categories=("sexual",), retry_after=timedelta(hours=1, seconds=5)
    )
    code, _, status = rich_status(exc)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    found = details_of(status)
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "IMG_011"
    retry = found["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta() == timedelta(hours=1, seconds=5)


def test_moderation_unavailable_carries_retry_info() -> None:
    exc = domain.ModerationUnavailable("down", retry_after=timedelta(seconds=12))
    code, _, status = rich_status(exc)
    assert code == grpc.StatusCode.UNAVAILABLE and exc.retryable
    retry = details_of(status)["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 12


def test_other_errors_have_no_retry_info() -> None:
    assert "RetryInfo" not in details_of(rich_status(domain.NotFound("gone"))[2])


def test_invalid_field_carries_bad_request() -> None:
    exc = domain.InvalidRequest("prompt is longer than 4000 characters", field="spec.prompt")
    found = details_of(rich_status(exc)[2])
    bad_request = found["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    [violation] = bad_request.field_violations
    assert violation.field == "spec.prompt"
    assert violation.description == exc.message
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.metadata["field"] == "spec.prompt"


def test_invalid_request_without_field_has_no_bad_request() -> None:
    assert "BadRequest" not in details_of(rich_status(domain.InvalidRequest("bad"))[2])


def test_unexpected_error_is_generic_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    token = current_request_id.set("req-42")
    try:
        with caplog.at_level(logging.ERROR):
            code, message, status = rich_status(KeyError("secret internals"))
    finally:
        current_request_id.reset(token)
    assert code == grpc.StatusCode.INTERNAL
    assert "secret internals" not in message
    assert "req-42" in message
    # No ErrorInfo (a bug has no stable reason), but the request id to quote.
    assert "ErrorInfo" not in details_of(status)
    info = error_details_pb2.RequestInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    assert info.request_id == "req-42"
    # The traceback stays in the log.
    assert any(
        record.exc_info and "secret internals" in str(record.exc_info[1])
        for record in caplog.records
    )


#: ImageDeleted refines IMG_003's status for a direct refusal; a stored IMG_003 (a job's
#: failure) is rebuilt as the InvalidRequest it was.
ROUND_TRIPS = [c for c in CASES if type(c[0]) is not domain.ImageDeleted]


def test_a_stored_img_003_is_rebuilt_as_invalid_request() -> None:
    rebuilt = error_from_code("IMG_003", "source purged", False)
    assert type(rebuilt) is domain.InvalidRequest
    assert rich_status(rebuilt)[0] == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("exc", "code", "reason"), ROUND_TRIPS, ids=[c[2] + "-" + str(c[1]) for c in ROUND_TRIPS]
)
def test_error_from_code_round_trips(
    exc: domain.ImageGenError, code: grpc.StatusCode, reason: str
) -> None:
    rebuilt = error_from_code(reason, "stored message", exc.retryable)
    assert type(rebuilt) is type(exc)
    assert rebuilt.message == "stored message"
    assert rich_status(rebuilt)[0] == code


def test_error_from_code_keeps_provider_retryability() -> None:
    assert rich_status(error_from_code("IMG_002", "x", True))[0] == grpc.StatusCode.UNAVAILABLE
    assert rich_status(error_from_code("IMG_002", "x", False))[0] == grpc.StatusCode.INTERNAL


def test_error_from_unknown_code_keeps_the_code() -> None:
    rebuilt = error_from_code("IMG_999", "from the future", False)
    code, message, status = rich_status(rebuilt)
    assert code == grpc.StatusCode.INTERNAL
    assert message == "from the future"
    info = details_of(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "IMG_999"
    # The class attribute is untouched.
    assert domain.ImageGenError.code == ""


@pytest.mark.parametrize("stored_code", ["", "NOT_FOUND_IN_STORAGE", "internal"])
def test_stored_failure_without_an_img_code_is_a_failed_generation(stored_code: str) -> None:
    rebuilt = error_from_code(stored_code, "the source image is gone", False)
    code, message, status = rich_status(rebuilt)
    assert code == grpc.StatusCode.INTERNAL
    info = details_of(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "IMG_002"
    assert message == "the source image is gone"


def test_unimplemented_has_no_error_info() -> None:
    code, _, status = rich_status(NotImplementedError())
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "ErrorInfo" not in details_of(status)


@pytest.mark.parametrize("quoted", ["x" * 10_000, "ünï🦊" * 3_000])
def test_a_status_quoting_long_input_stays_small(quoted: str) -> None:
    # A client refuses trailers past 8 KiB; the caller would see RESOURCE_EXHAUSTED.
    exc = domain.InvalidRequest(
        f"time zone {quoted!r} is not known", field="time_zone", metadata={"zone": quoted}
    )
    code, message, status = rich_status(exc)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message.encode()) <= 400 and message.endswith("...")
    assert message.startswith("time zone ")
    info = details_of(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert len(info.metadata["zone"].encode()) <= 200
    assert info.metadata["field"] == "time_zone"
    percent_encoded = sum(1 if b < 0x80 else 3 for b in message.encode())
    assert percent_encoded + len(status.SerializeToString()) * 4 // 3 < 4096
