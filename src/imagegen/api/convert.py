"""Mapping between the contract's messages and domain values (no logic beyond that)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from imagegen.domain.batches import BATCHES_PREFIX
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import (
    DEFAULT_SIZE,
    EditSource,
    EventType,
    Generation,
    GenerationEvent,
    GenerationSource,
    GenerationSpec,
    GenerationState,
    ImageFormat,
    OutpaintAnchor,
    OutpaintSpec,
    Size,
    SourceRef,
    StoredImage,
    Style,
    UpscaleSpec,
    WebhookAttempt,
)
from imagegen.domain.validation import check_resource_name
from imagegen.domain.webhooks import shown_callback_uri
from imagegen.v1 import common_pb2, generation_pb2

_STYLE_TO_PB = {
    Style.PHOTOGRAPHIC: common_pb2.STYLE_PHOTOGRAPHIC,
    Style.ARTISTIC: common_pb2.STYLE_ARTISTIC,
    Style.ANIME: common_pb2.STYLE_ANIME,
    Style.DIGITAL_ART: common_pb2.STYLE_DIGITAL_ART,
    Style.WATERCOLOR: common_pb2.STYLE_WATERCOLOR,
    Style.SKETCH: common_pb2.STYLE_SKETCH,
    Style.PIXEL_ART: common_pb2.STYLE_PIXEL_ART,
    Style.CINEMATIC: common_pb2.STYLE_CINEMATIC,
    Style.CARTOON: common_pb2.STYLE_CARTOON,
    Style.ABSTRACT: common_pb2.STYLE_ABSTRACT,
    Style.MINIMALIST: common_pb2.STYLE_MINIMALIST,
    Style.VINTAGE: common_pb2.STYLE_VINTAGE,
    Style.MODERN: common_pb2.STYLE_MODERN,
}
_STYLE_FROM_PB = {v: k for k, v in _STYLE_TO_PB.items()}

_FORMAT_TO_PB = {
    ImageFormat.PNG: common_pb2.IMAGE_FORMAT_PNG,
    ImageFormat.JPEG: common_pb2.IMAGE_FORMAT_JPEG,
    ImageFormat.WEBP: common_pb2.IMAGE_FORMAT_WEBP,
}
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT_TO_PB.items()}

_SOURCE_TO_PB = {
    GenerationSource.API: common_pb2.GENERATION_SOURCE_API,
    GenerationSource.UI: common_pb2.GENERATION_SOURCE_UI,
    GenerationSource.WORKFLOW: common_pb2.GENERATION_SOURCE_WORKFLOW,
    GenerationSource.AGENT: common_pb2.GENERATION_SOURCE_AGENT,
}
_SOURCE_FROM_PB = {v: k for k, v in _SOURCE_TO_PB.items()}

_ANCHOR_TO_PB = {
    OutpaintAnchor.CENTER: common_pb2.OUTPAINT_ANCHOR_CENTER,
    OutpaintAnchor.TOP: common_pb2.OUTPAINT_ANCHOR_TOP,
    OutpaintAnchor.BOTTOM: common_pb2.OUTPAINT_ANCHOR_BOTTOM,
    OutpaintAnchor.LEFT: common_pb2.OUTPAINT_ANCHOR_LEFT,
    OutpaintAnchor.RIGHT: common_pb2.OUTPAINT_ANCHOR_RIGHT,
    OutpaintAnchor.TOP_LEFT: common_pb2.OUTPAINT_ANCHOR_TOP_LEFT,
    OutpaintAnchor.TOP_RIGHT: common_pb2.OUTPAINT_ANCHOR_TOP_RIGHT,
    OutpaintAnchor.BOTTOM_LEFT: common_pb2.OUTPAINT_ANCHOR_BOTTOM_LEFT,
    OutpaintAnchor.BOTTOM_RIGHT: common_pb2.OUTPAINT_ANCHOR_BOTTOM_RIGHT,
}
_ANCHOR_FROM_PB = {v: k for k, v in _ANCHOR_TO_PB.items()}

_STATE_TO_PB = {
    GenerationState.QUEUED: generation_pb2.GENERATION_STATE_QUEUED,
    GenerationState.RUNNING: generation_pb2.GENERATION_STATE_RUNNING,
    GenerationState.COMPLETED: generation_pb2.GENERATION_STATE_COMPLETED,
    GenerationState.FAILED: generation_pb2.GENERATION_STATE_FAILED,
    GenerationState.CANCELLED: generation_pb2.GENERATION_STATE_CANCELLED,
}
STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}

_EVENT_TO_PB = {
    EventType.QUEUED: generation_pb2.GENERATION_EVENT_TYPE_QUEUED,
    EventType.STARTED: generation_pb2.GENERATION_EVENT_TYPE_STARTED,
    EventType.PROGRESS: generation_pb2.GENERATION_EVENT_TYPE_PROGRESS,
    EventType.IMAGE_READY: generation_pb2.GENERATION_EVENT_TYPE_IMAGE_READY,
    EventType.COMPLETED: generation_pb2.GENERATION_EVENT_TYPE_COMPLETED,
    EventType.FAILED: generation_pb2.GENERATION_EVENT_TYPE_FAILED,
    EventType.CANCELLED: generation_pb2.GENERATION_EVENT_TYPE_CANCELLED,
}

#: The ranges google/protobuf/timestamp.proto and duration.proto define.
MIN_TIMESTAMP_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999

GENERATIONS_PREFIX = "generations/"
IMAGES_PREFIX = "images/"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(value: datetime | None) -> Timestamp | None:
    """The Timestamp of an aware datetime (a naive one is UTC), as protobuf's
    FromDatetime makes it at a third of its cost (three per image of a list page)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    since_epoch = value - _EPOCH
    return Timestamp(
        seconds=since_epoch.days * 86_400 + since_epoch.seconds,
        nanos=since_epoch.microseconds * 1000,
    )


