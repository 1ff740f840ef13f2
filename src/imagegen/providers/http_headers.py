"""Reading provider HTTP replies' headers the same way for every provider."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx


def retry_after(reply: httpx.Response | None) -> timedelta | None:
    """The reply's Retry-After, as seconds (fractions allowed) or an HTTP date; None when
    absent or unreadable."""
    if reply is None:
        return None
    value = reply.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(timedelta(seconds=float(value)), timedelta(0))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when - datetime.now(UTC), timedelta(0))
