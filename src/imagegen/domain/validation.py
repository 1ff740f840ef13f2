"""Limits on every field of a request, checked before anything is stored: generation
parameters, free text and resource names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import STANDARD_SIZES, Size

MAX_PROMPT_CHARS = 4000
MAX_NEGATIVE_PROMPT_CHARS = 1000
MIN_COUNT = 1
MAX_COUNT = 4
MAX_SEED = 2**32 - 1
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]+")
_PROVIDER_ID = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: C0 and C1 control characters and DEL (Unicode category Cc). PostgreSQL text cannot
#: hold NUL at all, and the others only garble names, tags and logs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: The same, but tab, newline and carriage return pass (descriptions and prompts).
_CONTROL_BUT_LINE_BREAKS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: Every resource id is a UUID (any letter case).
_RESOURCE_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


@dataclass(frozen=True)
class RequestLimits:
    """Per-deployment bounds that are configuration rather than contract."""

    allowed_sizes: tuple[Size, ...] = STANDARD_SIZES


def check_prompt(prompt: str, *, field: str = "prompt") -> str:
    """A prompt is 1-4000 characters and not only whitespace."""
    if not prompt.strip():
        raise InvalidRequest(f"{field} is empty: describe the image to make", field=field)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"{field} has {len(prompt)} characters; shorten it to at most {MAX_PROMPT_CHARS}",
            field=field,
            metadata={"limit": str(MAX_PROMPT_CHARS)},
        )
    check_text(prompt, field, multiline=True)
    return prompt


def check_negative_prompt(negative_prompt: str) -> str:
    """The negative prompt is optional and at most 1000 characters."""
    if len(negative_prompt) > MAX_NEGATIVE_PROMPT_CHARS:
        raise InvalidRequest(
            f"negative_prompt has {len(negative_prompt)} characters; "
            f"shorten it to at most {MAX_NEGATIVE_PROMPT_CHARS}",
            field="negative_prompt",
            metadata={"limit": str(MAX_NEGATIVE_PROMPT_CHARS)},
        )
    check_text(negative_prompt, "negative_prompt", multiline=True)
    return negative_prompt


def check_count(count: int) -> int:
    """A request makes 1 to 4 images."""
    if not MIN_COUNT <= count <= MAX_COUNT:
        raise InvalidRequest(
            f"count is {count}; ask for {MIN_COUNT} to {MAX_COUNT} images",
            field="count",
            metadata={"min": str(MIN_COUNT), "max": str(MAX_COUNT)},
        )
    return count


def check_size(size: Size, limits: RequestLimits) -> Size:
    """Only the listed sizes are accepted."""
    if size not in limits.allowed_sizes:
        allowed = ", ".join(str(s) for s in limits.allowed_sizes)
        raise InvalidRequest(
            f"size {size} is not offered; use one of {allowed}",
            field="size",
            metadata={"allowed": allowed},
        )
    return size


def check_seed(seed: int | None) -> int | None:
    """Seeds are unsigned 32-bit integers."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}", field="seed")
    return seed


def check_request_id(request_id: str) -> str:
    """Request ids are optional, up to 128 characters of [A-Za-z0-9._:-]."""
    if not request_id:
        return request_id
    if len(request_id) > MAX_REQUEST_ID_CHARS or not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequest(
            f"request_id must be 1-{MAX_REQUEST_ID_CHARS} characters of letters, digits "
            "and . _ : -  (a UUID works)",
            field="request_id",
        )
    return request_id


def check_provider_id(provider: str) -> str:
    """Provider ids are short lowercase names such as `local` or `forge`."""
    if provider and not _PROVIDER_ID.fullmatch(provider):
        raise InvalidRequest(f"provider {provider!r} is not a provider id", field="provider")
    return provider


def check_text(text: str, field: str, *, multiline: bool = False) -> str:
    """Text without NUL or other control characters (tab, newline and carriage return
    are allowed where `multiline`); IMG_003 naming `field` otherwise."""
    pattern = _CONTROL_BUT_LINE_BREAKS if multiline else _CONTROL
    found = pattern.search(text)
    if found is not None:
        raise InvalidRequest(
            f"{field} contains the control character U+{ord(found.group()):04X}; "
            "send printable text" + (" (tabs and line breaks are fine)" if multiline else ""),
            field=field,
        )
    return text


def _shown(value: str, limit: int = 60) -> str:
    """A caller's value quoted for a message: escaped, and cut short if long."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_resource_name(name: str, collection: str, *, field: str = "name") -> str:
    """The id in `{collection}/{id}` (a bare id is accepted too), in lowercase; IMG_003
    naming `field` for anything that cannot name a resource of that collection."""
    if not name:
        raise InvalidRequest(f"{field} is required, as {collection}/{{id}}", field=field)
    resource_id = name.removeprefix(collection + "/")
    if not _RESOURCE_ID.fullmatch(resource_id):
        raise InvalidRequest(
            f"{field} {_shown(name)} is not a name of the form {collection}/{{id}}",
            field=field,
        )
    return resource_id.lower()
