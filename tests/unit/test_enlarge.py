"""Outpaint and upscale rules without I/O: every limit at its edge, each anchor, the
fields errors name, and the spec's stored form and fingerprint."""

from __future__ import annotations

import pytest

from imagegen.domain.enlarge import (
    MAX_OUTPAINT_SIDE,
    MAX_RESULT_SIDE,
    OutpaintGeometry,
    check_enlarge_request,
    check_outpaint,
    check_upscale,
    outpaint_geometry,
    upscale_size,
)
from imagegen.domain.errors import ImageTooLarge, InvalidRequest
from imagegen.domain.models import (
    GenerationSpec,
    OutpaintAnchor,
    OutpaintSpec,
    Size,
    UpscaleSpec,
)

LIMIT = 4096 * 4096
SOURCE = Size(400, 300)


def refused(call: object, *args: object, **kwargs: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    assert caught.value.code == "IMG_003"
    return caught.value


def too_large(call: object, *args: object, **kwargs: object) -> ImageTooLarge:
    with pytest.raises(ImageTooLarge) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    assert caught.value.code == "IMG_007"
    return caught.value


# --- outpaint by sides --------------------------------------------------------------------


def test_sides_add_to_the_source_and_place_it_at_left_top() -> None:
    geometry = outpaint_geometry(
        SOURCE, OutpaintSpec(left=10, top=20, right=30, bottom=40), max_pixels=LIMIT
    )
    assert geometry == OutpaintGeometry(source=SOURCE, canvas=Size(440, 360), left=10, top=20)
    assert (geometry.right, geometry.bottom) == (30, 40)
    assert geometry.box == (10, 20, 410, 320)


@pytest.mark.parametrize("side", ["left", "top", "right", "bottom"])
def test_one_side_alone_is_enough_and_2048_is_the_most(side: str) -> None:
    spec = OutpaintSpec(**{side: MAX_OUTPAINT_SIDE})
    geometry = outpaint_geometry(SOURCE, spec, max_pixels=LIMIT)
    assert getattr(geometry, side) == MAX_OUTPAINT_SIDE
    assert refused(check_outpaint, OutpaintSpec(**{side: 2049}), max_pixels=LIMIT).field == (
        f"outpaint.{side}"
    )
    assert refused(check_outpaint, OutpaintSpec(**{side: -1}), max_pixels=LIMIT).field == (
        f"outpaint.{side}"
    )


def test_nothing_to_add_is_refused() -> None:
    assert refused(check_outpaint, OutpaintSpec(), max_pixels=LIMIT).field == "outpaint"


def test_both_forms_are_refused() -> None:
    both = OutpaintSpec(left=1, target=Size(800, 600))
    assert refused(check_outpaint, both, max_pixels=LIMIT).field == "outpaint"


def test_an_anchor_without_a_target_is_refused() -> None:
    spec = OutpaintSpec(left=8, anchor=OutpaintAnchor.LEFT)
    assert refused(check_outpaint, spec, max_pixels=LIMIT).field == "outpaint.anchor"


def test_each_canvas_side_is_at_most_4096() -> None:
    wide = Size(2048, 100)
    at_edge = outpaint_geometry(wide, OutpaintSpec(left=1024, right=1024), max_pixels=LIMIT)
    assert at_edge.canvas == Size(MAX_RESULT_SIDE, 100)
    error = refused(outpaint_geometry, wide, OutpaintSpec(left=1024, right=1025), max_pixels=LIMIT)
    assert (error.field, error.metadata["axis"]) == ("outpaint", "width")
    tall = Size(100, 4000)
    error = refused(outpaint_geometry, tall, OutpaintSpec(bottom=97), max_pixels=LIMIT)
    assert error.metadata["axis"] == "height"


def test_the_pixel_limit_is_img_007_and_reaching_it_is_allowed() -> None:
    limit = 500 * 400
    assert outpaint_geometry(SOURCE, OutpaintSpec(right=100, bottom=100), max_pixels=limit)
    error = too_large(
        outpaint_geometry, SOURCE, OutpaintSpec(right=100, bottom=101), max_pixels=limit
    )
    assert error.metadata == {"limit": str(limit), "width": "500", "height": "401"}


# --- outpaint to a target -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "left", "top"),
    [
        (None, 200, 150),
        (OutpaintAnchor.CENTER, 200, 150),
        (OutpaintAnchor.TOP, 200, 0),
        (OutpaintAnchor.BOTTOM, 200, 300),
        (OutpaintAnchor.LEFT, 0, 150),
        (OutpaintAnchor.RIGHT, 400, 150),
        (OutpaintAnchor.TOP_LEFT, 0, 0),
        (OutpaintAnchor.TOP_RIGHT, 400, 0),
        (OutpaintAnchor.BOTTOM_LEFT, 0, 300),
        (OutpaintAnchor.BOTTOM_RIGHT, 400, 300),
    ],
)
def test_a_target_places_the_source_by_its_anchor(
    anchor: OutpaintAnchor | None, left: int, top: int
) -> None:
    spec = OutpaintSpec(target=Size(800, 600), anchor=anchor)
    geometry = outpaint_geometry(SOURCE, spec, max_pixels=LIMIT)
    assert (geometry.canvas, geometry.left, geometry.top) == (Size(800, 600), left, top)
    assert geometry.left + geometry.right == 400 and geometry.top + geometry.bottom == 300


