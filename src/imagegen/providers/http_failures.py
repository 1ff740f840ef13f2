"""One reading of provider HTTP failures, shared by every HTTP provider (forge, openai,
sdwebui), so that retries and the circuit breaker judge them all alike.

    what happened                              raised                     retried  breaker
    connect error, connect or pool timeout     ProviderUnavailable        yes      counts
    (the request never left us)
    read/write timeout, deadline, a connection ProviderUnavailable        never    counts
    lost after sending (ambiguous: the call
    may have run and been billed)
    HTTP 429                                   ProviderUnavailable        yes      counts once
                                               (throttled, Retry-After)            retries end
    HTTP 5xx, 408                              ProviderUnavailable        yes      counts
                                               (Retry-After)
    a content-policy refusal (the provider     ContentPolicyRefused       no       no
    says how; its module decides)              (IMG_010)
    HTTP 401, 403                              ProviderFailed (our key)   no       no
    any other 4xx: caused by the request       ProviderFailed             no       no

"Counts" means it counts toward opening the provider's circuit breaker
(providers/resilience.py): only failures that say the provider is down, overloaded or
broken do. A refusal caused by one request is the provider working as it should, and
must not pause the provider for everyone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx

from imagegen.domain.errors import ContentPolicyRefused, ImageGenError, ProviderFailed
from imagegen.providers.base import ProviderUnavailable
from imagegen.providers.http_headers import retry_after

#: Transport errors raised before a request could reach the provider: safe to send again.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def transport_failure(exc: BaseException, *, provider: str, timeout: float) -> ProviderFailed:
    """The domain error for a timeout or transport error of a call to `provider`."""
    if isinstance(exc, _NEVER_SENT):
        return ProviderUnavailable(
            f"the {provider} provider could not be reached ({type(exc).__name__})",
            retryable=True,
        )
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        # The call may have run (and billed) at the provider: never sent blindly again.
        return ProviderUnavailable(
            f"the {provider} provider did not answer within {timeout:.1f}s",
            metadata={"timeout_s": f"{timeout:.1f}"},
        )
    # Lost after the request went out (reset, protocol error): as ambiguous as a timeout.
    return ProviderUnavailable(
        f"the {provider} provider dropped the connection ({type(exc).__name__}); "
        "the call was not repeated because it may have run"
    )


@contextlib.contextmanager
def transport_errors(*, provider: str, timeout: float) -> Iterator[None]:
    """Translate timeouts and httpx transport errors raised inside into domain errors."""
    try:
        yield
    except (TimeoutError, httpx.TransportError) as exc:
        raise transport_failure(exc, provider=provider, timeout=timeout) from exc


def status_failure(
    status: int,
    *,
    provider: str,
    reply: httpx.Response | None = None,
    key_setting: str = "",
    detail: str = "",
    provider_code: str = "",
    content_policy: bool = False,
) -> ImageGenError | None:
    """The domain error for an HTTP status of `provider`'s reply (None below 400).

    `detail` is the provider's own short message, `provider_code` its error code, and
    `content_policy` whether the provider's error says the content was refused (each
    provider signals that its own way)."""
    if status < 400:
        return None
    metadata = {"http_status": str(status)}
    if provider_code:
        metadata["provider_code"] = provider_code
    said = f" ({detail[:300]})" if detail else ""
    if content_policy:
        return ContentPolicyRefused(
            f"the {provider} provider refused the request under its content policy; "
            f"change the prompt or image{said}",
            metadata=metadata,
        )
    if status == 429:
        return ProviderUnavailable(
            f"the {provider} provider is busy (HTTP 429); try again later",
            retryable=True,
            throttled=True,
            retry_after=retry_after(reply),
            metadata=metadata,
        )
    if status >= 500 or status == 408:
        return ProviderUnavailable(
            f"the {provider} provider is failing (HTTP {status}){said}; try again later",
            retryable=True,
            retry_after=retry_after(reply),
            metadata=metadata,
        )
    if status in (401, 403):
        check = f"; check {key_setting}" if key_setting else ""
        return ProviderFailed(
            f"the {provider} provider refused our credentials (HTTP {status}){check}",
            metadata=metadata,
        )
    return ProviderFailed(
        f"the {provider} provider rejected the request (HTTP {status}){said}",
        metadata=metadata,
    )


def raise_for_status(
    reply: httpx.Response,
    *,
    provider: str,
    key_setting: str = "",
    detail: str = "",
    provider_code: str = "",
    content_policy: bool = False,
) -> None:
    """Raise `status_failure` for the reply when its status is 400 or more."""
    failure = status_failure(
        reply.status_code,
        provider=provider,
        reply=reply,
        key_setting=key_setting,
        detail=detail,
        provider_code=provider_code,
        content_policy=content_policy,
    )
    if failure is not None:
        raise failure
