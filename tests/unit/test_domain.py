"""Domain rules without I/O: request limits at their edges, prices, page tokens."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from imagegen.domain import paging
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import EditSource, GenerationSpec, OutpaintSpec, Size, UpscaleSpec
from imagegen.domain.pricing import PriceTable
from imagegen.domain.validation import (
    RequestLimits,
    check_count,
    check_negative_prompt,
    check_prompt,
    check_request_id,
    check_seed,
    check_size,
)


def test_prompt_limits() -> None:
    assert check_prompt("x" * 4000)
    assert check_prompt("a")
    for bad in ("", "   \n", "x" * 4001, "bad\x00byte"):
        with pytest.raises(InvalidRequest) as caught:
            check_prompt(bad)
        assert caught.value.field == "prompt"


def test_negative_prompt_limits() -> None:
    assert check_negative_prompt("") == ""
    assert check_negative_prompt("n" * 1000)
    with pytest.raises(InvalidRequest):
        check_negative_prompt("n" * 1001)


def test_count_limits() -> None:
    assert [check_count(n) for n in (1, 4)] == [1, 4]
    for bad in (0, 5, -1):
        with pytest.raises(InvalidRequest):
            check_count(bad)


def test_sizes_and_seeds() -> None:
    limits = RequestLimits()
    assert check_size(Size(1536, 1024), limits)
    with pytest.raises(InvalidRequest):
        check_size(Size(1024, 1025), limits)
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1
    with pytest.raises(InvalidRequest):
        check_seed(2**32)


def test_request_ids() -> None:
    assert check_request_id("") == ""
    assert check_request_id("a" * 128)
    for bad in ("a" * 129, "has space", "semi;colon"):
        with pytest.raises(InvalidRequest):
            check_request_id(bad)


def test_prices_follow_the_table() -> None:
    prices = PriceTable.default()
    assert prices.generation_credits(Size(512, 512), 1) == 1
    assert prices.generation_credits(Size(256, 256), 1) == 1
    assert prices.generation_credits(Size(1024, 1024), 1) == 2
    assert prices.generation_credits(Size(512, 512), 4) == 4
    assert prices.generation_credits(Size(1024, 1024), 3) == 6
    assert prices.generation_credits(Size(512, 512), 1, edit=True) == 2
    assert prices.generation_credits(Size(1024, 1536), 1) == 3
    custom = PriceTable.from_json(
        '{"tiers": [{"max_pixels": 100, "credits": 5}], "edit_credits": 1}'
    )
    assert custom.image_credits(Size(10, 10)) == 5
    assert custom.image_credits(Size(10, 11)) == 10


def test_outpaints_are_priced_as_edits_and_upscales_by_factor() -> None:
    prices = PriceTable.default()
    source = EditSource("0" * 64, "k", "image/png", 512, 512, image_id="i")
    outpaint = GenerationSpec(
        prompt="wider", size=Size(1536, 1024), sources=(source,), outpaint=OutpaintSpec(left=512)
    )
    assert prices.image_price(outpaint) == 3, "an edit, by the extended size"
    small = dataclasses.replace(outpaint, size=Size(320, 256))
    assert prices.image_price(small) == 2, "at least the edit price"
    for factor, credits in ((2, 1), (4, 2)):
        upscale = GenerationSpec(
            prompt="upscale", size=Size(2048, 2048), sources=(source,), upscale=UpscaleSpec(factor)
        )
        assert prices.image_price(upscale) == credits, "by factor, whatever the size"
    base = '{"tiers": [{"max_pixels": 100, "credits": 5}], "edit_credits": 1'
    assert PriceTable.from_json(base + "}").upscale_credits == {2: 1, 4: 2}
    assert PriceTable.from_json(base + ', "upscale_credits": {"4": 7}}').upscale_credits == {
        2: 1,
        4: 7,
    }
    for bad in ('{"3": 1}', '{"2": -1}', '{"x": 1}'):
        with pytest.raises(ValueError):
            PriceTable.from_json(base + f', "upscale_credits": {bad}}}')


def test_page_tokens_round_trip_and_are_bound_to_their_query() -> None:
    cursor = paging.Cursor(
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "0b7e4f0e-4b7a-4a51-9b55-4f1f5f7c2d10"
    )
    token = paging.encode_cursor(cursor, "scope-a")
    assert paging.decode_cursor(token, "scope-a") == cursor
    assert paging.decode_cursor("", "scope-a") is None
    with pytest.raises(InvalidRequest):
        paging.decode_cursor(token, "scope-b")
    with pytest.raises(InvalidRequest):
        paging.decode_cursor("%%%garbage", "scope-a")
    assert paging.page_size(0) == 20 and paging.page_size(100) == 100
    for bad in (-1, 101):
        with pytest.raises(InvalidRequest):
            paging.page_size(bad)


def test_plan_table_defaults_and_file() -> None:
    from imagegen.domain.plans import PlanLimits, PlanTable

    table = PlanTable.default()
    assert table.limits_for("free") == PlanLimits(
        10, 50, 1, 500_000_000, monthly_credits=50, max_streams=10
    )
    assert table.limits_for("enterprise").concurrent == 10
    assert table.limits_for("unknown-plan") == table.limits_for("free")
    custom = PlanTable.from_json(
        '{"plans": {"free": {"requests_per_hour": 3, "requests_per_day": null, "concurrent": 2}}}'
    )
    # A plans file that names no max_streams leaves streams uncapped, as any missing cap.
    assert custom.limits_for("free") == PlanLimits(3, None, 2)
    streams = PlanTable.from_json('{"plans": {"pro": {"max_streams": 7}}}')
    assert streams.limits_for("pro").max_streams == 7
    # No plan configured for an unknown one: the most restrictive, no streams at all.
    assert streams.limits_for("unknown-plan").max_streams == 0