def test_an_odd_free_space_centres_down() -> None:
    geometry = outpaint_geometry(Size(3, 3), OutpaintSpec(target=Size(6, 4)), max_pixels=LIMIT)
    assert (geometry.left, geometry.right, geometry.top, geometry.bottom) == (1, 2, 0, 1)


def test_a_target_grows_one_axis_only() -> None:
    geometry = outpaint_geometry(
        SOURCE, OutpaintSpec(target=Size(400, 500), anchor=OutpaintAnchor.TOP), max_pixels=LIMIT
    )
    assert (geometry.left, geometry.top, geometry.bottom) == (0, 0, 200)


@pytest.mark.parametrize("target", [Size(399, 600), Size(800, 299), Size(400, 300)])
def test_a_target_smaller_than_or_equal_to_the_source_is_refused(target: Size) -> None:
    error = refused(outpaint_geometry, SOURCE, OutpaintSpec(target=target), max_pixels=LIMIT)
    assert error.field == "outpaint.target_size"


@pytest.mark.parametrize("target", [Size(4097, 100), Size(100, 4097), Size(0, 600), Size(800, -1)])
def test_a_target_side_out_of_range_is_refused(target: Size) -> None:
    error = refused(check_outpaint, OutpaintSpec(target=target), max_pixels=LIMIT)
    assert error.field == "outpaint.target_size"


def test_a_target_at_4096_and_at_the_pixel_limit_passes_and_one_more_does_not() -> None:
    assert outpaint_geometry(
        SOURCE, OutpaintSpec(target=Size(4096, 4096)), max_pixels=LIMIT
    ).canvas == Size(4096, 4096)
    too_large(check_outpaint, OutpaintSpec(target=Size(4096, 4096)), max_pixels=LIMIT - 1)


def test_errors_name_the_field_the_caller_filled() -> None:
    error = refused(check_outpaint, OutpaintSpec(top=-5), max_pixels=LIMIT, field="spec.outpaint")
    assert error.field == "spec.outpaint.top" and error.metadata["field"] == "spec.outpaint.top"


# --- upscale ------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
def test_upscale_multiplies_both_sides(factor: int) -> None:
    assert upscale_size(SOURCE, UpscaleSpec(factor), max_pixels=LIMIT) == Size(
        400 * factor, 300 * factor
    )


@pytest.mark.parametrize("factor", [0, 1, 3, 8, -2])
def test_other_factors_are_refused_naming_the_field(factor: int) -> None:
    assert refused(check_upscale, UpscaleSpec(factor)).field == "upscale.factor"
    assert refused(check_upscale, UpscaleSpec(factor), field="").field == "factor"


