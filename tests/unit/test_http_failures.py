"""The one HTTP-failure classifier every HTTP provider uses."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from imagegen.domain.errors import ContentPolicyRefused, ProviderFailed
from imagegen.providers.base import ProviderUnavailable
from imagegen.providers.http_failures import (
    raise_for_status,
    status_failure,
    transport_errors,
    transport_failure,
)

REQUEST = httpx.Request("POST", "http://127.0.0.1:9/x")


def reply(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=REQUEST)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_server_failures_are_retryable_and_count_against_the_provider(status: int) -> None:
    failure = status_failure(status, provider="p", reply=reply(status, {"Retry-After": "3"}))
    assert isinstance(failure, ProviderUnavailable)
    assert failure.retryable and not failure.throttled
    assert failure.retry_after == timedelta(seconds=3)
    assert failure.metadata["http_status"] == str(status)


def test_429_is_retryable_and_marked_throttled() -> None:
    failure = status_failure(429, provider="p", reply=reply(429, {"Retry-After": "7"}))
    assert isinstance(failure, ProviderUnavailable)
    assert failure.retryable and failure.throttled
    assert failure.retry_after == timedelta(seconds=7)


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_request_caused_failures_are_final_and_not_the_providers_fault(status: int) -> None:
    failure = status_failure(status, provider="p", detail="prompt too long")
    assert type(failure) is ProviderFailed
    assert not failure.retryable
    assert "prompt too long" in failure.message


@pytest.mark.parametrize("status", [401, 403])
def test_credentials_refused_name_the_setting(status: int) -> None:
    failure = status_failure(status, provider="p", key_setting="P_API_KEY")
    assert type(failure) is ProviderFailed and not failure.retryable
    assert "P_API_KEY" in failure.message


@pytest.mark.parametrize("status", [400, 403, 422])
def test_content_policy_is_img_010_whatever_the_status(status: int) -> None:
    failure = status_failure(status, provider="p", content_policy=True, provider_code="blocked")
    assert isinstance(failure, ContentPolicyRefused)
    assert failure.code == "IMG_010" and failure.metadata["provider_code"] == "blocked"


def test_success_is_no_failure() -> None:
    assert status_failure(200, provider="p") is None
    raise_for_status(reply(204), provider="p")
    with pytest.raises(ProviderUnavailable):
        raise_for_status(reply(503), provider="p")


def test_an_ambiguous_timeout_is_never_retryable() -> None:
    for exc in (TimeoutError(), httpx.ReadTimeout("slow"), httpx.WriteTimeout("slow")):
        failure = transport_failure(exc, provider="p", timeout=2.0)
        assert isinstance(failure, ProviderUnavailable)
        assert not failure.retryable, type(exc).__name__
        assert "did not answer within 2.0s" in failure.message


def test_a_request_that_never_left_is_retryable() -> None:
    for exc in (
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow"),
        httpx.PoolTimeout("no free connection"),
    ):
        failure = transport_failure(exc, provider="p", timeout=2.0)
        assert isinstance(failure, ProviderUnavailable) and failure.retryable


def test_a_connection_lost_after_sending_is_as_ambiguous_as_a_timeout() -> None:
    for exc in (
        httpx.ReadError("reset"),
        httpx.WriteError("reset"),
        httpx.RemoteProtocolError("server disconnected without sending a response"),
    ):
        failure = transport_failure(exc, provider="p", timeout=2.0)
        assert isinstance(failure, ProviderUnavailable)
        assert not failure.retryable, type(exc).__name__
        assert "may have run" in failure.message


def test_transport_errors_translates_what_it_wraps() -> None:
    with pytest.raises(ProviderUnavailable) as caught, transport_errors(provider="p", timeout=1):
        raise httpx.ConnectError("refused")
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    with pytest.raises(KeyError), transport_errors(provider="p", timeout=1):
        raise KeyError("not a transport error")
