"""Outpainting and upscaling, the two requests that make an image larger: their limits
and the size of what they make. Pure functions over sizes, no image bytes.

The promise is in proto/imagegen/v1/common.proto (`Outpaint`, `Upscale`): at most 2048
pixels added on a side, each side of the result at most 4096 pixels, factors 2 and 4,
and the result within the deployment's pixel limit (IMAGEGEN_MAX_PIXELS). A request
past the pixel limit is IMG_007 (ImageTooLarge); anything else wrong is IMG_003
(InvalidRequest) naming the field.

Each check takes `field`, the path of the request's value, so that an error names the
field the caller filled: `outpaint` (GenerationSpec.outpaint), `upscale`
(GenerationSpec.upscale) or "" for UpscaleImageRequest's own `factor` and `upscaler`.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.domain.errors import ImageTooLarge, InvalidRequest
from imagegen.domain.models import OutpaintAnchor, OutpaintSpec, Size, UpscaleSpec
from imagegen.domain.validation import check_text

#: Most pixels an outpaint adds on one side.
MAX_OUTPAINT_SIDE = 2048
#: Longest side of an outpainted or upscaled image.
MAX_RESULT_SIDE = 4096
#: The factors an upscale may use.
UPSCALE_FACTORS = (2, 4)
#: Longest upscaler name (the names are the provider's, such as `R-ESRGAN 4x+`).
MAX_UPSCALER_CHARS = 128

#: Where the source sits on each axis for each anchor: 0 at the start (left or top),
#: 1 centred, 2 at the end; the offset is the free space times this, halved.
_ANCHOR_PLACES: dict[OutpaintAnchor, tuple[int, int]] = {
    OutpaintAnchor.CENTER: (1, 1),
    OutpaintAnchor.TOP: (1, 0),
    OutpaintAnchor.BOTTOM: (1, 2),
    OutpaintAnchor.LEFT: (0, 1),
    OutpaintAnchor.RIGHT: (2, 1),
    OutpaintAnchor.TOP_LEFT: (0, 0),
    OutpaintAnchor.TOP_RIGHT: (2, 0),
    OutpaintAnchor.BOTTOM_LEFT: (0, 2),
    OutpaintAnchor.BOTTOM_RIGHT: (2, 2),
}


@dataclass(frozen=True)
class OutpaintGeometry:
    """Where a source lands on its outpaint canvas: the canvas size and the source's
    top-left corner on it. Everything outside the source's box is new area."""

    source: Size
    canvas: Size
    #: pixels added on the left (the source's x on the canvas)
    left: int
    #: pixels added at the top (the source's y on the canvas)
    top: int

    @property
    def right(self) -> int:
        """Pixels added on the right."""
        return self.canvas.width - self.left - self.source.width

    @property
    def bottom(self) -> int:
        """Pixels added at the bottom."""
        return self.canvas.height - self.top - self.source.height

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The source's box on the canvas: left, top, right, bottom (exclusive)."""
        return (
            self.left,
            self.top,
            self.left + self.source.width,
            self.top + self.source.height,
        )