def test_upscaler_names_are_short_printable_text() -> None:
    assert check_upscale(UpscaleSpec(2, "R-ESRGAN 4x+")).upscaler == "R-ESRGAN 4x+"
    assert check_upscale(UpscaleSpec(2, "u" * 128))
    assert refused(check_upscale, UpscaleSpec(2, "u" * 129)).field == "upscale.upscaler"
    assert refused(check_upscale, UpscaleSpec(2, "bad\x00name"), field="").field == "upscaler"


def test_upscale_within_the_pixel_limit_and_4096_a_side() -> None:
    assert upscale_size(Size(1024, 1024), UpscaleSpec(4), max_pixels=LIMIT) == Size(4096, 4096)
    error = too_large(upscale_size, Size(1024, 1025), UpscaleSpec(4), max_pixels=LIMIT)
    assert error.metadata["max_side"] == str(MAX_RESULT_SIDE)
    # Within the pixels but too long on a side.
    too_large(upscale_size, Size(2049, 10), UpscaleSpec(2), max_pixels=LIMIT)
    # Within 4096 a side but over a smaller configured pixel limit.
    error = too_large(upscale_size, Size(512, 512), UpscaleSpec(2), max_pixels=1024 * 1024 - 1)
    assert error.metadata["limit"] == str(1024 * 1024 - 1)
    assert upscale_size(Size(512, 512), UpscaleSpec(2), max_pixels=1024 * 1024)


# --- the request as a whole ---------------------------------------------------------------


def test_an_enlargement_takes_one_source_and_no_mask() -> None:
    outpaint, upscale = OutpaintSpec(left=1), UpscaleSpec(2)
    check_enlarge_request(outpaint=None, upscale=None, source_count=3, has_mask=True)
    check_enlarge_request(outpaint=outpaint, upscale=None, source_count=1, has_mask=False)
    check_enlarge_request(outpaint=None, upscale=upscale, source_count=1, has_mask=False)
    for count in (0, 2):
        error = refused(
            check_enlarge_request,
            outpaint=outpaint,
            upscale=None,
            source_count=count,
            has_mask=False,
        )
        assert error.field == "sources"
    error = refused(
        check_enlarge_request, outpaint=None, upscale=upscale, source_count=1, has_mask=True
    )
    assert error.field == "mask"
    error = refused(
        check_enlarge_request, outpaint=outpaint, upscale=upscale, source_count=1, has_mask=False
    )
    assert error.field == "upscale"


# --- stored form and fingerprint ----------------------------------------------------------


def test_specs_round_trip_through_their_stored_form() -> None:
    for spec in (
        OutpaintSpec(left=1, top=2, right=3, bottom=4),
        OutpaintSpec(target=Size(800, 600), anchor=OutpaintAnchor.BOTTOM_RIGHT),
    ):
        assert OutpaintSpec.from_json(spec.to_json()) == spec
    # An unset anchor of a target is stored as the centre it means.
    centred = OutpaintSpec.from_json(OutpaintSpec(target=Size(800, 600)).to_json())
    assert centred.anchor is OutpaintAnchor.CENTER
    assert UpscaleSpec.from_json(UpscaleSpec(4, "Lanczos").to_json()) == UpscaleSpec(4, "Lanczos")


def test_the_fingerprint_carries_them_only_when_set() -> None:
    plain = GenerationSpec(prompt="a fox").fingerprint()
    assert "outpaint" not in plain and "upscale" not in plain
    outpainted = GenerationSpec(prompt="a fox", outpaint=OutpaintSpec(left=64)).fingerprint()
    assert outpainted == {**plain, "outpaint": OutpaintSpec(left=64).to_json()}
    assert (
        outpainted != GenerationSpec(prompt="a fox", outpaint=OutpaintSpec(right=64)).fingerprint()
    )
    upscaled = GenerationSpec(prompt="a fox", upscale=UpscaleSpec(2)).fingerprint()
    assert upscaled == {**plain, "upscale": {"factor": 2, "upscaler": ""}}
    # The same request asked with the centre named or left unspecified is the same request.
    assert (
        GenerationSpec(prompt="a", outpaint=OutpaintSpec(target=Size(9, 9))).fingerprint()
        == GenerationSpec(
            prompt="a", outpaint=OutpaintSpec(target=Size(9, 9), anchor=OutpaintAnchor.CENTER)
        ).fingerprint()
    )
