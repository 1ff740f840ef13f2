"""The `local` provider's edits: simple instructions applied to the first source.

An instruction is one or more clauses ("grayscale, rotate left and add a border");
every clause must name a known operation, or the whole request is refused (IMG_003)
with a sentence that lists what is understood.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from imagegen.domain.errors import InvalidRequest

Transform = Callable[[Image.Image], Image.Image]

#: Longest side an upscale may produce.
MAX_UPSCALE_SIDE = 4096


@dataclass(frozen=True)
class EditOperation:
    """One understood clause of an instruction."""

    name: str
    apply: Transform


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _sepia(image: Image.Image) -> Image.Image:
    return ImageOps.colorize(ImageOps.grayscale(image), black=(40, 26, 13), white=(255, 240, 192))


def _crop_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _border(image: Image.Image) -> Image.Image:
    width = max(4, min(image.size) // 20)
    return ImageOps.expand(image, border=width, fill=(255, 255, 255))


def _upscale(image: Image.Image) -> Image.Image:
    factor = 2 if max(image.size) * 2 <= MAX_UPSCALE_SIDE else 1
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.LANCZOS)


def _rotation(clause: str) -> Transform:
    if "180" in clause:
        return lambda image: image.transpose(Image.Transpose.ROTATE_180)
    if "left" in clause or "counter" in clause or "anticlockwise" in clause or "270" in clause:
        return lambda image: image.transpose(Image.Transpose.ROTATE_90)
    return lambda image: image.transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise


_SIMPLE: tuple[tuple[str, tuple[str, ...], Transform], ...] = (
    (
        "grayscale",
        ("grayscale", "greyscale", "black and white"),
        lambda i: ImageOps.grayscale(i).convert("RGB"),
    ),
    ("sepia", ("sepia",), _sepia),
    ("blur", ("blur",), lambda i: i.filter(ImageFilter.GaussianBlur(max(2, min(i.size) // 100)))),
    ("sharpen", ("sharpen",), lambda i: i.filter(ImageFilter.UnsharpMask(2, 150, 3))),
    (
        "brighten",
        ("brighten", "brighter", "lighten"),
        lambda i: ImageEnhance.Brightness(i).enhance(1.4),
    ),
    ("darken", ("darken", "darker"), lambda i: ImageEnhance.Brightness(i).enhance(0.6)),
    ("flip", ("flip", "upside down"), lambda i: i.transpose(Image.Transpose.FLIP_TOP_BOTTOM)),
    ("mirror", ("mirror",), lambda i: i.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    ("invert", ("invert", "negative"), ImageOps.invert),
    ("crop to square", ("crop to square", "square crop", "crop square"), _crop_square),
    ("border", ("border", "frame"), _border),
    ("upscale", ("upscale", "enlarge"), _upscale),
)
KNOWN = (
    "grayscale",
    "sepia",
    "blur",
    "sharpen",
    "brighten",
    "darken",
    "rotate",
    "flip",
    "mirror",
    "invert",
    "crop to square",
    "border",
    "upscale",
)


def parse_instruction(instruction: str) -> tuple[EditOperation, ...]:
    """The operations an instruction names, in order; IMG_003 for any clause not understood."""
    clauses = [
        c.strip() for c in re.split(r",|;|\bthen\b|\band\b", instruction.lower()) if c.strip(" .!")
    ]
    operations: list[EditOperation] = []
    for clause in clauses:
        if "rotate" in clause or "turn" in clause:
            operations.append(EditOperation("rotate", _rotation(clause)))
            continue
        match = next((op for op in _SIMPLE if any(word in clause for word in op[1])), None)
        if match is None:
            raise InvalidRequest(
                f"the local provider does not understand {clause!r}; it can do: "
                + ", ".join(KNOWN)
                + " (or choose a provider that edits from free text)",
                field="prompt",
            )
        operations.append(EditOperation(match[0], match[2]))
    if not operations:
        raise InvalidRequest("the edit instruction is empty", field="prompt")
    return tuple(operations)


def apply_operations(image: Image.Image, operations: tuple[EditOperation, ...]) -> Image.Image:
    """Run each operation in turn on an RGB copy of the image."""
    result = _rgb(image)
    for operation in operations:
        result = _rgb(operation.apply(result))
    return result
