"""The fit rule, one for every provider (see the package docstring): scale keeping the
aspect ratio until the image covers the asked size, then crop it to that size around
the centre. Pure arithmetic, so the rule is tested without pixels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoverCrop:
    """Scale the source to `scaled_width` x `scaled_height` (each at least the target's
    side, one of them equal to it), then keep the target-sized box at `left`, `top`."""

    scaled_width: int
    scaled_height: int
    left: int
    top: int
    width: int
    height: int


def cover_crop(source_width: int, source_height: int, width: int, height: int) -> CoverCrop:
    """Where a `source_width` x `source_height` image lands when fitted to
    `width` x `height` by the cover-then-centre-crop rule."""
    if min(source_width, source_height, width, height) <= 0:
        raise ValueError("image sides must be positive")
    scale = max(width / source_width, height / source_height)
    # Rounding may land one pixel short of the target on the covering side; never
    # below it, so the crop always has the target's exact size.
    scaled_width = max(width, round(source_width * scale))
    scaled_height = max(height, round(source_height * scale))
    return CoverCrop(
        scaled_width,
        scaled_height,
        (scaled_width - width) // 2,
        (scaled_height - height) // 2,
        width,
        height,
    )
