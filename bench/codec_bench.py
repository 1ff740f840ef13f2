"""Codec comparison on our workload: which library decodes, fits and encodes the
provider's reply with the least CPU.

The input is a 1024x1024 PNG of photographic-like content (gradients, shapes, blur and
sensor-like noise; ~1.5 MiB at zlib level 6), as a provider returns it. For each codec
it times, over the same bytes in the same run:

- check:   prove the reply is whole and within limits (ours: header + chunk/CRC walk +
           inflate without unfiltering; the codecs: a full decode, what we did before)
- png>png, png>jpeg, png>webp: one decode + one encode at the production settings
- fit:     a 1536x1024 PNG decoded, scaled to cover 1024x1024, centre-cropped, encoded
- preview: a 128 px WebP from an already decoded 1024x1024 image
- reply:   the whole reply step for a reply that already is the asked PNG, as it was
           (Pillow: inspect, convert at level 6, inspect again) and as it is now
           (`prepare_output`: header, pass-through check, no decode)

Prints median wall ms and mean process CPU ms per operation (CPU counts every thread of
the process, so a codec that spreads one operation over both cores shows it), and the
output size. Other sessions may be loading the machine: compare rows of one run only.

Run: `.venv/bin/python bench/codec_bench.py [--repeat N]`.
"""

from __future__ import annotations

import argparse
import io
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyvips
from PIL import Image, ImageDraw, ImageFilter

from imagegen.domain.models import ImageFormat, Size
from imagegen.imaging import (
    DecodedImage,
    EncodeSettings,
    ImageLimits,
    VipsCodec,
    pass_through,
    prepare_output,
    read_header,
)

SETTINGS = EncodeSettings()
LIMITS = ImageLimits(max_pixels=16_777_216, max_bytes=None)


