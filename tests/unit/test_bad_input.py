"""Malformed input at the domain and conversion edges: each is IMG_003 naming its field,
never an exception that would reach a caller as INTERNAL."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from imagegen.domain import paging
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.validation import check_resource_name, check_text
from imagegen.services.usage import time_range

SCOPE = "tags|query|False"
REAL_ID = "0b7e4f0e-4b7a-4a51-9b55-4f1f5f7c2d10"
REAL_TIME = "2026-03-04T05:06:07.123456+00:00"


def token_of(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def raw_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def real() -> dict[str, Any]:
    return {"t": REAL_TIME, "i": REAL_ID, "s": SCOPE}


TAMPERED = {
    "id-nope": token_of({**real(), "i": "nope"}),
    "id-null": token_of({**real(), "i": None}),
    "id-number": token_of({**real(), "i": 5}),
    "id-bool": token_of({**real(), "i": True}),
    "id-list": token_of({**real(), "i": [REAL_ID]}),
    "id-object": token_of({**real(), "i": {"i": REAL_ID}}),
    "id-uppercase": token_of({**real(), "i": REAL_ID.upper()}),
    "id-braces": token_of({**real(), "i": "{" + REAL_ID + "}"}),
    "id-nul": token_of({**real(), "i": REAL_ID + "\x00"}),
    "id-deep": raw_token(json.dumps(real()).replace(f'"{REAL_ID}"', "[" * 100_000 + "]" * 100_000)),
    "time-null": token_of({**real(), "t": None}),
    "time-number": token_of({**real(), "t": 1_700_000_000}),
    "time-garbage": token_of({**real(), "t": "yesterday"}),
    "time-naive": token_of({**real(), "t": "2026-03-04T05:06:07"}),
    "time-overflows-utc-low": token_of({**real(), "t": "0001-01-01T00:00:00+14:00"}),
    "time-overflows-utc-high": token_of({**real(), "t": "9999-12-31T23:59:59-14:00"}),
    "scope-null": token_of({**real(), "s": None}),
    "scope-number": token_of({**real(), "s": 5}),
    "missing-id": token_of({"t": REAL_TIME, "s": SCOPE}),
    "missing-time": token_of({"i": REAL_ID, "s": SCOPE}),
    "not-an-object": token_of([REAL_TIME, REAL_ID, SCOPE]),
    "null": token_of(None),
    "string": token_of("text"),
    "deep-array": raw_token("[" * 100_000 + "]" * 100_000),
    "not-json": raw_token("{nope"),
    "not-utf8": base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
    "not-base64": "%%%garbage",
    "huge": "A" * 1_000_000,
    "other-scope": token_of({**real(), "s": "other"}),
}


@pytest.mark.parametrize("token", TAMPERED.values(), ids=TAMPERED.keys())
def test_tampered_page_token_is_img_003_on_page_token(token: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        paging.decode_cursor(token, SCOPE)
    assert caught.value.field == "page_token"


def test_real_page_token_still_decodes_to_utc() -> None:
    cursor = paging.decode_cursor(
        token_of({**real(), "t": "2026-03-04T07:06:07.123456+02:00"}), SCOPE
    )
    assert cursor == paging.Cursor(datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC), REAL_ID)
    assert cursor is not None and cursor.created_at.utcoffset() is not None


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "\x07bell", "esc\x1b[0m", "del\x7f", "c1\x85"])
@pytest.mark.parametrize("multiline", [False, True])
def test_control_characters_are_refused(text: str, multiline: bool) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_text(text, "title", multiline=multiline)
    assert caught.value.field == "title"


def test_printable_text_and_line_breaks_pass_where_allowed() -> None:
    assert check_text("ünïcödé ✓ 日本語 🦊 \u202e", "title") == "ünïcödé ✓ 日本語 🦊 \u202e"
    assert check_text("two\nlines\r\n\tindented", "description", multiline=True)
    for text in ("two\nlines", "tab\there", "cr\r"):
        with pytest.raises(InvalidRequest):
            check_text(text, "title")


def test_resource_names_must_hold_an_id_of_their_collection() -> None:
    real = "0B7E4F0E-4b7a-4a51-9b55-4f1f5f7c2d10"
    assert check_resource_name("images/" + real, "images") == real.lower()
    assert check_resource_name(real, "images") == real.lower()
    for name in (
        "",
        "images/",
        "images/../x",
        "images/nope",
        "templates/" + real,
        "images/" + real + "/x",
        "images/\x00",
        "x" * 10_000,
        "images/{" + real + "}",
    ):
        with pytest.raises(InvalidRequest) as caught:
            check_resource_name(name, "images", field="sources")
        assert caught.value.field == "sources"
        assert len(caught.value.message) < 200


def test_usage_time_range_at_the_start_of_the_calendar() -> None:
    earliest = datetime.min.replace(tzinfo=UTC)
    with pytest.raises(InvalidRequest) as caught:
        time_range(None, earliest)
    assert caught.value.field == "end_time"
    assert time_range(None, earliest + timedelta(days=2)) == (
        earliest,
        earliest + timedelta(days=2),
    )
    latest = datetime.max.replace(tzinfo=UTC)
    assert time_range(None, latest) == (latest - timedelta(days=30), latest)
