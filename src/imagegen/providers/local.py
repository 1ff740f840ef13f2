"""`local`: a built-in renderer that needs no network or keys.

It paints a deterministic picture from (prompt, negative prompt, seed, style, size) at
exactly the asked size, and reports its one model (local-pillow-1) and the seed it used.
The same inputs give the same PNG bytes, each of the 13 style presets paints with its
own technique, and it reports real progress with a preview after every stage.
Rendering runs in a worker thread; the pauses between stages are async, so
cancellation takes effect between stages.

It also outpaints and upscales, deterministically and without any model:
- an outpaint extends the source's edge pixels over the new area and blurs them
  (providers/outpainting.py); the source's pixels are kept exactly, the prompt is
  not used;
- an upscale is a Lanczos resample with light unsharp-mask sharpening. It adds no
  detail, so its one upscaler is named for what it is, `lanczos`, and the image
  reports it as its model.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import math
import random
from collections.abc import Callable

from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from imagegen.domain.enlarge import OutpaintGeometry
from imagegen.domain.models import STANDARD_SIZES, ImageFormat, Size, Style, UpscaleSpec
from imagegen.imaging import make_preview
from imagegen.providers import outpainting
from imagegen.providers.base import (
    ProgressCallback,
    ProviderCapabilities,
    ProviderImage,
    ProviderRequest,
    check_enlargement,
    check_model,
    first_source,
)
from imagegen.providers.local_edits import apply_operations, parse_instruction

MODEL = "local-pillow-1"
#: The one upscaler: a resample, named as one (it is not AI upscaling).
UPSCALER = "lanczos"
RGB = tuple[int, int, int]

#: Base palettes per style (plus a prompt-derived hue shift).
_PALETTES: dict[Style | None, tuple[RGB, ...]] = {
    None: ((40, 60, 110), (200, 120, 80), (240, 220, 180), (30, 30, 40)),
    Style.PHOTOGRAPHIC: ((70, 90, 110), (180, 170, 150), (230, 225, 210), (40, 45, 50)),
    Style.ARTISTIC: ((150, 40, 60), (240, 180, 40), (40, 90, 160), (250, 240, 220)),
    Style.ANIME: ((255, 170, 200), (120, 200, 255), (255, 240, 150), (60, 40, 90)),
    Style.DIGITAL_ART: ((10, 10, 40), (0, 255, 200), (255, 0, 170), (120, 80, 255)),
    Style.WATERCOLOR: ((180, 210, 230), (230, 190, 200), (200, 230, 190), (250, 248, 240)),
    Style.SKETCH: ((245, 245, 240), (60, 60, 60), (150, 150, 150), (20, 20, 20)),
    Style.PIXEL_ART: ((40, 40, 80), (250, 200, 60), (80, 200, 90), (230, 80, 60)),
    Style.CINEMATIC: ((20, 60, 70), (230, 140, 60), (10, 20, 25), (250, 210, 160)),
    Style.CARTOON: ((255, 80, 60), (60, 170, 255), (255, 220, 40), (90, 210, 90)),
    Style.ABSTRACT: ((230, 30, 90), (20, 40, 200), (250, 200, 0), (0, 180, 160)),
    Style.MINIMALIST: ((235, 232, 225), (200, 70, 50), (245, 243, 238), (60, 60, 60)),
    Style.VINTAGE: ((150, 110, 70), (210, 170, 120), (240, 220, 180), (80, 60, 40)),
    Style.MODERN: ((20, 20, 20), (0, 90, 255), (245, 245, 245), (255, 60, 40)),
}


class LocalProvider:
    """The `local` provider (see the module docstring)."""

    id = "local"
    display_name = "Built-in renderer"
    models = (MODEL,)
    upscalers = (UPSCALER,)
    #: built in: always ready
    configured = True
    capabilities = ProviderCapabilities(
        edit=True,
        mask=False,
        negative_prompt=True,
        seed=True,
        style=True,
        previews=True,
        sizes=STANDARD_SIZES,
        formats=tuple(ImageFormat),
        max_count=4,
        outpaint=True,
        upscale=True,
    )

    def __init__(self, step_delay: float = 0.05) -> None:
        self._step_delay = step_delay

    def check(self, request: ProviderRequest) -> None:
        """Edits must use instructions this renderer understands, and the model and
        upscaler must be its own (IMG_003 otherwise). An outpaint's or upscale's prompt
        is not read."""
        check_model(self.id, self.models, request.model)
        check_enlargement(self.id, self.capabilities, self.upscalers, request)
        if request.sources and request.outpaint is None and request.upscale is None:
            parse_instruction(request.prompt)

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        """Paint in four stages, or apply an edit's operations, outpaint or upscale, with
        progress and previews."""
        if request.outpaint is not None:
            return await self._outpaint(request, request.outpaint, progress)
        if request.upscale is not None:
            return await self._upscale(request, request.upscale, progress)
        if request.sources:
            return await self._edit(request, progress)
        painter = _Painter(request)
        stages: list[tuple[str, Callable[[], None]]] = [
            ("composing", painter.background),
            ("shaping", painter.shapes),
            ("styling", painter.stylize),
            ("finishing", painter.finish),
        ]
        await progress(0, "starting", None)
        for number, (stage, step) in enumerate(stages, start=1):
            preview = await asyncio.to_thread(_run_and_preview, step, painter)
            await progress(number * 100 // (len(stages) + 1), stage, preview)
            if self._step_delay > 0:
                await asyncio.sleep(self._step_delay)
        data = await asyncio.to_thread(painter.png)
        await progress(100, "rendered", None)
        return ProviderImage(data=data, mime_type="image/png", model=MODEL, seed=request.seed)

    async def _outpaint(
        self, request: ProviderRequest, geometry: OutpaintGeometry, progress: ProgressCallback
    ) -> ProviderImage:
        source = first_source(request, "an outpaint")
        image = await asyncio.to_thread(outpainting.decode_source, source.data, geometry)
        await progress(0, "outpainting", None)
        stages: list[tuple[str, Callable[[Image.Image], Image.Image]]] = [
            ("extending", lambda current: outpainting.edge_extended(current, geometry)),
            ("blending", lambda current: outpainting.soften(current, geometry)),
        ]
        image = await self._stages(image, stages, progress)
        data = await asyncio.to_thread(_encode_png, image, None)
        await progress(100, "outpainted", None)
        return ProviderImage(data=data, mime_type="image/png", model=MODEL, seed=request.seed)

    async def _upscale(
        self, request: ProviderRequest, upscale: UpscaleSpec, progress: ProgressCallback
    ) -> ProviderImage:
        source = first_source(request, "an upscale")
        image = await asyncio.to_thread(_decode, source.data)
        await progress(0, "upscaling", None)
        stages: list[tuple[str, Callable[[Image.Image], Image.Image]]] = [
            ("resampling", lambda current: _resample(current, upscale.factor)),
            ("sharpening", lambda current: _sharpen(current, upscale.factor)),
        ]
        image = await self._stages(image, stages, progress)
        data = await asyncio.to_thread(_encode_png, image, None)
        await progress(100, "upscaled", None)
        return ProviderImage(data=data, mime_type="image/png", model=UPSCALER)

    async def _stages(
        self,
        image: Image.Image,
        stages: list[tuple[str, Callable[[Image.Image], Image.Image]]],
        progress: ProgressCallback,
    ) -> Image.Image:
        """Run each stage in a worker thread with a preview after it; cancellation takes
        effect between stages."""
        for number, (stage, step) in enumerate(stages, start=1):
            image = await asyncio.to_thread(step, image)
            preview = await asyncio.to_thread(make_preview, image)
            await progress(number * 90 // len(stages), stage, preview)
            if self._step_delay > 0:
                await asyncio.sleep(self._step_delay)
        return image

    async def _edit(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        operations = parse_instruction(request.prompt)
        source = request.sources[0]
        image = await asyncio.to_thread(_decode, source.data)
        await progress(0, "editing", None)
        for number, operation in enumerate(operations, start=1):
            image = await asyncio.to_thread(apply_operations, image, (operation,))
            preview = await asyncio.to_thread(make_preview, image)
            await progress(number * 90 // len(operations), operation.name, preview)
            if self._step_delay > 0:
                await asyncio.sleep(self._step_delay)
        target = request.resize_to
        data = await asyncio.to_thread(_encode_png, image, target)
        await progress(100, "edited", None)
        return ProviderImage(data=data, mime_type="image/png", model=MODEL, seed=request.seed)


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        return opened.convert("RGB")


def _resample(image: Image.Image, factor: int) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.LANCZOS)


def _sharpen(image: Image.Image, factor: int) -> Image.Image:
    # Light: enough to take the softness of the resample off edges at the new scale,
    # not enough to ring; the threshold leaves flat areas alone.
    return image.filter(ImageFilter.UnsharpMask(radius=factor / 2, percent=60, threshold=2))


def _encode_png(image: Image.Image, size: Size | None) -> bytes:
    if size is not None and image.size != (size.width, size.height):
        image = image.resize((size.width, size.height), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def _run_and_preview(step: Callable[[], None], painter: _Painter) -> bytes:
    step()
    return make_preview(painter.image)


class _Painter:
    def __init__(self, request: ProviderRequest) -> None:
        self.size: Size = request.size
        self.preset = request.style
        material = "\x1f".join(
            [
                request.prompt,
                request.negative_prompt,
                str(request.seed),
                request.style.value if request.style else "",
                str(request.size),
            ]
        )
        digest = hashlib.sha256(material.encode()).digest()
        self.rng = random.Random(int.from_bytes(digest[:16], "big"))
        self.negative = bool(request.negative_prompt.strip())
        shift = digest[16] / 255.0
        self.palette = tuple(_shift_hue(c, shift * 0.35) for c in _PALETTES[request.style])
        self.image = Image.new("RGB", (request.size.width, request.size.height))

    # stage 1
    def background(self) -> None:
        width, height = self.image.size
        top, bottom = self.palette[0], self.palette[2]
        ramp = Image.linear_gradient("L").resize((width, height))
        angle = self.rng.choice((0, 90, 180, 270))
        ramp = ramp.rotate(angle, expand=False)
        self.image = Image.composite(
            Image.new("RGB", (width, height), bottom), Image.new("RGB", (width, height), top), ramp
        )

    # stage 2
    def shapes(self) -> None:
        width, height = self.image.size
        draw = ImageDraw.Draw(self.image, "RGBA")
        count = 6 + self.rng.randrange(10)
        for _ in range(count):
            color = self.rng.choice(self.palette)
            alpha = 90 + self.rng.randrange(140)
            cx, cy = self.rng.random() * width, self.rng.random() * height
            radius = (0.05 + self.rng.random() * 0.25) * min(width, height)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            kind = self.rng.randrange(3)
            if kind == 0:
                draw.ellipse(box, fill=(*color, alpha))
            elif kind == 1:
                draw.rectangle(box, fill=(*color, alpha))
            else:
                points = [
                    (
                        cx + radius * math.cos(a) * (0.6 + 0.4 * self.rng.random()),
                        cy + radius * math.sin(a) * (0.6 + 0.4 * self.rng.random()),
                    )
                    for a in [i * 2 * math.pi / 6 for i in range(6)]
                ]
                draw.polygon(points, fill=(*color, alpha))

    # stage 3
    def stylize(self) -> None:
        styler = (
            {
                Style.PHOTOGRAPHIC: self._photographic,
                Style.ARTISTIC: self._artistic,
                Style.ANIME: self._anime,
                Style.DIGITAL_ART: self._digital_art,
                Style.WATERCOLOR: self._watercolor,
                Style.SKETCH: self._sketch,
                Style.PIXEL_ART: self._pixel_art,
                Style.CINEMATIC: self._cinematic,
                Style.CARTOON: self._cartoon,
                Style.ABSTRACT: self._abstract,
                Style.MINIMALIST: self._minimalist,
                Style.VINTAGE: self._vintage,
                Style.MODERN: self._modern,
            }.get(self.preset)
            if self.preset
            else None
        )
        if styler is None:
            self.image = self.image.filter(ImageFilter.SMOOTH_MORE)
        else:
            styler()

    # stage 4
    def finish(self) -> None:
        if self.negative:
            # What to avoid is honoured as restraint: a calmer, less saturated result.
            gray = ImageOps.grayscale(self.image).convert("RGB")
            self.image = Image.blend(self.image, gray, 0.35)
        width, height = self.image.size
        vignette = Image.radial_gradient("L").resize((width, height))
        dark = Image.new("RGB", (width, height), (0, 0, 0))
        self.image = Image.composite(dark, self.image, vignette.point(lambda v: v // 4))

    def png(self) -> bytes:
        out = io.BytesIO()
        self.image.save(out, format="PNG", optimize=False, compress_level=6)
        return out.getvalue()

    # style techniques
    def _photographic(self) -> None:
        self.image = self.image.filter(
            ImageFilter.GaussianBlur(radius=max(self.size.width, 256) / 160)
        )
        noise = Image.effect_noise(self.image.size, 18).convert("RGB")
        self.image = Image.blend(self.image, noise, 0.06)

    def _artistic(self) -> None:
        width, height = self.image.size
        draw = ImageDraw.Draw(self.image, "RGBA")
        for _ in range(220):
            x, y = self.rng.random() * width, self.rng.random() * height
            length = (0.02 + self.rng.random() * 0.08) * width
            angle = self.rng.random() * math.pi
            color = self.image.getpixel((int(x) % width, int(y) % height))
            assert isinstance(color, tuple)
            draw.line(
                (x, y, x + length * math.cos(angle), y + length * math.sin(angle)),
                fill=(*color[:3], 200),
                width=max(2, width // 64),
            )
        self.image = self.image.filter(ImageFilter.EDGE_ENHANCE_MORE)

    def _anime(self) -> None:
        flat = ImageOps.posterize(self.image, 3)
        edges = (
            flat.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 24 else 0)
        )
        outline = Image.new("RGB", flat.size, (30, 20, 40))
        self.image = Image.composite(outline, flat, edges)

    def _digital_art(self) -> None:
        width, height = self.image.size
        draw = ImageDraw.Draw(self.image, "RGBA")
        step = max(width // 16, 8)
        for x in range(0, width, step):
            draw.line((x, 0, x, height), fill=(*self.palette[1], 60), width=1)
        for y in range(0, height, step):
            draw.line((0, y, width, y), fill=(*self.palette[2], 60), width=1)
        self.image = ImageOps.autocontrast(self.image.filter(ImageFilter.SHARPEN))

    def _watercolor(self) -> None:
        soft = self.image.filter(ImageFilter.GaussianBlur(radius=max(self.size.width, 256) / 40))
        paper = Image.new("RGB", self.image.size, self.palette[3])
        self.image = ImageChops.multiply(Image.blend(soft, paper, 0.35), paper)

    def _sketch(self) -> None:
        gray = ImageOps.grayscale(self.image)
        edges = ImageOps.invert(gray.filter(ImageFilter.FIND_EDGES))
        self.image = ImageOps.autocontrast(edges).convert("RGB")

    def _pixel_art(self) -> None:
        width, height = self.image.size
        block = max(width // 32, 4)
        small = self.image.resize(
            (max(width // block, 1), max(height // block, 1)), Image.Resampling.BILINEAR
        )
        small = small.quantize(colors=16, dither=Image.Dither.NONE).convert("RGB")
        self.image = small.resize((width, height), Image.Resampling.NEAREST)

    def _cinematic(self) -> None:
        graded = ImageOps.colorize(
            ImageOps.grayscale(self.image),
            black=(10, 40, 50),
            white=(255, 190, 120),
            mid=(120, 110, 100),
        )
        self.image = ImageOps.autocontrast(graded, cutoff=2)
        width, height = self.image.size
        bar = height // 8
        draw = ImageDraw.Draw(self.image)
        draw.rectangle((0, 0, width, bar), fill=(0, 0, 0))
        draw.rectangle((0, height - bar, width, height), fill=(0, 0, 0))

    def _cartoon(self) -> None:
        # Flat saturated fills inside thick black outlines.
        flat = self.image.quantize(colors=6, dither=Image.Dither.NONE).convert("RGB")
        flat = ImageEnhance.Color(flat).enhance(1.8)
        edges = flat.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v else 0)
        thick = edges.filter(ImageFilter.MaxFilter(5 if self.size.width >= 256 else 3))
        self.image = Image.composite(Image.new("RGB", flat.size, (0, 0, 0)), flat, thick)

    def _abstract(self) -> None:
        # Overlapping colour fields folded onto themselves: no subject, only shape and hue.
        width, height = self.image.size
        turned = self.image.transpose(Image.Transpose.ROTATE_90).resize((width, height))
        mixed = ImageChops.difference(self.image, turned)
        draw = ImageDraw.Draw(mixed, "RGBA")
        for _ in range(12):
            color = self.rng.choice(self.palette)
            x0, y0 = self.rng.random() * width, self.rng.random() * height
            x1, y1 = self.rng.random() * width, self.rng.random() * height
            draw.line((x0, y0, x1, y1), fill=(*color, 220), width=max(3, width // 24))
        self.image = ImageOps.posterize(ImageOps.autocontrast(mixed), 2)

    def _minimalist(self) -> None:
        # One quiet ground and a single accent shape; everything else is left out.
        width, height = self.image.size
        self.image = Image.new("RGB", (width, height), self.palette[2])
        draw = ImageDraw.Draw(self.image)
        side = min(width, height)
        radius = side * (0.08 + 0.07 * self.rng.random())
        cx = width * (0.3 + 0.4 * self.rng.random())
        cy = height * (0.3 + 0.4 * self.rng.random())
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=self.palette[1])
        horizon = int(height * (0.7 + 0.1 * self.rng.random()))
        draw.line((0, horizon, width, horizon), fill=self.palette[3], width=max(1, side // 128))

    def _vintage(self) -> None:
        # Warm sepia, lifted blacks and lowered whites (faded print), film grain.
        toned = ImageOps.colorize(
            ImageOps.grayscale(self.image), black=(70, 45, 25), white=(245, 225, 185)
        )
        faded = toned.point(lambda v: 40 + v * 170 // 255)
        grain = Image.effect_noise(self.image.size, 40).convert("RGB")
        self.image = Image.blend(faded, grain, 0.12)

    def _modern(self) -> None:
        # Hard-edged colour blocks on a grid with crisp white gutters.
        width, height = self.image.size
        self.image = Image.new("RGB", (width, height), (250, 250, 250))
        draw = ImageDraw.Draw(self.image)
        gutter = max(2, width // 64)
        columns = sorted(self.rng.sample(range(1, 8), 2))
        rows = sorted(self.rng.sample(range(1, 8), 2))
        xs = [0, *(width * c // 8 for c in columns), width]
        ys = [0, *(height * r // 8 for r in rows), height]
        for left, right in itertools.pairwise(xs):
            for top, bottom in itertools.pairwise(ys):
                color = self.rng.choice(self.palette)
                draw.rectangle(
                    (left + gutter, top + gutter, right - gutter, bottom - gutter), fill=color
                )


def _shift_hue(color: RGB, amount: float) -> RGB:
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in color))
    r, g, b = colorsys.hsv_to_rgb((h + amount) % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))
