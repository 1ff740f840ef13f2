"""Outpaint and upscale specs through the contract and the stored form: proto -> domain
-> row JSON -> domain -> proto keeps them, and an unknown anchor is IMG_003."""

from __future__ import annotations

import pytest
from imagegen.v1 import common_pb2

from imagegen.api.convert import spec_from_proto, spec_to_proto
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import OutpaintAnchor, OutpaintSpec, Size, UpscaleSpec
from imagegen.repositories.generations import spec_from_json, spec_to_json


def test_an_outpaint_by_sides_survives_the_round_trip() -> None:
    message = common_pb2.GenerationSpec(
        prompt="a wider beach", outpaint=common_pb2.Outpaint(left=64, bottom=32)
    )
    spec = spec_from_proto(message)
    assert spec.outpaint == OutpaintSpec(left=64, bottom=32)
    assert spec.upscale is None
    stored = spec_from_json(spec_to_json(spec))
    assert stored.outpaint == spec.outpaint
    back = spec_to_proto(stored)
    assert back.outpaint == message.outpaint
    assert not back.outpaint.HasField("target_size")


def test_a_target_keeps_its_anchor_and_an_unset_anchor_is_stored_as_the_centre() -> None:
    message = common_pb2.GenerationSpec(
        prompt="x",
        outpaint=common_pb2.Outpaint(
            target_size=common_pb2.ImageSize(width=640, height=480),
            anchor=common_pb2.OUTPAINT_ANCHOR_BOTTOM_RIGHT,
        ),
    )
    spec = spec_from_proto(message)
    assert spec.outpaint == OutpaintSpec(target=Size(640, 480), anchor=OutpaintAnchor.BOTTOM_RIGHT)
    assert spec_to_proto(spec_from_json(spec_to_json(spec))).outpaint == message.outpaint
    centred = spec_from_proto(
        common_pb2.GenerationSpec(
            prompt="x",
            outpaint=common_pb2.Outpaint(target_size=common_pb2.ImageSize(width=64, height=64)),
        )
    )
    assert centred.outpaint is not None and centred.outpaint.anchor is None
    shown = spec_to_proto(spec_from_json(spec_to_json(centred))).outpaint
    assert shown.anchor == common_pb2.OUTPAINT_ANCHOR_CENTER
    # Stored and retried alike: the fingerprint does not tell an unset anchor from centre.
    assert spec_from_json(spec_to_json(centred)).fingerprint() == centred.fingerprint()


def test_a_zero_target_is_unset() -> None:
    spec = spec_from_proto(
        common_pb2.GenerationSpec(
            prompt="x", outpaint=common_pb2.Outpaint(right=8, target_size=common_pb2.ImageSize())
        )
    )
    assert spec.outpaint == OutpaintSpec(right=8)


@pytest.mark.parametrize("anchor", [10, 99, -1])
def test_an_unknown_anchor_is_img_003_naming_it(anchor: int) -> None:
    message = common_pb2.GenerationSpec(prompt="x")
    message.outpaint.anchor = anchor  # type: ignore[assignment]
    with pytest.raises(InvalidRequest) as caught:
        spec_from_proto(message)
    assert caught.value.field == "outpaint.anchor"


def test_an_upscale_survives_the_round_trip() -> None:
    message = common_pb2.GenerationSpec(
        prompt="upscale", upscale=common_pb2.Upscale(factor=4, upscaler="R-ESRGAN 4x+")
    )
    spec = spec_from_proto(message)
    assert spec.upscale == UpscaleSpec(4, "R-ESRGAN 4x+")
    stored = spec_from_json(spec_to_json(spec))
    assert stored.upscale == spec.upscale and stored.outpaint is None
    assert spec_to_proto(stored).upscale == message.upscale


def test_a_plain_spec_has_neither() -> None:
    spec = spec_from_json(spec_to_json(spec_from_proto(common_pb2.GenerationSpec(prompt="x"))))
    assert spec.outpaint is None and spec.upscale is None
    message = spec_to_proto(spec)
    assert not message.HasField("outpaint") and not message.HasField("upscale")