def _at(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_pixels(result: Size, max_pixels: int, what: str) -> None:
    if result.pixels > max_pixels:
        raise ImageTooLarge(
            f"{what} would be {result} = {result.pixels} pixels; the limit is {max_pixels}",
            metadata={
                "limit": str(max_pixels),
                "width": str(result.width),
                "height": str(result.height),
            },
        )


def check_outpaint(spec: OutpaintSpec, *, max_pixels: int, field: str = "outpaint") -> OutpaintSpec:
    """What can be checked before the source's size is known: one form only (sides, or
    a target with an optional anchor), sides 0-2048, a target of 1-4096 pixels a side
    within `max_pixels`. IMG_003 naming the field, IMG_007 past the pixel limit."""
    sides = {"left": spec.left, "top": spec.top, "right": spec.right, "bottom": spec.bottom}
    if spec.target is not None:
        if any(sides.values()):
            raise InvalidRequest(
                "give either the pixels to add on each side or a target_size, not both",
                field=field,
            )
        target_field = _at(field, "target_size")
        if spec.target.width < 1 or spec.target.height < 1:
            raise InvalidRequest(
                f"{target_field} {spec.target} has no pixels; give the canvas size to reach",
                field=target_field,
            )
        if max(spec.target.width, spec.target.height) > MAX_RESULT_SIDE:
            raise InvalidRequest(
                f"{target_field} {spec.target} is over {MAX_RESULT_SIDE} pixels on a side",
                field=target_field,
                metadata={"max_side": str(MAX_RESULT_SIDE)},
            )
        _check_pixels(spec.target, max_pixels, "the outpainted image")
        return spec
    if spec.anchor is not None:
        raise InvalidRequest(
            "an anchor places the source on a target_size; with pixels per side, leave it "
            "unspecified",
            field=_at(field, "anchor"),
        )
    for name, pixels in sides.items():
        if not 0 <= pixels <= MAX_OUTPAINT_SIDE:
            raise InvalidRequest(
                f"{_at(field, name)} is {pixels}; add 0 to {MAX_OUTPAINT_SIDE} pixels on a side",
                field=_at(field, name),
                metadata={"min": "0", "max": str(MAX_OUTPAINT_SIDE)},
            )
    if not any(sides.values()):
        raise InvalidRequest(
            "the outpaint adds nothing: give the pixels to add on at least one side, or a "
            "target_size larger than the source",
            field=field,
        )
    return spec


def outpaint_geometry(
    source: Size, spec: OutpaintSpec, *, max_pixels: int, field: str = "outpaint"
) -> OutpaintGeometry:
    """The canvas and the source's place on it for `spec` applied to a source of size
    `source`, after every check of check_outpaint and those that need the source: each
    canvas side at most 4096 pixels (IMG_003), a target at least the source's size on
    both axes and larger on one (IMG_003), the canvas within `max_pixels` (IMG_007)."""
    check_outpaint(spec, max_pixels=max_pixels, field=field)
    if spec.target is None:
        canvas = Size(source.width + spec.left + spec.right, source.height + spec.top + spec.bottom)
        for axis, length in (("width", canvas.width), ("height", canvas.height)):
            if length > MAX_RESULT_SIDE:
                raise InvalidRequest(
                    f"the outpainted image would be {canvas}: its {axis} is over "
                    f"{MAX_RESULT_SIDE} pixels; add fewer pixels",
                    field=field,
                    metadata={"max_side": str(MAX_RESULT_SIDE), "axis": axis},
                )
        _check_pixels(canvas, max_pixels, "the outpainted image")
        return OutpaintGeometry(source=source, canvas=canvas, left=spec.left, top=spec.top)
    target = spec.target
    target_field = _at(field, "target_size")
    if target.width < source.width or target.height < source.height:
        raise InvalidRequest(
            f"{target_field} {target} is smaller than the source ({source}) on an axis; "
            "give a canvas at least the source's size",
            field=target_field,
            metadata={"source": str(source)},
        )
    if target == source:
        raise InvalidRequest(
            f"{target_field} {target} is the source's own size: nothing to extend",
            field=target_field,
            metadata={"source": str(source)},
        )
    across, down = _ANCHOR_PLACES[spec.placement]
    return OutpaintGeometry(
        source=source,
        canvas=target,
        left=(target.width - source.width) * across // 2,
        top=(target.height - source.height) * down // 2,
    )


def check_upscale(spec: UpscaleSpec, *, field: str = "upscale") -> UpscaleSpec:
    """A factor of 2 or 4 and an upscaler name that is printable and at most 128
    characters (IMG_003 naming the field). Whether the provider offers that upscaler
    is the provider's check (providers/base.py)."""
    if spec.factor not in UPSCALE_FACTORS:
        factor_field = _at(field, "factor")
        raise InvalidRequest(
            f"{factor_field} is {spec.factor}; an upscale enlarges by 2 or 4",
            field=factor_field,
            metadata={"allowed": ",".join(str(f) for f in UPSCALE_FACTORS)},
        )
    upscaler_field = _at(field, "upscaler")
    if len(spec.upscaler) > MAX_UPSCALER_CHARS:
        raise InvalidRequest(
            f"{upscaler_field} has {len(spec.upscaler)} characters; upscaler names are at "
            f"most {MAX_UPSCALER_CHARS} (ListProviders lists them)",
            field=upscaler_field,
        )
    check_text(spec.upscaler, upscaler_field)
    return spec


def upscale_size(
    source: Size, spec: UpscaleSpec, *, max_pixels: int, field: str = "upscale"
) -> Size:
    """The size an upscale of a `source`-sized image makes, after check_upscale: IMG_007
    when it would be over `max_pixels` or over 4096 pixels on a side."""
    check_upscale(spec, field=field)
    result = Size(source.width * spec.factor, source.height * spec.factor)
    if max(result.width, result.height) > MAX_RESULT_SIDE:
        raise ImageTooLarge(
            f"the upscaled image would be {result}, over {MAX_RESULT_SIDE} pixels on a "
            "side; use a smaller factor or a smaller image",
            metadata={
                "max_side": str(MAX_RESULT_SIDE),
                "width": str(result.width),
                "height": str(result.height),
            },
        )
    _check_pixels(result, max_pixels, "the upscaled image")
    return result


def check_enlarge_request(
    *,
    outpaint: OutpaintSpec | None,
    upscale: UpscaleSpec | None,
    source_count: int,
    has_mask: bool,
) -> None:
    """An outpaint or an upscale works on exactly one source and makes its own mask;
    a request is one or the other (IMG_003 naming the field). Nothing to check when
    it is neither."""
    if outpaint is None and upscale is None:
        return
    if outpaint is not None and upscale is not None:
        raise InvalidRequest(
            "a request either outpaints or upscales; send two requests for both",
            field="upscale",
        )
    name = "outpaint" if outpaint is not None else "upscale"
    if source_count != 1:
        raise InvalidRequest(
            f"an {name} works on exactly one source image; {source_count} were given",
            field="sources",
            metadata={"count": str(source_count)},
        )
    if has_mask:
        raise InvalidRequest(
            f"an {name} takes no mask (the area to fill follows from the {name})",
            field="mask",
        )