def photo_like(width: int, height: int, seed: int = 7) -> Image.Image:
    """Content that compresses like a photograph, not like flat colour."""
    rnd = random.Random(seed)
    layers = [
        Image.linear_gradient("L").resize((width, height)),
        Image.radial_gradient("L").resize((width, height)),
        Image.effect_mandelbrot((width, height), (-2.0, -1.2, 0.8, 1.2), 60),
    ]
    image = Image.merge("RGB", layers)
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = rnd.randrange(width), rnd.randrange(height)
        side = rnd.randrange(16, max(17, width // 4))
        colour = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
        draw.ellipse((x, y, x + side, y + side), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(2))
    noise = Image.merge("RGB", [Image.effect_noise((width, height), 40) for _ in range(3)])
    return Image.blend(image, noise, 0.06)


def png_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6)
    return out.getvalue()


# --- Pillow -------------------------------------------------------------------------


def pil_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pil_encode(image: Image.Image, target: ImageFormat) -> bytes:
    out = io.BytesIO()
    if target is ImageFormat.JPEG:
        image.convert("RGB").save(out, format="JPEG", quality=SETTINGS.jpeg_quality, optimize=True)
    elif target is ImageFormat.WEBP:
        image.save(out, format="WEBP", quality=SETTINGS.webp_quality, method=SETTINGS.webp_effort)
    else:
        image.save(out, format="PNG", compress_level=SETTINGS.png_compress_level)
    return out.getvalue()


def pil_fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = max(width / image.width, height / image.height)
    scaled_w, scaled_h = round(image.width * scale), round(image.height * scale)
    left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
    box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def pil_preview(image: Image.Image) -> bytes:
    small = image.copy()
    small.thumbnail((128, 128))
    out = io.BytesIO()
    small.save(out, format="WEBP", quality=70, method=0)
    return out.getvalue()


# --- libvips: the production codec itself ----------------------------------------

VIPS = VipsCodec()


def vips_decode(data: bytes) -> DecodedImage:
    return VIPS.decode(data, read_header(data, LIMITS))


def vips_encode(image: DecodedImage, target: ImageFormat) -> bytes:
    return VIPS.encode(image, target, SETTINGS)


def vips_encode_png_nofilter(image: DecodedImage) -> bytes:
    # libvips' own default (no row filter): the speed/size trade we did not take
    out: bytes = image.pixels.pngsave_buffer(compression=SETTINGS.png_compress_level, keep="none")
    return out


def vips_fit(image: DecodedImage, width: int, height: int) -> DecodedImage:
    return VIPS.fit(image, width, height)


def vips_preview(image: DecodedImage) -> bytes:
    return VIPS.preview(image, 128)


# --- timing -------------------------------------------------------------------------


@dataclass
class Row:
    operation: str
    codec: str
    wall_ms: float
    cpu_ms: float
    out_bytes: int


def measure(operation: str, codec: str, run: Callable[[], bytes | None], repeat: int) -> Row:
    run()  # warm up: first-call costs (plugin loading, tables) are not per image
    walls, cpus, size = [], [], 0
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        out = run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        size = len(out) if out else 0
    return Row(
        operation, codec, statistics.median(walls) * 1000, statistics.mean(cpus) * 1000, size
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    pyvips.cache_set_max(0)  # every reply is new bytes: never let the cache flatter vips

    square = png_of(photo_like(1024, 1024))
    wide = png_of(photo_like(1536, 1024, seed=11))
    decoded_pil = pil_decode(square)
    decoded_vips = vips_decode(square)

    def ours_check() -> None:
        pass_through(square, read_header(square, LIMITS))

    cases: list[tuple[str, str, Callable[[], bytes | None]]] = [
        ("check (header+integrity / full decode)", "ours, no decode", ours_check),
        ("check (header+integrity / full decode)", "pillow", lambda: (pil_decode(square), None)[1]),
    ]
    vips_modes = [("libvips x2", 2), ("libvips x1", 1)]
    for label, _ in vips_modes:
        cases.append(
            (
                "check (header+integrity / full decode)",
                label,
                lambda: (vips_decode(square), None)[1],
            )
        )
    for target in (ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.WEBP):
        name = f"decode+encode png>{target.value}"
        cases.append((name, "pillow", lambda t=target: pil_encode(pil_decode(square), t)))
        for label, _ in vips_modes:
            cases.append((name, label, lambda t=target: vips_encode(vips_decode(square), t)))
    cases.append(
        (
            "decode+encode png>png",
            "libvips x2, filter none",
            lambda: vips_encode_png_nofilter(vips_decode(square)),
        )
    )
    name = "decode+fit 1536x1024>1024^2+encode png"
    cases.append(
        (name, "pillow", lambda: pil_encode(pil_fit(pil_decode(wide), 1024, 1024), ImageFormat.PNG))
    )
    for label, _ in vips_modes:
        cases.append(
            (
                name,
                label,
                lambda: vips_encode(vips_fit(vips_decode(wide), 1024, 1024), ImageFormat.PNG),
            )
        )
    cases.append(("preview 128px webp (decoded)", "pillow", lambda: pil_preview(decoded_pil)))
    for label, _ in vips_modes:
        cases.append(("preview 128px webp (decoded)", label, lambda: vips_preview(decoded_vips)))

    def reply_before() -> bytes:
        pil_decode(square)
        encoded = pil_encode(pil_decode(square), ImageFormat.PNG)
        pil_decode(encoded)
        return encoded

    def reply_now() -> bytes:
        return prepare_output(
            square,
            target_format=ImageFormat.PNG,
            target_size=Size(1024, 1024),
            limits=LIMITS,
            encode_settings=SETTINGS,
        ).data

    cases.append(("reply step, PNG already as asked", "before: pillow x3 + encode", reply_before))
    cases.append(("reply step, PNG already as asked", "now: prepare_output", reply_now))

    threads_of = dict(vips_modes)
    rows = []
    for operation, codec, run in cases:
        threads = next((n for label, n in threads_of.items() if codec.startswith(label)), None)
        if threads is not None:
            pyvips.concurrency_set(threads)
        rows.append(measure(operation, codec, run, args.repeat))

    load = open("/proc/loadavg").read().split()[:3] if platform.system() == "Linux" else []
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, Python "
        f"{platform.python_version()}, Pillow {Image.__version__}, libvips "
        f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}, load {' '.join(load)}"
    )
    print(
        f"input: 1024x1024 PNG {len(square)} bytes, 1536x1024 PNG {len(wide)} bytes; "
        f"settings {SETTINGS}; {args.repeat} runs each"
    )
    print(f"{'operation':42} {'codec':26} {'wall ms':>8} {'cpu ms':>8} {'out bytes':>10}")
    for row in rows:
        print(
            f"{row.operation:42} {row.codec:26} {row.wall_ms:8.1f} {row.cpu_ms:8.1f} "
            f"{row.out_bytes:10d}"
        )


if __name__ == "__main__":
    main()
