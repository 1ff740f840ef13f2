"""Opaque cursor page tokens for keyset pagination (newest first)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime

from imagegen.domain.errors import InvalidRequest

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


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
    """None for an empty token; IMG_003 for a malformed one or one from other filters."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor = Cursor(datetime.fromisoformat(data["t"]), str(data["i"]))
        matches = data.get("s") == scope
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidRequest("page_token is not valid", field="page_token") from None
    if not matches:
        raise InvalidRequest(
            "page_token belongs to a different query; keep the filters the same",
            field="page_token",
        )
    return cursor
