"""Opaque cursor page tokens for keyset pagination (newest first)."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from imagegen.domain.errors import InvalidRequest

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
#: Far above any token we issue (a timestamp, a UUID and the query's filters, base64).
MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True)
class Cursor:
    """The last row of a page: the next page starts strictly after it."""

    created_at: datetime
    id: str


def page_size(requested: int) -> int:
    """0 means the default; 1-100 are taken as they are; anything else is IMG_003."""
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= requested <= MAX_PAGE_SIZE:
        raise InvalidRequest(
            f"page_size must be between 1 and {MAX_PAGE_SIZE} (0 for {DEFAULT_PAGE_SIZE})",
            field="page_size",
        )
    return requested


def encode_cursor(cursor: Cursor, scope: str) -> str:
    """A token bound to `scope` (the query's filters), so it cannot be replayed elsewhere."""
    raw = json.dumps({"t": cursor.created_at.isoformat(), "i": cursor.id, "s": scope})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(token: str, scope: str) -> Cursor | None:
    """None for an empty token; IMG_003 for a malformed one or one from other filters.

    A token comes back from the caller, so every part is checked for its type before
    use: the time must be an ISO 8601 instant with an offset, the id a UUID (every
    listed resource has one) and the scope the same string it was issued with."""
    if not token:
        return None
    invalid = InvalidRequest(
        "page_token is not valid: pass next_page_token from the previous page unchanged",
        field="page_token",
    )
    if len(token) > MAX_TOKEN_CHARS:
        raise invalid
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
    # A deeply nested JSON array ends in RecursionError rather than a ValueError.
    except (ValueError, binascii.Error, RecursionError):
        raise invalid from None
    if not isinstance(data, dict):
        raise invalid
    created, resource_id, issued_for = data.get("t"), data.get("i"), data.get("s")
    if not (isinstance(created, str) and isinstance(resource_id, str)):
        raise invalid
    if not isinstance(issued_for, str):
        raise invalid
    try:
        created_at = datetime.fromisoformat(created)
        # An offset near the ends of the calendar overflows when moved to UTC.
        created_utc = created_at.astimezone(UTC) if created_at.tzinfo else None
        parsed_id = uuid.UUID(resource_id)
    except (ValueError, OverflowError):
        raise invalid from None
    if created_utc is None or str(parsed_id) != resource_id:
        raise invalid
    if issued_for != scope:
        raise InvalidRequest(
            "page_token belongs to a different query; keep the filters the same",
            field="page_token",
        )
    return Cursor(created_utc, resource_id)