def batch_id_from_name(name: str, field: str = "batch") -> str:
    """`batches/{id}` -> id; a bare id is accepted too; IMG_003 naming `field` for
    anything else."""
    return check_resource_name(name, "batches", field=field)


def generation_id_from_name(name: str) -> str:
    """`generations/{id}` -> id; a bare id is accepted too; IMG_003 for anything else."""
    return check_resource_name(name, "generations")


@dataclass(frozen=True)
class ParsedSpec:
    """A request's spec, and the sources it names (fetched later by the service)."""

    spec: GenerationSpec
    source_refs: tuple[SourceRef, ...]
    mask_ref: SourceRef | None
    size_given: bool


def _source_ref(source: common_pb2.ImageSource, field: str) -> SourceRef:
    kind = source.WhichOneof("source")
    if kind == "uri":
        return SourceRef("uri", uri=source.uri)
    if kind == "data":
        return SourceRef("bytes", data=source.data)
    if kind == "image":
        return SourceRef("image", image_id=check_resource_name(source.image, "images", field=field))
    raise InvalidRequest(f"{field} must set one of uri, data or image", field=field)


def parse_spec(spec: common_pb2.GenerationSpec) -> ParsedSpec:
    """Contract -> domain, with the source images as references."""
    size_given = spec.HasField("size") and (spec.size.width, spec.size.height) != (0, 0)
    return ParsedSpec(
        spec=spec_from_proto(spec),
        source_refs=tuple(_source_ref(s, "sources") for s in spec.sources),
        mask_ref=_source_ref(spec.mask, "mask") if spec.HasField("mask") else None,
        size_given=size_given or not spec.sources,
    )


def spec_from_proto(spec: common_pb2.GenerationSpec) -> GenerationSpec:
    """Contract -> domain; unknown enum values are IMG_003. Sources are not resolved here."""
    if spec.style != common_pb2.STYLE_UNSPECIFIED and spec.style not in _STYLE_FROM_PB:
        raise InvalidRequest(f"style {spec.style} is not a known style", field="style")
    if spec.format != common_pb2.IMAGE_FORMAT_UNSPECIFIED and spec.format not in _FORMAT_FROM_PB:
        raise InvalidRequest(f"format {spec.format} is not a known format", field="format")
    if (
        spec.source != common_pb2.GENERATION_SOURCE_UNSPECIFIED
        and spec.source not in _SOURCE_FROM_PB
    ):
        raise InvalidRequest(f"source {spec.source} is not a known source", field="source")
    if spec.HasField("size") and (spec.size.width, spec.size.height) != (0, 0):
        size = Size(spec.size.width, spec.size.height)
    else:
        size = DEFAULT_SIZE
    return GenerationSpec(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        style=_STYLE_FROM_PB.get(spec.style),
        size=size,
        count=spec.count or 1,
        output_format=_FORMAT_FROM_PB.get(spec.format, ImageFormat.PNG),
        seed=spec.seed if spec.HasField("seed") else None,
        provider=spec.provider,
        model=spec.model,
        source=_SOURCE_FROM_PB.get(spec.source, GenerationSource.API),
        outpaint=outpaint_from_proto(spec.outpaint) if spec.HasField("outpaint") else None,
        upscale=(
            UpscaleSpec(factor=spec.upscale.factor, upscaler=spec.upscale.upscaler)
            if spec.HasField("upscale")
            else None
        ),
    )


