"""Blob keys: `generated/{user_id}/{YYYY}/{MM}/{timestamp}-{id}.{ext}`."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:\-]{0,127}")
_EXTENSION = re.compile(r"[a-z0-9]{1,8}")


def blob_key(user_id: str, image_id: str, extension: str, now: datetime) -> str:
    """The key of a new image blob; sortable by time within a user's folder.
    Raises ValueError for parts that could escape their folder."""
    for label, part in (("user_id", user_id), ("image_id", image_id)):
        if not _SAFE_PART.fullmatch(part) or ".." in part:
            raise ValueError(f"{label} {part!r} cannot be used in a blob key")
    if not _EXTENSION.fullmatch(extension):
        raise ValueError(f"extension {extension!r} cannot be used in a blob key")
    moment = now.astimezone(UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%S%fZ")
    return f"generated/{user_id}/{moment:%Y}/{moment:%m}/{stamp}-{image_id}.{extension}"
