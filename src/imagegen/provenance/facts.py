"""What a provenance mark says about an image: plain values, checked on construction."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

#: IPTC digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/), the
#: vocabulary both C2PA and IPTC/XMP use for "how was this made".
IPTC_DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRAINED_ALGORITHMIC_MEDIA = IPTC_DIGITAL_SOURCE_TYPE + "trainedAlgorithmicMedia"
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = (
    IPTC_DIGITAL_SOURCE_TYPE + "compositeWithTrainedAlgorithmicMedia"
)

GENERATOR_NAME = "imagegen"
MAX_TITLE_CHARS = 512


class Origin(enum.StrEnum):
    """How the pixels came to be."""

    #: Made by a model from a prompt alone.
    GENERATED = "generated"
    #: A model changed or combined existing images (the parents).
    EDITED = "edited"

    @property
    def digital_source_type(self) -> str:
        """The IPTC digital source type URI for this origin."""
        if self is Origin.GENERATED:
            return TRAINED_ALGORITHMIC_MEDIA
        return COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA


@dataclass(frozen=True)
class Ingredient:
    """A source image, whole: its bytes are hashed and any C2PA manifest it carries joins
    the new image's ingredient chain."""

    data: bytes
    #: How the chain names it, e.g. `images/{id}` or an upload's file name.
    title: str

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("an ingredient needs the image's bytes")
        _check_title(self.title, "ingredient title")


@dataclass(frozen=True)
class ProvenanceFacts:
    """Everything `ProvenanceMarker.mark` writes into an image besides its bytes.

    - A generation has no parents.
    - An edit has one or more parents: the first is the image that was edited (C2PA
      `parentOf`, action `c2pa.opened`), the others were placed into it (`componentOf`,
      `c2pa.placed`), e.g. a second source image or a mask.
    - A conversion (DownloadImage re-encoding a stored image) names the stored image in
      `converted_from`; its parents are already in that image's own manifest, so `parents`
      stays empty, and `origin` repeats the stored image's origin.
    """

    origin: Origin
    provider_id: str
    model: str
    #: When the image was made (timezone-aware).
    created: datetime
    #: The deployment's usage notice (IMAGEGEN_USAGE_NOTICE).
    usage_notice: str
    #: The manifest's title, e.g. `images/{id}`; empty gives a generic one.
    title: str = ""
    parents: tuple[Ingredient, ...] = ()
    converted_from: Ingredient | None = None
    #: The provider's reply as it came, before the pipeline dropped its metadata. When it
    #: carries the provider's own C2PA manifest (OpenAI signs its output), that manifest
    #: joins the chain as the `provider output` component. Empty: the bytes being marked
    #: are the ones probed.
    provider_output: bytes = b""

    def __post_init__(self) -> None:
        if self.created.tzinfo is None or self.created.utcoffset() is None:
            raise ValueError("created must be timezone-aware")
        if not self.provider_id:
            raise ValueError("provider_id must not be empty")
        if not self.usage_notice.strip():
            raise ValueError("usage_notice must not be empty")
        if self.title:
            _check_title(self.title, "title")
        if self.converted_from is not None and self.parents:
            raise ValueError(
                "a conversion names its source in converted_from; the parents are "
                "already in the source's own manifest"
            )
        if self.converted_from is None:
            if self.origin is Origin.GENERATED and self.parents:
                raise ValueError("a generation has no parents; an image made from others is EDITED")
            if self.origin is Origin.EDITED and not self.parents:
                raise ValueError("an edit needs at least one parent")

    @property
    def digital_source_type(self) -> str:
        """The IPTC digital source type URI written into both marks."""
        return self.origin.digital_source_type


def _check_title(title: str, what: str) -> None:
    if not title or len(title) > MAX_TITLE_CHARS:
        raise ValueError(f"{what} must be 1 to {MAX_TITLE_CHARS} characters")
    if any(ord(character) < 32 for character in title):
        raise ValueError(f"{what} must not contain control characters")