def outpaint_from_proto(outpaint: common_pb2.Outpaint) -> OutpaintSpec:
    """Contract -> domain; an unknown anchor is IMG_003. A 0x0 target_size is unset, as
    an ImageSize of 0x0 is elsewhere. The limits are domain/enlarge.py's to check."""
    anchor = outpaint.anchor
    if anchor != common_pb2.OUTPAINT_ANCHOR_UNSPECIFIED and anchor not in _ANCHOR_FROM_PB:
        raise InvalidRequest(
            f"outpaint.anchor {anchor} is not a known anchor", field="outpaint.anchor"
        )
    target = outpaint.target_size
    has_target = outpaint.HasField("target_size") and (target.width, target.height) != (0, 0)
    return OutpaintSpec(
        left=outpaint.left,
        top=outpaint.top,
        right=outpaint.right,
        bottom=outpaint.bottom,
        target=Size(target.width, target.height) if has_target else None,
        anchor=_ANCHOR_FROM_PB.get(anchor),
    )


def outpaint_to_proto(outpaint: OutpaintSpec) -> common_pb2.Outpaint:
    """Domain -> contract; a stored target's anchor is always given (the centre when the
    caller left it unset)."""
    message = common_pb2.Outpaint(
        left=outpaint.left, top=outpaint.top, right=outpaint.right, bottom=outpaint.bottom
    )
    if outpaint.target is not None:
        message.target_size.CopyFrom(
            common_pb2.ImageSize(width=outpaint.target.width, height=outpaint.target.height)
        )
        message.anchor = _ANCHOR_TO_PB[outpaint.placement]
    return message


def _duration(value: timedelta) -> Duration:
    duration = Duration()
    duration.FromTimedelta(value)
    return duration


def _source_to_proto(source: EditSource) -> common_pb2.ImageSource:
    """A stored job's source as the library image it is; a source stored before sources
    were library images, by its signed URL (never by its bytes)."""
    if source.image_id:
        return common_pb2.ImageSource(image=IMAGES_PREFIX + source.image_id)
    return common_pb2.ImageSource(uri=source.url)


def spec_to_proto(spec: GenerationSpec) -> common_pb2.GenerationSpec:
    message = common_pb2.GenerationSpec(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        style=_STYLE_TO_PB.get(spec.style, common_pb2.STYLE_UNSPECIFIED)
        if spec.style
        else common_pb2.STYLE_UNSPECIFIED,
        size=common_pb2.ImageSize(width=spec.size.width, height=spec.size.height),
        count=spec.count,
        format=_FORMAT_TO_PB[spec.output_format],
        provider=spec.provider,
        model=spec.model,
        source=_SOURCE_TO_PB[spec.source],
        sources=[_source_to_proto(s) for s in spec.sources],
    )
    if spec.mask is not None:
        message.mask.CopyFrom(_source_to_proto(spec.mask))
    if spec.seed is not None:
        message.seed = spec.seed
    if spec.outpaint is not None:
        message.outpaint.CopyFrom(outpaint_to_proto(spec.outpaint))
    if spec.upscale is not None:
        message.upscale.CopyFrom(
            common_pb2.Upscale(factor=spec.upscale.factor, upscaler=spec.upscale.upscaler)
        )
    return message


