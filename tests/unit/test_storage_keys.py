"""Blob keys for any user id: simple ids unchanged, others encoded reversibly and safely."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from imagegen.storage.keys import (
    MAX_SEGMENT_CHARS,
    blob_key,
    source_key,
    user_id_of_segment,
    user_segment,
)
from tests.subjects import LOOKALIKE_PAIRS, SUBJECTS

WHEN = datetime(2026, 3, 4, 5, 6, 7, 8, tzinfo=UTC)
#: The characters AWS lists as safe in object keys, less the shell-unfriendly `!*'()`, plus
#: the `@` and `:` simple ids have always used.
SAFE_KEY = re.compile(r"[A-Za-z0-9._@:/-]+")


@pytest.mark.parametrize("user_id", ["alice", "user-42", "svc@team", "a:b_c.d", "x" * 255])
def test_simple_ids_keep_the_keys_they_always_had(user_id: str) -> None:
    assert user_segment(user_id) == user_id
    assert blob_key(user_id, "id-1", "webp", WHEN) == (
        f"generated/{user_id}/2026/03/20260304T050607000008Z-id-1.webp"
    )


@pytest.mark.parametrize(
    ("user_id", "segment"),
    [
        ("auth0|5f7c", "_auth0_7C5f7c"),
        ("a+b@x.com", "_a_2Bb@x.com"),
        ("Jane Doe", "_Jane_20Doe"),
        ("Zoë", "_Zo_C3_AB"),
        ("../x", "_.._2Fx"),
        ("..", "_.."),
        ("/", "__2F"),
        ("_x", "__5Fx"),
        ("a..b", "_a..b"),
    ],
)
def test_other_ids_are_escaped_readably(user_id: str, segment: str) -> None:
    assert user_segment(user_id) == segment
    assert user_id_of_segment(segment) == user_id


@pytest.mark.parametrize("user_id", [*SUBJECTS, *(s for pair in LOOKALIKE_PAIRS for s in pair)])
def test_every_subject_gives_one_safe_component(user_id: str) -> None:
    segment = user_segment(user_id)
    assert SAFE_KEY.fullmatch(segment) and "/" not in segment
    assert segment not in (".", "..")
    assert len(segment.encode()) <= MAX_SEGMENT_CHARS
    decoded = user_id_of_segment(segment)
    assert decoded in (user_id, None)
    for key in (blob_key(user_id, "id-1", "png", WHEN), source_key(user_id, "png", WHEN)):
        assert SAFE_KEY.fullmatch(key)
        assert key.split("/")[1] == segment
        assert all(part not in ("", ".", "..") for part in key.split("/"))
        assert len(key.encode()) < 512  # S3 allows 1,024 bytes, prefix included


def test_reversible_up_to_a_file_name_then_a_digest() -> None:
    # 254 escaped characters still fit one file name with the leading `_`.
    longest = "|" * 84 + "ab"  # 84 * 3 + 2 = 254
    assert user_id_of_segment(user_segment(longest)) == longest
    too_long = longest + "c"
    segment = user_segment(too_long)
    assert user_id_of_segment(segment) is None
    assert segment.startswith("__7C_7C") and "_-" in segment
    assert user_segment("山" * 255) != user_segment("山" * 254 + "川")


def test_lookalikes_never_share_a_folder() -> None:
    corpus = [*SUBJECTS, *(s for pair in LOOKALIKE_PAIRS for s in pair)]
    segments = {user_segment(s) for s in corpus}
    assert len(segments) == len(set(corpus))
    for first, second in LOOKALIKE_PAIRS:
        assert first != second
        assert user_segment(first) != user_segment(second)


@pytest.mark.parametrize("text", ["", "_alice", "_a_7cb", "_a_", "_a_Z1", "a/b", "_é", "..", "_"])
def test_text_never_produced_is_not_a_segment(text: str) -> None:
    with pytest.raises(ValueError):
        user_id_of_segment(text)


@pytest.mark.parametrize(
    ("image_id", "extension"), [("../x", "png"), ("a/b", "png"), ("", "png"), ("id", "P/G")]
)
def test_image_ids_and_extensions_stay_simple(image_id: str, extension: str) -> None:
    with pytest.raises(ValueError):
        blob_key("alice", image_id, extension, WHEN)


def test_empty_user_id_is_refused() -> None:
    with pytest.raises(ValueError):
        blob_key("", "id", "png", WHEN)
