"""The canvases and masks an outpaint sends, made with Pillow from the source and its
OutpaintGeometry (domain/enlarge.py). Every function here blocks: call it in a worker
thread.

    edge_extended   the source on its canvas, each new pixel the colour of the nearest
                    source edge pixel (clamp to edge)
    soften          the new area blurred (the source's pixels untouched), so that the
                    streaks of the extension become soft colour fields
    repaint_mask    AUTOMATIC1111's inpainting mask: white where new, black on the source
    transparent_canvas, keep_mask
                    OpenAI's form: the source on a transparent canvas, and a mask whose
                    transparent pixels mark the area to fill

`local` fills the new area with edge_extended + soften; `sdwebui` sends that fill as
its starting image (inpainting_fill 1, "original"), so sampling starts from the
source's own colours rather than from black. `widened` and `scaled_to` are plain
arithmetic on geometries, for a provider that works at fixed sizes (openai).
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageFilter

from imagegen.domain.enlarge import OutpaintGeometry
from imagegen.domain.errors import ProviderFailed
from imagegen.domain.models import Size


def decode_source(data: bytes, geometry: OutpaintGeometry) -> Image.Image:
    """The source as RGB, which must be the size the geometry was planned for (the
    submit planned it from this very image; anything else is a bug, never retried)."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image = opened.convert("RGB")
    if image.size != (geometry.source.width, geometry.source.height):
        raise ProviderFailed(
            f"the source is {image.width}x{image.height} but the outpaint was planned "
            f"for {geometry.source}"
        )
    return image


def edge_extended(source: Image.Image, geometry: OutpaintGeometry) -> Image.Image:
    """The canvas with the source at its offset and every new pixel the colour of the
    nearest source edge pixel (corners take the corner pixel's)."""
    canvas = Image.new("RGB", (geometry.canvas.width, geometry.canvas.height))
    left, top, right, bottom = geometry.box
    canvas.paste(source, (left, top))
    width, height = source.size
    if geometry.left:
        column = source.crop((0, 0, 1, height)).resize((geometry.left, height))
        canvas.paste(column, (0, top))
    if geometry.right:
        column = source.crop((width - 1, 0, width, height)).resize((geometry.right, height))
        canvas.paste(column, (right, top))
    # The rows above and below stretch the already widened first and last source rows.
    if geometry.top:
        row = canvas.crop((0, top, canvas.width, top + 1)).resize((canvas.width, geometry.top))
        canvas.paste(row, (0, 0))
    if geometry.bottom:
        row = canvas.crop((0, bottom - 1, canvas.width, bottom))
        canvas.paste(row.resize((canvas.width, geometry.bottom)), (0, bottom))
    return canvas


def soften(canvas: Image.Image, geometry: OutpaintGeometry) -> Image.Image:
    """The canvas with its new area blurred (more for a wider extension) and the
    source's box left exactly as it was. The blur reads across the seam, so the new
    area blends into the source's edge colours."""
    widest = max(geometry.left, geometry.top, geometry.right, geometry.bottom)
    radius = min(max(widest / 8, 2.0), 32.0)
    blurred = canvas.filter(ImageFilter.GaussianBlur(radius))
    return Image.composite(blurred, canvas, repaint_mask(geometry))


def filled(source: Image.Image, geometry: OutpaintGeometry) -> Image.Image:
    """The source on its canvas with the new area filled: edge_extended, then soften."""
    return soften(edge_extended(source, geometry), geometry)


def repaint_mask(geometry: OutpaintGeometry) -> Image.Image:
    """An L-mode mask of the canvas: 255 over the new area, 0 over the source."""
    mask = Image.new("L", (geometry.canvas.width, geometry.canvas.height), 255)
    mask.paste(0, geometry.box)
    return mask


def transparent_canvas(source: Image.Image, geometry: OutpaintGeometry) -> Image.Image:
    """RGBA: the source, opaque, at its offset on a fully transparent canvas."""
    canvas = Image.new("RGBA", (geometry.canvas.width, geometry.canvas.height), (0, 0, 0, 0))
    canvas.paste(source.convert("RGBA"), (geometry.left, geometry.top))
    return canvas


def keep_mask(geometry: OutpaintGeometry) -> Image.Image:
    """RGBA: transparent over the new area (to fill), opaque black over the source (to
    keep). It compresses to a few hundred bytes, whatever the source holds."""
    mask = Image.new("RGBA", (geometry.canvas.width, geometry.canvas.height), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), geometry.box)
    return mask


def widened(geometry: OutpaintGeometry, shape: Size) -> OutpaintGeometry:
    """The same outpaint on the smallest canvas of `shape`'s aspect ratio that holds the
    whole canvas centred (the extra space is more new area). A provider that answers at
    `shape` then answers something the cover-then-centre-crop fit (imaging/fit.py)
    brings back to exactly the original canvas, with the source where it belongs."""
    width, height = geometry.canvas.width, geometry.canvas.height
    if width * shape.height >= height * shape.width:
        height = max(height, math.ceil(width * shape.height / shape.width))
    else:
        width = max(width, math.ceil(height * shape.width / shape.height))
    return OutpaintGeometry(
        source=geometry.source,
        canvas=Size(width, height),
        left=geometry.left + (width - geometry.canvas.width) // 2,
        top=geometry.top + (height - geometry.canvas.height) // 2,
    )


def scaled_to(geometry: OutpaintGeometry, canvas: Size) -> OutpaintGeometry:
    """The geometry scaled so that its canvas becomes `canvas` (of the same aspect
    ratio), the source rounded to whole pixels and kept inside the canvas."""
    scale = canvas.width / geometry.canvas.width
    left = min(round(geometry.left * scale), canvas.width - 1)
    top = min(round(geometry.top * scale), canvas.height - 1)
    source = Size(
        max(1, min(round(geometry.source.width * scale), canvas.width - left)),
        max(1, min(round(geometry.source.height * scale), canvas.height - top)),
    )
    return OutpaintGeometry(source=source, canvas=canvas, left=left, top=top)


def png(image: Image.Image) -> bytes:
    """PNG bytes of `image`."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6)
    return out.getvalue()