def image_to_proto(
    image: StoredImage, url_ttl: timedelta, *, usage_notice: str
) -> common_pb2.Image:
    """An image as the contract shows it; `usage_notice` is the deployment's, shown for
    every image but an upload (the caller's own file, which carries no marks)."""
    message = common_pb2.Image(
        name=IMAGES_PREFIX + image.id,
        uri=image.url,
        width=image.width,
        height=image.height,
        mime_type=image.mime_type,
        size_bytes=image.size_bytes,
        generation=GENERATIONS_PREFIX + image.generation_id if image.generation_id else "",
        index=image.index,
        provider=image.provider,
        model=image.model,
        prompt=image.prompt,
        negative_prompt=image.negative_prompt,
        style=_STYLE_TO_PB.get(Style(image.style), common_pb2.STYLE_UNSPECIFIED)
        if image.style
        else common_pb2.STYLE_UNSPECIFIED,
        title=image.title,
        description=image.description,
        tags=list(image.tags),
        favorite=image.favorite,
        parents=[IMAGES_PREFIX + p for p in image.parent_ids],
        upload=image.upload,
        sub_account=image.sub_account,
        edit=image.is_edit,
        credits=image.credits,
        usage_notice="" if image.upload else usage_notice,
    )
    if image.generation_duration is not None:
        message.generation_duration.CopyFrom(_duration(image.generation_duration))
    if image.seed is not None:
        message.seed = image.seed % 2**32
    created = _timestamp(image.created_at)
    if created is not None:
        message.create_time.CopyFrom(created)
    updated = _timestamp(image.updated_at or image.created_at)
    if updated is not None:
        message.update_time.CopyFrom(updated)
    deleted = _timestamp(image.deleted_at)
    if deleted is not None:
        message.delete_time.CopyFrom(deleted)
    if image.url:
        message.uri_expire_time.seconds = int(time.time()) + int(url_ttl.total_seconds())
    return message


def generation_to_proto(
    generation: Generation, url_ttl: timedelta, *, usage_notice: str
) -> generation_pb2.Generation:
    """A job as the contract shows it, with the deployment's usage notice."""
    message = generation_pb2.Generation(
        name=GENERATIONS_PREFIX + generation.id,
        spec=spec_to_proto(generation.spec),
        state=_STATE_TO_PB[generation.state],
        provider=generation.provider,
        model=generation.model,
        credits=generation.credits,
        attempts=generation.attempts,
        images=[
            image_to_proto(img, url_ttl, usage_notice=usage_notice) for img in generation.images
        ],
        request_id=generation.request_id,
        last_sequence=generation.last_sequence,
        sub_account=generation.sub_account,
        edit=generation.spec.is_edit,
        callback_uri=shown_callback_uri(generation.spec.callback_uri),
        batch=BATCHES_PREFIX + generation.batch_id if generation.batch_id else "",
        webhook_deliveries=[_webhook_attempt(a) for a in generation.webhook_deliveries],
        usage_notice=usage_notice,
        first_sequence=generation.first_sequence,
    )
    if generation.duration is not None:
        message.duration.CopyFrom(_duration(generation.duration))
    if generation.error_code:
        message.error.CopyFrom(
            generation_pb2.GenerationError(
                code=generation.error_code, message=generation.error_message
            )
        )
    for field, value in (
        ("create_time", generation.created_at),
        ("update_time", generation.updated_at),
        ("start_time", generation.started_at),
        ("end_time", generation.completed_at),
    ):
        stamp = _timestamp(value)
        if stamp is not None:
            getattr(message, field).CopyFrom(stamp)
    return message


def _webhook_attempt(attempt: WebhookAttempt) -> generation_pb2.WebhookDelivery:
    message = generation_pb2.WebhookDelivery(
        webhook_id=attempt.webhook_id,
        attempt=attempt.attempt,
        http_status=attempt.http_status,
        error=attempt.error,
        delivered=attempt.delivered,
    )
    message.attempt_time.FromDatetime(attempt.attempt_time)
    return message


def event_to_proto(
    event: GenerationEvent, url_ttl: timedelta, *, usage_notice: str
) -> generation_pb2.GenerationEvent:
    """An event as the contract shows it; an IMAGE_READY event's image carries the
    deployment's usage notice."""
    message = generation_pb2.GenerationEvent(
        generation=GENERATIONS_PREFIX + event.generation_id,
        sequence=event.sequence,
        type=_EVENT_TO_PB[event.type],
    )
    stamp = _timestamp(event.created_at)
    if stamp is not None:
        message.create_time.CopyFrom(stamp)
    if event.type is EventType.PROGRESS:
        message.progress.CopyFrom(
            generation_pb2.GenerationProgress(
                percent=event.percent,
                stage=event.stage,
                preview=event.preview,
                preview_mime_type=event.preview_mime_type,
                image_index=int(event.extra.get("image_index", 0)),
            )
        )
    elif event.type is EventType.IMAGE_READY and event.image is not None:
        message.image.CopyFrom(image_to_proto(event.image, url_ttl, usage_notice=usage_notice))
    elif event.type is EventType.FAILED:
        message.error.CopyFrom(
            generation_pb2.GenerationError(
                code=event.error_code, message=event.error_message, retryable=event.retryable
            )
        )
    return message


