"""The values the imaging functions take and give."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from imagegen.domain.models import ImageFormat


@dataclass(frozen=True)
class ImageInfo:
    """What the bytes turned out to be."""

    format: ImageFormat
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class EncodeSettings:
    """How images are encoded when they must be: the defaults are what each format's
    own tools use by default, or (JPEG, WebP quality) what an image that is kept, not
    previewed, usually gets."""

    #: zlib level 0-9; 6 is zlib's and libpng's default
    png_compress_level: int = 6
    #: 1-100
    jpeg_quality: int = 90
    #: 1-100 (lossy WebP)
    webp_quality: int = 90
    #: 0-6, CPU spent for a smaller file; 4 is libwebp's default
    webp_effort: int = 4


class Preparation(enum.StrEnum):
    """How the stored bytes were made from the reply."""

    #: the reply's own bytes (metadata dropped), no pixel decoded
    PASSED_THROUGH = "passed_through"
    #: decoded once and encoded once in the asked format, same dimensions
    CONVERTED = "converted"
    #: decoded once, fitted to the asked size, encoded once
    FITTED = "fitted"


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to store: its bytes, what they are, how they were made, and a
    small WebP preview when one was asked for."""

    data: bytes
    info: ImageInfo
    preparation: Preparation
    preview: bytes | None = None
