"""XMP fields in PNG, JPEG and WebP, written and read with exiv2 (pyexiv2).

exiv2 rewrites only the metadata containers: a PNG gains an `iTXt XML:com.adobe.xmp`
chunk (IDAT chunks are copied byte for byte), a JPEG an APP1 segment after APP0, a WebP an
`XMP ` chunk (a simple VP8/VP8L file becomes the extended VP8X layout with the XMP flag).
XMP already in the image (a provider's) is kept; the fields below are set over it.

pyexiv2 holds the GIL while it works (about 1-4 ms for a 1024x1024 image); its error log
is process-global, which the GIL serialises.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyexiv2

_LANG_DEFAULT = 'lang="x-default"'
_KEY_SOURCE_TYPE = "Xmp.iptcExt.DigitalSourceType"
_KEY_USAGE_TERMS = "Xmp.xmpRights.UsageTerms"
_KEY_RIGHTS = "Xmp.dc.rights"
_KEY_CREATOR_TOOL = "Xmp.xmp.CreatorTool"
_KEY_CREATE_DATE = "Xmp.xmp.CreateDate"
# exiv2's levels: 3 = errors only. Warnings would go to stdout, where `imagegen serve`
# writes its `listening` line; errors become exceptions.
_EXIV2_ERRORS_ONLY = 3


class XmpError(ValueError):
    """exiv2 could not read or write the image's metadata."""


@dataclass(frozen=True)
class XmpFields:
    """The XMP properties imagegen sets (and reads back). Empty text means absent."""

    #: `Iptc4xmpExt:DigitalSourceType`, an IPTC digital source type URI.
    digital_source_type: str = ""
    #: `xmpRights:UsageTerms` (x-default language).
    usage_terms: str = ""
    #: `dc:rights` (x-default language).
    rights: str = ""
    #: `xmp:CreatorTool`, e.g. `imagegen 0.1.0`.
    creator_tool: str = ""
    #: `xmp:CreateDate`, ISO 8601.
    create_date: str = ""


def embed_xmp(data: bytes, fields: XmpFields) -> bytes:
    """`data` with the non-empty `fields` set in its XMP packet; pixels untouched."""
    changes: dict[str, object] = {}
    if fields.digital_source_type:
        changes[_KEY_SOURCE_TYPE] = fields.digital_source_type
    if fields.usage_terms:
        changes[_KEY_USAGE_TERMS] = {_LANG_DEFAULT: fields.usage_terms}
    if fields.rights:
        changes[_KEY_RIGHTS] = {_LANG_DEFAULT: fields.rights}
    if fields.creator_tool:
        changes[_KEY_CREATOR_TOOL] = fields.creator_tool
    if fields.create_date:
        changes[_KEY_CREATE_DATE] = fields.create_date
    pyexiv2.set_log_level(_EXIV2_ERRORS_ONLY)
    try:
        image = pyexiv2.ImageData(data)
    except (RuntimeError, ValueError) as exc:
        raise XmpError(f"exiv2 cannot open the image: {exc}") from exc
    try:
        image.modify_xmp(changes)
        marked: bytes = image.get_bytes()
    except (RuntimeError, ValueError) as exc:
        raise XmpError(f"exiv2 cannot write the image's XMP: {exc}") from exc
    finally:
        image.close()
    return marked


def read_xmp(data: bytes) -> XmpFields:
    """The imagegen XMP fields found in `data` (empty where absent)."""
    pyexiv2.set_log_level(_EXIV2_ERRORS_ONLY)
    try:
        image = pyexiv2.ImageData(data)
    except (RuntimeError, ValueError) as exc:
        raise XmpError(f"exiv2 cannot open the image: {exc}") from exc
    try:
        found: dict[str, object] = image.read_xmp()
    except (RuntimeError, ValueError) as exc:
        raise XmpError(f"exiv2 cannot read the image's XMP: {exc}") from exc
    finally:
        image.close()
    return XmpFields(
        digital_source_type=_text(found.get(_KEY_SOURCE_TYPE)),
        usage_terms=_text(found.get(_KEY_USAGE_TERMS)),
        rights=_text(found.get(_KEY_RIGHTS)),
        creator_tool=_text(found.get(_KEY_CREATOR_TOOL)),
        create_date=_text(found.get(_KEY_CREATE_DATE)),
    )


def _text(value: object) -> str:
    # Language alternatives come back as {'lang="x-default"': text, ...}.
    if isinstance(value, dict):
        chosen = value.get(_LANG_DEFAULT, next(iter(value.values()), ""))
        return chosen if isinstance(chosen, str) else ""
    return value if isinstance(value, str) else ""
