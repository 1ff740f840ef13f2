"""Plain values of the generation domain: no I/O, no gRPC, no SQL."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta


class ImageFormat(enum.StrEnum):
    """Output encodings a caller can ask for."""

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        return "jpg" if self is ImageFormat.JPEG else self.value

    @classmethod
    def from_mime(cls, mime_type: str) -> ImageFormat:
        return cls(mime_type.removeprefix("image/").replace("jpg", "jpeg"))


class Style(enum.StrEnum):
    """Style presets. Each renders visibly differently on every provider."""

    #: the product's "photorealistic"
    PHOTOGRAPHIC = "photographic"
    ARTISTIC = "artistic"
    ANIME = "anime"
    #: the product's "illustration"
    DIGITAL_ART = "digital_art"
    WATERCOLOR = "watercolor"
    SKETCH = "sketch"
    PIXEL_ART = "pixel_art"
    CINEMATIC = "cinematic"
    CARTOON = "cartoon"
    ABSTRACT = "abstract"
    MINIMALIST = "minimalist"
    VINTAGE = "vintage"
    MODERN = "modern"


class GenerationSource(enum.StrEnum):
    """Who asked for a generation; recorded on the job and its usage."""

    API = "api"
    UI = "ui"
    WORKFLOW = "workflow"
    AGENT = "agent"


class GenerationState(enum.StrEnum):
    """Where a job is in its life. The last three are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {GenerationState.COMPLETED, GenerationState.FAILED, GenerationState.CANCELLED}
)


class EventType(enum.StrEnum):
    """Kinds of entries in a job's event log."""

    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    IMAGE_READY = "image_ready"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED)


