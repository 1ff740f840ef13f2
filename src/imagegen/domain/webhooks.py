"""Signed webhooks the Standard Webhooks way (https://www.standardwebhooks.com/): the
secret format, the signature, the event types, the callback URL's rules and the retry
schedule. Plain values and functions; sending and storing live in services/ and
repositories/.

A callback is a POST whose headers are

    webhook-id:        msg_...   (the same on every attempt: receivers drop duplicates)
    webhook-timestamp: unix seconds of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">

with one `v1,...` per signing secret, separated by spaces (two during a rotation's grace
period). A secret is `whsec_` + base64 of its key bytes.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import GenerationState

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
#: Key bytes of a new secret (the contract's WebhookSecret says 32).
SECRET_BYTES = 32
MAX_CALLBACK_URI_CHARS = 2048
#: Standard Webhooks' message id prefix.
WEBHOOK_ID_PREFIX = "msg_"


class WebhookEventType(enum.StrEnum):
    """The `type` of a callback's body."""

    GENERATION_COMPLETED = "generation.completed"
    GENERATION_FAILED = "generation.failed"
    GENERATION_CANCELLED = "generation.cancelled"
    #: every job of a batch has ended (each in its own state)
    BATCH_COMPLETED = "batch.completed"


_EVENT_FOR_STATE = {
    GenerationState.COMPLETED: WebhookEventType.GENERATION_COMPLETED,
    GenerationState.FAILED: WebhookEventType.GENERATION_FAILED,
    GenerationState.CANCELLED: WebhookEventType.GENERATION_CANCELLED,
}


def event_type_for(state: GenerationState) -> WebhookEventType:
    """The callback's type for a job that ended in `state` (a terminal state)."""
    return _EVENT_FOR_STATE[state]


def new_webhook_id() -> str:
    """A fresh `webhook-id`, unique across deployments."""
    return WEBHOOK_ID_PREFIX + uuid.uuid4().hex


# --- secrets ----------------------------------------------------------------------------


def new_secret_key() -> bytes:
    """Key bytes of a new signing secret, from the system's CSPRNG."""
    return secrets.token_bytes(SECRET_BYTES)


def encode_secret(key: bytes) -> str:
    """The `whsec_...` form receivers configure."""
    return SECRET_PREFIX + base64.b64encode(key).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_...` secret; ValueError for anything else."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ and base64") from None
    if not key:
        raise ValueError("a webhook secret is not empty")
    return key


# --- signing ----------------------------------------------------------------------------


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of a message."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signed_headers(
    keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers, signed by every key (newest first)."""
    if not keys:
        raise ValueError("a callback is signed by at least one key")
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(k, webhook_id, timestamp, body) for k in keys),
    }


# --- the callback URL -------------------------------------------------------------------


def check_callback_uri(
    uri: str, *, allow_hosts: frozenset[str], field: str = "callback_uri"
) -> str:
    """An absolute https URL of at most 2048 characters, without credentials; plain http
    only for hosts in the fetch allowlist (IMAGEGEN_FETCH_ALLOW_HOSTS). Whether its
    address may be reached is the fetch guard's decision. Raises IMG_003 naming `field`."""
    if len(uri) > MAX_CALLBACK_URI_CHARS:
        raise InvalidRequest(
            f"{field} has {len(uri)} characters; the limit is {MAX_CALLBACK_URI_CHARS}",
            field=field,
            metadata={"limit": str(MAX_CALLBACK_URI_CHARS)},
        )
    if any(c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in uri):
        raise InvalidRequest(f"{field} holds spaces or control characters", field=field)
    try:
        parts = urlsplit(uri)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise InvalidRequest(f"{field} is not a valid URL", field=field) from None
    if parts.scheme not in ("https", "http") or not host:
        raise InvalidRequest(f"{field} must be an absolute https URL", field=field)
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(
            f"{field} must not carry credentials; put a token in its query string instead",
            field=field,
        )
    if parts.scheme == "http" and host not in allow_hosts:
        raise InvalidRequest(
            f"{field} must be https (plain http only for hosts in IMAGEGEN_FETCH_ALLOW_HOSTS)",
            field=field,
        )
    return uri


def shown_callback_uri(uri: str) -> str:
    """The URL as responses show it: without its query string (which may carry the
    receiver's token), fragment or credentials."""
    if not uri:
        return ""
    try:
        parts = urlsplit(uri)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return ""
    return f"{parts.scheme}://{netloc}{parts.path}"


# --- retries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed callback is tried again: `delays[n-1]` after the n-th attempt (the
    last delay repeats), and never more than `max_attempts` attempts in all."""

    delays: tuple[timedelta, ...]
    max_attempts: int

    def __post_init__(self) -> None:
        if not self.delays or any(d <= timedelta(0) for d in self.delays):
            raise ValueError("retry delays are positive and there is at least one")
        if self.max_attempts < 1:
            raise ValueError("at least one attempt")

    def delay_after(self, attempt: int) -> timedelta | None:
        """How long after failed attempt number `attempt` (from 1) the next one starts;
        None when that was the last one."""
        if attempt >= self.max_attempts:
            return None
        return self.delays[min(attempt, len(self.delays)) - 1]

    @property
    def total(self) -> timedelta:
        """The time from the first attempt to the last, if every one fails at once."""
        return sum(
            (self.delay_after(n) or timedelta(0) for n in range(1, self.max_attempts)),
            timedelta(0),
        )


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one attempt came to: the receiver's status (0 for no answer), why it failed
    (empty when delivered) and whether the receiver accepted it (a 2xx answer)."""

    http_status: int
    error: str = ""

    @property
    def delivered(self) -> bool:
        return 200 <= self.http_status < 300 and not self.error