def format_to_proto(output_format: ImageFormat) -> common_pb2.ImageFormat.ValueType:
    return _FORMAT_TO_PB[output_format]


def all_styles_proto() -> list[common_pb2.Style.ValueType]:
    return list(_STYLE_TO_PB.values())


def state_from_proto(state: generation_pb2.GenerationState.ValueType) -> GenerationState:
    if state not in STATE_FROM_PB:
        raise InvalidRequest(f"state {state} is not a generation state", field="states")
    return STATE_FROM_PB[state]


def optional_time(message: Message, field: str) -> datetime | None:
    """A Timestamp field as an aware datetime, or None when unset; IMG_003 naming the
    field for a value outside the Timestamp's own range (0001-01-01 to 9999-12-31 UTC)."""
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    # Checked before conversion: protobuf raises ValueError past this range, which
    # would reach the caller as INTERNAL.
    if not (
        MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS
        and 0 <= stamp.nanos <= MAX_NANOS
    ):
        raise InvalidRequest(
            f"{field} is not a valid Timestamp: seconds must be {MIN_TIMESTAMP_SECONDS} to "
            f"{MAX_TIMESTAMP_SECONDS} (years 1 to 9999) and nanos 0 to {MAX_NANOS}",
            field=field,
        )
    return stamp.ToDatetime(tzinfo=UTC)


def optional_duration(message: Message, field: str) -> timedelta | None:
    """A Duration field as a timedelta, or None when unset; IMG_003 naming the field for
    a value outside the Duration's own range (about +-10,000 years, nanos of the same
    sign as seconds)."""
    if not message.HasField(field):
        return None
    duration: Duration = getattr(message, field)
    seconds, nanos = duration.seconds, duration.nanos
    if not (
        -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS
        and -MAX_NANOS <= nanos <= MAX_NANOS
        and not (seconds > 0 > nanos or seconds < 0 < nanos)
    ):
        raise InvalidRequest(
            f"{field} is not a valid Duration: seconds must be within "
            f"+-{MAX_DURATION_SECONDS} and nanos within +-{MAX_NANOS}, of the same sign",
            field=field,
        )
    return duration.ToTimedelta()


def format_from_proto(value: common_pb2.ImageFormat.ValueType) -> ImageFormat | None:
    """None for unspecified; IMG_003 for an unknown value."""
    if value == common_pb2.IMAGE_FORMAT_UNSPECIFIED:
        return None
    if value not in _FORMAT_FROM_PB:
        raise InvalidRequest(f"format {value} is not a known format", field="format")
    return _FORMAT_FROM_PB[value]


def image_id_from_name(name: str) -> str:
    """`images/{id}` -> id; a bare id is accepted too; IMG_003 for anything else."""
    return check_resource_name(name, "images")


def style_from_proto(value: common_pb2.Style.ValueType) -> Style | None:
    """None for unspecified; IMG_003 for an unknown value."""
    if value == common_pb2.STYLE_UNSPECIFIED:
        return None
    if value not in _STYLE_FROM_PB:
        raise InvalidRequest(f"style {value} is not a known style", field="style")
    return _STYLE_FROM_PB[value]


def source_from_proto(
    value: common_pb2.GenerationSource.ValueType, *, field: str = "source"
) -> GenerationSource:
    """API for unspecified; IMG_003 for an unknown value."""
    if value == common_pb2.GENERATION_SOURCE_UNSPECIFIED:
        return GenerationSource.API
    if value not in _SOURCE_FROM_PB:
        raise InvalidRequest(f"source {value} is not a known source", field=field)
    return _SOURCE_FROM_PB[value]


def style_to_proto(style: str) -> common_pb2.Style.ValueType:
    return _STYLE_TO_PB[Style(style)] if style else common_pb2.STYLE_UNSPECIFIED