@dataclass(frozen=True)
class Size:
    """Pixel dimensions of an image."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


#: The sizes every provider offers (the ImageSize comment in proto/imagegen/v1/common.proto);
#: 1024x1024 is the default.
STANDARD_SIZES: tuple[Size, ...] = (
    Size(256, 256),
    Size(512, 512),
    Size(1024, 1024),
    Size(1024, 1536),
    Size(1536, 1024),
)
DEFAULT_SIZE = Size(1024, 1024)


@dataclass(frozen=True)
class Identity:
    """Who is calling, as the verified token says."""

    user_id: str
    sub_account: str = ""
    plan: str = "free"


@dataclass(frozen=True)
class SourceRef:
    """A source image as the caller named it, before it is fetched and checked."""

    #: "uri" (https or data:), "bytes", "image" (a library image id), or "stored" (a
    #: source a job stored before sources became library images, by its blob key)
    kind: str
    uri: str = ""
    data: bytes = b""
    image_id: str = ""
    storage_key: str = ""


@dataclass(frozen=True)
class FetchedBody:
    """What a guarded server-side fetch brought back."""

    data: bytes
    final_url: str
    content_type: str


@dataclass(frozen=True)
class EditSource:
    """A fetched, checked and stored source image of an edit."""

    sha256: str
    storage_key: str
    mime_type: str
    width: int
    height: int
    #: the library image it is (an upload or an image of the caller's library; it becomes
    #: the result's parent); empty only for sources stored before uploads were kept
    image_id: str = ""
    #: a signed URL of such an older source, for showing the job (never stored)
    url: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "sha256": self.sha256,
            "storage_key": self.storage_key,
            "mime_type": self.mime_type,
            "width": self.width,
            "height": self.height,
            "image_id": self.image_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> EditSource:
        return cls(
            sha256=str(data["sha256"]),
            storage_key=str(data["storage_key"]),
            mime_type=str(data["mime_type"]),
            width=int(str(data["width"])),
            height=int(str(data["height"])),
            image_id=str(data.get("image_id", "")),
        )


class OutpaintAnchor(enum.StrEnum):
    """Where the source sits on an outpaint canvas given by its target size."""

    CENTER = "center"
    TOP = "top"
    BOTTOM = "bottom"
    LEFT = "left"
    RIGHT = "right"
    TOP_LEFT = "top_left"
    TOP_RIGHT = "top_right"
    BOTTOM_LEFT = "bottom_left"
    BOTTOM_RIGHT = "bottom_right"


@dataclass(frozen=True)
class OutpaintSpec:
    """How to extend a source image, as the caller asked: pixels to add on each side,
    or a target canvas size and where the source sits on it (never both). Checked by
    domain/enlarge.py; the canvas follows from it and the source's size."""

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0
    #: the canvas size to reach; None when the sides are given
    target: Size | None = None
    #: where the source sits on `target`; None for the centre (only with `target`)
    anchor: OutpaintAnchor | None = None

    @property
    def placement(self) -> OutpaintAnchor:
        """The anchor in effect: the given one, else the centre."""
        return self.anchor or OutpaintAnchor.CENTER

    def to_json(self) -> dict[str, object]:
        """Its stored (and fingerprinted) form; an unset anchor of a target is the centre."""
        return {
            "left": self.left,
            "top": self.top,
            "right": self.right,
            "bottom": self.bottom,
            "target": str(self.target) if self.target else "",
            "anchor": self.placement.value if self.target else "",
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> OutpaintSpec:
        target = str(data.get("target") or "")
        width, _, height = target.partition("x")
        anchor = str(data.get("anchor") or "")
        return cls(
            left=int(str(data.get("left", 0))),
            top=int(str(data.get("top", 0))),
            right=int(str(data.get("right", 0))),
            bottom=int(str(data.get("bottom", 0))),
            target=Size(int(width), int(height)) if target else None,
            anchor=OutpaintAnchor(anchor) if anchor else None,
        )


@dataclass(frozen=True)
class UpscaleSpec:
    """How to enlarge a source image: by `factor` (2 or 4) with one of the provider's
    upscalers (empty for its default). Checked by domain/enlarge.py."""

    factor: int
    upscaler: str = ""

    def to_json(self) -> dict[str, object]:
        """Its stored (and fingerprinted) form."""
        return {"factor": self.factor, "upscaler": self.upscaler}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> UpscaleSpec:
        return cls(factor=int(str(data["factor"])), upscaler=str(data.get("upscaler") or ""))


@dataclass(frozen=True)
class GenerationSpec:
    """A validated text-to-image request: everything that decides the result, and where
    to tell when the job ends (`callback_uri`)."""

    prompt: str
    negative_prompt: str = ""
    style: Style | None = None
    size: Size = DEFAULT_SIZE
    count: int = 1
    output_format: ImageFormat = ImageFormat.PNG
    seed: int | None = None
    provider: str = ""
    #: one of the provider's models; empty for the provider's default
    model: str = ""
    source: GenerationSource = GenerationSource.API
    #: source images of an edit; empty for text-to-image
    sources: tuple[EditSource, ...] = ()
    mask: EditSource | None = None
    #: an edit whose caller gave no size keeps its first source's geometry
    size_from_source: bool = False
    #: extend the first source outward (outpainting); None for any other request
    outpaint: OutpaintSpec | None = None
    #: enlarge the first source by a factor (upscaling); None for any other request
    upscale: UpscaleSpec | None = None
    #: URL POSTed to (a signed webhook) when the job ends; empty for none
    callback_uri: str = ""

    @property
    def is_edit(self) -> bool:
        return bool(self.sources)

    def fingerprint(self) -> dict[str, object]:
        """The parameters that make two requests "the same" for idempotency
        (sources by content, wherever they came from). `model`, `outpaint` and `upscale`
        are there only when set, so a job stored before they existed still matches its
        retry."""
        fingerprint: dict[str, object] = {
            "sources": [s.sha256 for s in self.sources],
            "mask": self.mask.sha256 if self.mask else "",
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "style": self.style.value if self.style else "",
            "width": self.size.width,
            "height": self.size.height,
            "count": self.count,
            "format": self.output_format.value,
            "seed": self.seed,
            "provider": self.provider,
            "source": self.source.value,
        }
        if self.model:
            fingerprint["model"] = self.model
        if self.outpaint is not None:
            fingerprint["outpaint"] = self.outpaint.to_json()
        if self.upscale is not None:
            fingerprint["upscale"] = self.upscale.to_json()
        if self.callback_uri:
            # Only when set, as `model`: a retry naming another URL is another request.
            fingerprint["callback_uri"] = self.callback_uri
        return fingerprint


@dataclass(frozen=True)
class StoredImage:
    """An image that exists both as a row and as a blob."""

    id: str
    user_id: str
    generation_id: str
    storage_key: str
    mime_type: str
    width: int
    height: int
    size_bytes: int
    provider: str
    model: str
    prompt: str
    created_at: datetime
    index: int = 0
    url: str = ""
    deleted: bool = False
    is_edit: bool = False
    parent_ids: tuple[str, ...] = ()
    negative_prompt: str = ""
    style: str = ""
    seed: int | None = None
    title: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    favorite: bool = False
    updated_at: datetime | None = None
    deleted_at: datetime | None = None
    #: supplied by the caller as an edit source or mask, not made by a provider
    upload: bool = False
    #: the owner's sub-account when it was stored
    sub_account: str = ""
    #: credits charged for it (0 for an upload)
    credits: int = 0
    #: from its provider call's start to its storage; None for an upload (or not measured)
    generation_duration: timedelta | None = None
    #: SHA-256 of an upload's bytes, hex; empty for a generated image
    sha256: str = ""


@dataclass(frozen=True)
class Generation:
    """A generation job as the owner sees it."""

    id: str
    user_id: str
    sub_account: str
    request_id: str
    spec: GenerationSpec
    state: GenerationState
    provider: str
    model: str
    credits: int
    attempts: int
    error_code: str
    error_message: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    images: tuple[StoredImage, ...] = ()
    last_sequence: int = 0
    #: W3C trace context of the submitting request, so the worker's spans join its trace
    trace_context: dict[str, str] = field(default_factory=dict)
    #: the owner's plan when the job was submitted (its limits apply to the job)
    plan: str = "free"
    #: every attempt to deliver the job's webhook, oldest first
    webhook_deliveries: tuple[WebhookAttempt, ...] = ()
    #: the batch it was submitted in (BatchGenerate); empty for a single job
    batch_id: str = ""
    #: the oldest event still stored: 1 until the finished job's log is compacted
    #: (domain/retention.py), then its first kept event
    first_sequence: int = 1

    @property
    def duration(self) -> timedelta | None:
        """How long it ran, from its first start to its end; None until it ended, and for
        a job that never started."""
        if self.started_at is None or self.completed_at is None:
            return None
        return max(self.completed_at - self.started_at, timedelta(0))


@dataclass(frozen=True)
class WebhookAttempt:
    """One attempt to POST a callback; every attempt of one callback has its webhook_id."""

    webhook_id: str
    attempt: int
    attempt_time: datetime
    #: the receiver's HTTP status; 0 when no answer came
    http_status: int
    #: why it failed, for people; empty when delivered
    error: str
    delivered: bool


@dataclass(frozen=True)
class GenerationEvent:
    """One entry of a job's event log; `sequence` is gap-free from 1 per job until the
    finished job's log is compacted (its progress events are then dropped)."""

    generation_id: str
    sequence: int
    type: EventType
    created_at: datetime
    percent: int = 0
    stage: str = ""
    preview: bytes = b""
    preview_mime_type: str = ""
    image: StoredImage | None = None
    error_code: str = ""
    error_message: str = ""
    retryable: bool = False
    extra: dict[str, str] = field(default_factory=dict)
