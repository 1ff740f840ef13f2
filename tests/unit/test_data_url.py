"""`data:` URLs: decoded within the limit, refused past it by their length alone."""

from __future__ import annotations

import base64

import pytest

from imagegen.domain import data_url
from imagegen.domain.data_url import decode_data_url
from imagegen.domain.errors import ImageTooLarge, InvalidRequest

LIMIT = 3000


def as_data_url(data: bytes, header: str = "data:image/png;base64") -> str:
    return f"{header},{base64.b64encode(data).decode()}"


def test_a_source_at_the_limit_is_decoded() -> None:
    data = bytes(range(256)) * (LIMIT // 256) + b"x" * (LIMIT % 256)
    assert len(data) == LIMIT
    assert decode_data_url(as_data_url(data), max_bytes=LIMIT) == data


def test_one_byte_over_the_limit_is_img_007() -> None:
    with pytest.raises(ImageTooLarge):
        decode_data_url(as_data_url(b"x" * (LIMIT + 1)), max_bytes=LIMIT)


def test_a_data_url_far_over_the_limit_is_refused_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_decoding(*_args: object, **_kwargs: object) -> bytes:
        raise AssertionError("an oversize data: URL was decoded")

    monkeypatch.setattr(data_url.base64, "b64decode", no_decoding)
    with pytest.raises(ImageTooLarge) as refused:
        decode_data_url(as_data_url(b"x" * (LIMIT * 2)), max_bytes=LIMIT)
    assert refused.value.metadata == {"limit": str(LIMIT)}


@pytest.mark.parametrize(
    "url",
    [
        "image/png;base64,AAAA",
        "data:image/png;base64",
        "http://example.invalid/a,b",
        "data:image/png,AAAA",
        "data:image/png;base64,not base64!",
    ],
)
def test_malformed_data_urls_are_invalid_requests(url: str) -> None:
    with pytest.raises(InvalidRequest):
        decode_data_url(url, max_bytes=LIMIT)
