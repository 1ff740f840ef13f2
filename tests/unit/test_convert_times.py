"""Times in replies: our Timestamp conversion is protobuf's FromDatetime, faster, and a
signed URL's expiry is its lifetime from now."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from imagegen.api import convert
from imagegen.domain.models import StoredImage

MOMENTS = [
    datetime(2026, 11, 25, 15, 8, 16, 123456, tzinfo=UTC),
    datetime(2026, 11, 25, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-7))),
    datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=5, minutes=45))),
    datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, 6),  # naive: UTC, as FromDatetime reads it
]


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_timestamps_are_protobufs_own(moment: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(moment)
    assert convert._timestamp(moment) == expected


def test_no_time_is_no_timestamp() -> None:
    assert convert._timestamp(None) is None


def test_a_signed_urls_expiry_is_its_lifetime_from_now() -> None:
    image = StoredImage(
        id="0b3c0f8e-1d2a-4a9e-9a57-1f2c3d4e5f60",
        user_id="alice",
        generation_id="",
        storage_key="k.png",
        mime_type="image/png",
        width=1,
        height=1,
        size_bytes=1,
        provider="local",
        model="",
        prompt="p",
        created_at=MOMENTS[0],
        url="https://example.test/k.png",
    )
    before = int(time.time())
    message = convert.image_to_proto(image, timedelta(minutes=15), usage_notice="AI")
    after = int(time.time())
    assert before + 900 <= message.uri_expire_time.seconds <= after + 900
    assert message.uri_expire_time.nanos == 0
    assert message.create_time == convert._timestamp(MOMENTS[0])
    unsigned = convert.image_to_proto(
        dataclasses.replace(image, url=""), timedelta(minutes=15), usage_notice="AI"
    )
    assert not unsigned.HasField("uri_expire_time")
