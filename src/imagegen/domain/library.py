"""Rules of the image library: metadata limits and list filters (no I/O)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.validation import check_text

MAX_TITLE_CHARS = 200
MAX_DESCRIPTION_CHARS = 1000
MAX_TAGS = 20
MAX_TAG_CHARS = 50
MAX_QUERY_CHARS = 500
UPDATABLE_FIELDS = ("title", "description", "tags", "favorite")


class ImageKind(enum.StrEnum):
    """Which images a list shows by origin."""

    ALL = "all"
    #: made from a prompt alone (not an edit, not an upload)
    ORIGINAL = "original"
    EDIT = "edit"
    #: supplied by the caller as an edit source or mask
    UPLOAD = "upload"
    #: made by a provider: originals and edits
    GENERATED = "generated"


@dataclass(frozen=True)
class ImageQuery:
    """Filters of a library list; they combine with AND."""

    tags: tuple[str, ...] = ()
    text: str = ""
    favorites_only: bool = False
    created_from: datetime | None = None
    created_before: datetime | None = None
    kind: ImageKind = ImageKind.ALL
    show_deleted: bool = False

    def scope(self) -> str:
        """A stable description of the filters, to bind page tokens to them."""
        return "|".join(
            [
                ",".join(self.tags),
                self.text,
                str(self.favorites_only),
                str(self.created_from),
                str(self.created_before),
                self.kind.value,
                str(self.show_deleted),
            ]
        )


@dataclass(frozen=True)
class MetadataUpdate:
    """New values for the named fields only."""

    fields: tuple[str, ...]
    title: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    favorite: bool = False


def clean_tags(tags: tuple[str, ...] | list[str], *, field: str = "tags") -> tuple[str, ...]:
    """Trimmed, de-duplicated tags within their limits; IMG_003 otherwise."""
    cleaned: list[str] = []
    for tag in tags:
        value = tag.strip()
        if not 1 <= len(value) <= MAX_TAG_CHARS:
            raise InvalidRequest(f"each tag must be 1 to {MAX_TAG_CHARS} characters", field=field)
        check_text(value, field)
        if value not in cleaned:
            cleaned.append(value)
    if len(cleaned) > MAX_TAGS:
        raise InvalidRequest(f"at most {MAX_TAGS} tags", field=field)
    return tuple(cleaned)


def check_query(query: ImageQuery) -> ImageQuery:
    if len(query.text) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"query must be at most {MAX_QUERY_CHARS} characters", field="query")
    check_text(query.text, "query")
    if query.created_from and query.created_before and query.created_from >= query.created_before:
        raise InvalidRequest(
            "create_time_start must be before create_time_end", field="create_time_start"
        )
    return ImageQuery(
        tags=clean_tags(query.tags),
        text=query.text.strip(),
        favorites_only=query.favorites_only,
        created_from=query.created_from,
        created_before=query.created_before,
        kind=query.kind,
        show_deleted=query.show_deleted,
    )


def check_update(update: MetadataUpdate) -> MetadataUpdate:
    """Only known fields, each within its limit."""
    fields = update.fields or UPDATABLE_FIELDS
    if "*" in fields:
        fields = UPDATABLE_FIELDS
    unknown = [f for f in fields if f not in UPDATABLE_FIELDS]
    if unknown:
        raise InvalidRequest(
            f"update_mask names fields that cannot change: {', '.join(unknown)}",
            field="update_mask",
        )
    if "title" in fields:
        if len(update.title) > MAX_TITLE_CHARS:
            raise InvalidRequest(
                f"title must be at most {MAX_TITLE_CHARS} characters", field="title"
            )
        check_text(update.title, "title")
    if "description" in fields:
        if len(update.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequest(
                f"description must be at most {MAX_DESCRIPTION_CHARS} characters",
                field="description",
            )
        check_text(update.description, "description", multiline=True)
    tags = clean_tags(update.tags) if "tags" in fields else ()
    return MetadataUpdate(
        fields=tuple(dict.fromkeys(fields)),
        title=update.title,
        description=update.description,
        tags=tags,
        favorite=update.favorite,
    )
