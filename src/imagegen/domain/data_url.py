"""`data:` URLs (RFC 2397) carrying base64 image bytes."""

from __future__ import annotations

import base64
import binascii

from imagegen.domain.errors import ImageTooLarge, InvalidRequest


def decode_data_url(url: str, *, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URL; IMG_007 past `max_bytes`, IMG_003 if malformed.
    The declared media type is ignored: the bytes decide the type."""
    comma = url.find(",")
    header = url[:comma].lower()
    if comma < 0 or not header.startswith("data:"):
        raise InvalidRequest(
            "a data: URL needs the form data:image/png;base64,<data>", field="sources"
        )
    if not header.endswith(";base64"):
        raise InvalidRequest("only base64 data: URLs are accepted", field="sources")
    # Four base64 characters carry three bytes: refuse by the length alone, before the
    # payload is copied out of the URL or decoded.
    if len(url) - comma - 1 > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageTooLarge(
            f"the data: URL holds more than {max_bytes} bytes", metadata={"limit": str(max_bytes)}
        )
    try:
        data = base64.b64decode(url[comma + 1 :].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the data: URL is not valid base64", field="sources") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"the source image is {len(data)} bytes; the limit is {max_bytes}",
            metadata={"limit": str(max_bytes)},
        )
    return data
