"""Blob keys: `generated/{user}/{YYYY}/{MM}/{timestamp}-{id}.{ext}` for generated images and
`sources/{user}/{YYYY}/{MM}/{timestamp}-{id}.{ext}` for uploaded edit sources.

`{user}` is one path component made from the caller's id (a JWT `sub`, any text) by
`user_segment`, so every user's blobs sit under a folder of their own:

- A simple id (`alice`, `user-42`, `svc@team`: a letter or digit, then up to 254 of
  `A-Z a-z 0-9 . _ @ : -`, no `..`) is used as it is, so keys of existing ids read and stay
  as they always were.
- Any other id becomes `_` followed by the id with every character outside
  `A-Z a-z 0-9 . @ : -` written as `_XX` per UTF-8 byte (uppercase hex): `auth0|5f7c` ->
  `_auth0_7C5f7c`, `Jane Doe` -> `_Jane_20Doe`, `../x` -> `_.._2Fx`. `user_id_of_segment`
  turns it back.
- An id whose escaped form would not fit one file name (255 bytes on common filesystems)
  becomes `_`, the first part of the escaped form, `_-` and the SHA-256 of the id in hex.
  S3 keys are limited to 1,024 bytes, which a reversible form of a 255-character unicode id
  cannot meet; the digest keeps the folder one per id without that limit.

The three forms never meet: a simple id starts with a letter or digit, the others with `_`;
an escaped form never holds `_-` (an `_` is always followed by two hex digits) and a
digest form always does. Keys hold only ASCII letters, digits and `. _ @ : - /`, so they
are safe as S3 keys, in URLs and as relative paths (no component is empty, `.` or `..`).
"""

from __future__ import annotations

import hashlib
import re
import string
import uuid
from datetime import UTC, datetime

_SIMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:\-]{0,254}")
_EXTENSION = re.compile(r"[a-z0-9]{1,8}")
_KEPT = frozenset(string.ascii_letters + string.digits + ".@:-")
_ESCAPE = re.compile(r"_([0-9A-F]{2})")
_DIGEST_MARK = "_-"
#: Longest path component written: the common NAME_MAX of Linux and macOS filesystems.
MAX_SEGMENT_CHARS = 255
#: How much of the escaped id a digest form keeps in front, for people reading a listing.
_DIGEST_HEAD_CHARS = 120
#: Image and source ids are ours (UUIDs); the bound keeps file names well inside NAME_MAX.
_MAX_ITEM_ID_CHARS = 128


def _escape(user_id: str) -> str:
    parts: list[str] = []
    for char in user_id:
        if char in _KEPT:
            parts.append(char)
        else:
            # surrogatepass: a str from JSON may hold a lone surrogate; it still gets a
            # distinct key here (identity refuses such ids before they reach storage).
            parts.extend(f"_{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(parts)


def user_segment(user_id: str) -> str:
    """The one path component that holds `user_id`'s blobs (see the module docstring).
    Raises ValueError for an empty id."""
    if not user_id:
        raise ValueError("an empty user id cannot be used in a blob key")
    if _SIMPLE_ID.fullmatch(user_id) and ".." not in user_id:
        return user_id
    escaped = _escape(user_id)
    if 1 + len(escaped) <= MAX_SEGMENT_CHARS:
        return "_" + escaped
    head = escaped[:_DIGEST_HEAD_CHARS]
    # Cut before an escape split in two so the head still reads as text.
    cut = head.rfind("_", len(head) - 2)
    if cut != -1:
        head = head[:cut]
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"_{head}{_DIGEST_MARK}{digest}"


def user_id_of_segment(segment: str) -> str | None:
    """The user id a segment was made from, or None for a digest form (one-way).
    Raises ValueError for text `user_segment` never produces."""
    if not segment.startswith("_"):
        if _SIMPLE_ID.fullmatch(segment) and ".." not in segment:
            return segment
        raise ValueError(f"{segment!r} is not a user segment")
    if _DIGEST_MARK in segment:
        return None
    body = segment[1:]
    raw = bytearray()
    position = 0
    for match in _ESCAPE.finditer(body):
        raw += body[position : match.start()].encode("ascii", "replace")
        raw.append(int(match.group(1), 16))
        position = match.end()
    raw += body[position:].encode("ascii", "replace")
    try:
        user_id = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise ValueError(f"{segment!r} is not a user segment") from None
    if user_segment(user_id) != segment:
        # Only the one canonical spelling is accepted (no `_alice` for `alice`, no stray `_`).
        raise ValueError(f"{segment!r} is not a user segment")
    return user_id


def _dated_key(folder: str, user_id: str, item_id: str, extension: str, now: datetime) -> str:
    if not _SIMPLE_ID.fullmatch(item_id) or ".." in item_id or len(item_id) > _MAX_ITEM_ID_CHARS:
        raise ValueError(f"id {item_id!r} cannot be used in a blob key")
    if not _EXTENSION.fullmatch(extension):
        raise ValueError(f"extension {extension!r} cannot be used in a blob key")
    moment = now.astimezone(UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%S%fZ")
    user = user_segment(user_id)
    return f"{folder}/{user}/{moment:%Y}/{moment:%m}/{stamp}-{item_id}.{extension}"


def blob_key(user_id: str, image_id: str, extension: str, now: datetime) -> str:
    """The key of a new image blob; sortable by time within a user's folder.
    Raises ValueError for an empty user id or an image id or extension that is not simple."""
    return _dated_key("generated", user_id, image_id, extension, now)


def source_key(user_id: str, extension: str, now: datetime) -> str:
    """The key of a new uploaded edit source (a random id); sortable by time per user."""
    return _dated_key("sources", user_id, str(uuid.uuid4()), extension, now)
