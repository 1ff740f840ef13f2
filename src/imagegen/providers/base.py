"""The one interface every image provider implements, and what it declares it can do."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from imagegen.domain.enlarge import OutpaintGeometry
from imagegen.domain.errors import InvalidRequest, ProviderFailed
from imagegen.domain.models import (
    DEFAULT_SIZE,
    STANDARD_SIZES,
    ImageFormat,
    Size,
    Style,
    UpscaleSpec,
)

#: Called by a provider as it works: percent 0-100 (never falling), a stage word,
#: and an optional small encoded preview (PNG/JPEG/WebP bytes, <= 128 px a side).
ProgressCallback = Callable[[int, str, bytes | None], Awaitable[None]]


@dataclass(frozen=True)
class ProviderCapabilities:
    """What a provider can do; requests needing more are refused before any call."""

    edit: bool = False
    mask: bool = False
    negative_prompt: bool = False
    seed: bool = False
    style: bool = False
    previews: bool = False
    sizes: tuple[Size, ...] = STANDARD_SIZES
    formats: tuple[ImageFormat, ...] = tuple(ImageFormat)
    max_count: int = 4
    #: it can extend an image (ProviderRequest.outpaint)
    outpaint: bool = False
    #: it can enlarge an image (ProviderRequest.upscale) with one of its `upscalers`
    upscale: bool = False


@dataclass(frozen=True)
class SourceImage:
    """An already fetched and checked source image for an edit."""

    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class ProviderRequest:
    """One image to make. Batches are made one image per call, seed + index."""

    prompt: str
    negative_prompt: str = ""
    style: Style | None = None
    size: Size = DEFAULT_SIZE
    seed: int = 0
    #: one of the provider's `models`; empty for its default (the first)
    model: str = ""
    #: the format the caller will get; a provider that can answer in it is asked to, so
    #: the reply can be stored as it comes (the pipeline converts any other)
    output_format: ImageFormat = ImageFormat.PNG
    sources: tuple[SourceImage, ...] = ()
    mask: SourceImage | None = None
    #: for edits: the size the caller asked for (else the provider keeps the source's)
    resize_to: Size | None = None
    #: extend the first source onto this canvas (outpainting); the result is the
    #: canvas's size, whatever `size` and `resize_to` say
    outpaint: OutpaintGeometry | None = None
    #: enlarge the first source by `upscale.factor` with `upscale.upscaler` (empty:
    #: the provider's default, its first); the prompt is not used
    upscale: UpscaleSpec | None = None
    #: wall-clock budget left for this call, in seconds
    timeout: float = 120.0


@dataclass(frozen=True)
class ProviderImage:
    """A provider's raw answer: encoded bytes, not yet decoded or checked by us."""

    data: bytes
    mime_type: str = ""
    model: str = ""
    seed: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


#: What `check()` is given for an outpaint before its source is fetched (as sources are
#: empty placeholders then): providers decide on whether an outpaint is asked, never on
#: its sizes, which domain/enlarge.py checks.
PENDING_OUTPAINT = OutpaintGeometry(source=Size(0, 0), canvas=Size(0, 0), left=0, top=0)


def check_enlargement(
    provider: str,
    capabilities: ProviderCapabilities,
    upscalers: tuple[str, ...],
    request: ProviderRequest,
) -> None:
    """IMG_003 when the request outpaints or upscales and the provider cannot (field
    `provider`, metadata `capability`), or names an upscaler the provider does not offer
    (field `upscale.upscaler`, metadata listing its upscalers). Empty means the
    provider's default upscaler and always passes."""
    for asked, capable, capability, verb in (
        (request.outpaint is not None, capabilities.outpaint, "outpaint", "extend"),
        (request.upscale is not None, capabilities.upscale, "upscale", "upscale"),
    ):
        if asked and not capable:
            raise InvalidRequest(
                f"provider {provider!r} cannot {verb} images; choose one that can "
                "(ListProviders shows capabilities)",
                field="provider",
                metadata={"capability": capability},
            )
    upscaler = request.upscale.upscaler if request.upscale is not None else ""
    if upscaler and upscaler not in upscalers:
        shown = upscaler if len(upscaler) <= 80 else upscaler[:80] + "..."
        offered = (
            f"use one of {', '.join(upscalers)}, or leave it empty for its default "
            f"({upscalers[0]})"
            if upscalers
            else "it offers none"
        )
        raise InvalidRequest(
            f"upscaler {shown!r} is not offered by the {provider} provider; {offered}; "
            "ListProviders shows each provider's upscalers",
            field="upscale.upscaler",
            metadata={"provider": provider, "upscalers": ",".join(upscalers)},
        )


def first_source(request: ProviderRequest, what: str) -> SourceImage:
    """The source an outpaint or upscale works on (IMG_003 naming `sources` when there
    is none; submit refuses that first). `what` names the request in the message."""
    if not request.sources:
        raise InvalidRequest(f"{what} needs a source image", field="sources")
    return request.sources[0]


def check_model(provider: str, models: tuple[str, ...], model: str) -> None:
    """IMG_003 (field `model`) naming the provider's models when `model` is not one of
    them; empty means the provider's default and always passes."""
    if not model or model in models:
        return
    shown = model if len(model) <= 80 else model[:80] + "..."
    raise InvalidRequest(
        f"model {shown!r} is not offered by the {provider} provider; use one of "
        f"{', '.join(models)}, or leave it empty for its default ({models[0]}); "
        "ListProviders shows each provider's models",
        field="model",
        metadata={"provider": provider, "models": ",".join(models)},
    )


class ProviderUnavailable(ProviderFailed):
    """IMG_002 that says the provider itself is down, overloaded or broken (5xx, 429,
    timeouts, connection errors, replies its API does not promise): the failures that
    count toward opening its circuit breaker. A refusal caused by the request is a plain
    ProviderFailed or a ContentPolicyRefused, and never counts."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        retry_after: timedelta | None = None,
        throttled: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable, retry_after=retry_after, metadata=metadata)
        #: the provider asked us to slow down (HTTP 429): it counts against its health
        #: only once retries are exhausted
        self.throttled = throttled


class Provider(Protocol):
    """An image backend. Errors are raised as imagegen.domain.errors types only."""

    @property
    def id(self) -> str:
        """Stable provider id: `local`, `forge`, `openai`, `sdwebui`."""
        ...

    @property
    def display_name(self) -> str:
        """Name for people."""
        ...

    @property
    def capabilities(self) -> ProviderCapabilities:
        """What it can do."""
        ...

    @property
    def models(self) -> tuple[str, ...]:
        """Model names it offers; the first is the default."""
        ...

    @property
    def upscalers(self) -> tuple[str, ...]:
        """Upscaler names it offers; the first is the default. Empty when it cannot
        upscale."""
        ...

    @property
    def configured(self) -> bool:
        """Whether it has what it needs (URL, credentials) to take a call; one that is
        not is listed nowhere and refused at submit."""
        ...

    def check(self, request: ProviderRequest) -> None:
        """Refuse, before a job exists, what this provider will not be able to do
        (InvalidRequest naming the reason), including an outpaint or upscale it cannot
        do (check_enlargement). Sources may be empty placeholders here, and an outpaint
        PENDING_OUTPAINT."""
        ...

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        """Make one image. Raises ProviderNotConfigured, ProviderFailed, ContentPolicyRefused."""
        ...
