"""Benchmark: the cost of `ProvenanceMarker.mark` per format on a 1024x1024 image (the
PNG about 1.5 MiB), against the direct path measured in the same run: encoding that
image in the same format, which the pipeline does anyway. Also its parts (XMP alone,
C2PA alone), an edit with two 1024x1024 parents, and the CPU time (process time, every
thread) a mark adds to each stored image: the pipeline marks every image it stores, in
a worker thread. Prints figures; asserts nothing.

    .venv/bin/python bench/provenance_bench.py [--runs 30]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import c2pa
from PIL import Image, ImageDraw

from imagegen import imaging
from imagegen.config import DEFAULT_USAGE_NOTICE, ProvenanceSettings
from imagegen.domain.models import ImageFormat
from imagegen.provenance import Ingredient, Origin, ProvenanceFacts, open_marker
from imagegen.provenance.xmp import XmpFields, embed_xmp


def picture(size: int = 1024) -> Image.Image:
    """Smooth gradients with shapes and some grain: compresses like a rendered image
    (about 1.5 MiB as PNG at our settings)."""
    red = Image.linear_gradient("L").resize((size, size))
    green = red.rotate(90)
    blue = Image.radial_gradient("L").resize((size, size))
    image = Image.merge("RGB", (red, green, blue))
    draw = ImageDraw.Draw(image)
    for index in range(40):
        x, y = (index * 97) % size, (index * 53) % size
        draw.ellipse((x, y, x + 120, y + 80), fill=((index * 37) % 256, 90, 200 - index))
    grain = Image.merge("RGB", [Image.effect_noise((size, size), 13) for _ in range(3)])
    return Image.blend(image, grain, 0.2)


def png_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def production_encoder(image: Image.Image) -> Callable[[ImageFormat], bytes]:
    """Encodes `image` as the pipeline does (libvips, the default settings), from one
    decode made here."""
    codec = imaging.default_codec()
    data = png_of(image)
    decoded = codec.decode(data, imaging.read_header(data, imaging.ImageLimits(max_pixels=1 << 25)))
    return lambda fmt: codec.encode(decoded, fmt, imaging.EncodeSettings())


def timed(action: Callable[[], object], runs: int) -> list[float]:
    action()  # warm-up
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def cpu_timed(action: Callable[[], object], runs: int) -> list[float]:
    """CPU milliseconds (this process, every thread) per run."""
    action()  # warm-up
    samples = []
    for _ in range(runs):
        started = time.process_time()
        action()
        samples.append((time.process_time() - started) * 1000)
    return samples


def line(label: str, samples: list[float], reference: float | None = None) -> str:
    median = statistics.median(samples)
    p90 = statistics.quantiles(samples, n=10)[-1]
    ratio = f"  {median / reference:5.2f}x encode" if reference else ""
    return f"  {label:<34} median {median:7.2f} ms   p90 {p90:7.2f} ms{ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    print(f"python {platform.python_version()}, c2pa {c2pa.sdk_version()}, {args.runs} runs")
    with tempfile.TemporaryDirectory() as data_dir:
        settings = ProvenanceSettings(cert=None, key=None, usage_notice=DEFAULT_USAGE_NOTICE)
        marker = open_marker(settings, Path(data_dir))
        image = picture()
        encode_as = production_encoder(image)
        created = datetime.now(UTC)
        generated = ProvenanceFacts(
            origin=Origin.GENERATED,
            provider_id="local",
            model="bench",
            created=created,
            usage_notice=DEFAULT_USAGE_NOTICE,
            title="images/bench",
        )
        parents = tuple(
            Ingredient(png_of(picture().rotate(angle)), f"images/p{angle}") for angle in (90, 180)
        )
        edited = ProvenanceFacts(
            origin=Origin.EDITED,
            provider_id="local",
            model="bench",
            created=created,
            usage_notice=DEFAULT_USAGE_NOTICE,
            title="images/bench-edit",
            parents=parents,
        )
        xmp = XmpFields(
            digital_source_type=generated.digital_source_type,
            usage_terms=DEFAULT_USAGE_NOTICE,
            rights=DEFAULT_USAGE_NOTICE,
        )
        for fmt in (ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.WEBP):
            data = encode_as(fmt)
            marked = marker.mark(data, fmt, generated)
            print(
                f"{fmt.value}: {len(data) / 2**20:.2f} MiB, "
                f"marks add {len(marked) - len(data)} bytes"
            )
            encode = timed(lambda fmt=fmt: encode_as(fmt), args.runs)
            reference = statistics.median(encode)
            print(line("encode (direct path)", encode))
            print(
                line(
                    "mark, generation",
                    timed(lambda d=data, f=fmt: marker.mark(d, f, generated), args.runs),
                    reference,
                )
            )
            print(
                line(
                    "mark, edit with two parents",
                    timed(lambda d=data, f=fmt: marker.mark(d, f, edited), args.runs),
                    reference,
                )
            )
            print(
                line(
                    "  CPU of a generation's mark",
                    cpu_timed(lambda d=data, f=fmt: marker.mark(d, f, generated), args.runs),
                    statistics.median(cpu_timed(lambda fmt=fmt: encode_as(fmt), args.runs)),
                )
            )
            print(line("  of which XMP alone", timed(lambda d=data: embed_xmp(d, xmp), args.runs)))
            # What the marker pays to learn the provider embedded no manifest.
            unmarked_reader = timed(
                lambda d=data, f=fmt: marker._carries_manifest(d, f.mime_type),
                args.runs,
            )
            print(line("  of which manifest probe", unmarked_reader))
    print("Figures taken while other work loads the machine are noise; compare ratios.")


if __name__ == "__main__":
    main()
