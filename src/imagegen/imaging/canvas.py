"""Previews of images that exist only as a Pillow canvas (the `local` renderer paints
with Pillow): encoded straight from the canvas, never through bytes and a decode."""

from __future__ import annotations

import io

from PIL import Image

PREVIEW_QUALITY = 70


def make_preview(image: Image.Image, max_side: int = 128) -> bytes:
    """A small WebP of a Pillow image, at most `max_side` pixels on its longer side."""
    preview = image.copy()
    preview.thumbnail((max_side, max_side))
    out = io.BytesIO()
    preview.convert("RGB").save(out, format="WEBP", quality=PREVIEW_QUALITY, method=0)
    return out.getvalue()
