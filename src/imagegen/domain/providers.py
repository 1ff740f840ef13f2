"""What a caller is told about the image providers of a deployment (ListProviders)."""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.domain.models import ImageFormat, Size


@dataclass(frozen=True)
class ProviderInfo:
    """One configured provider as ListProviders shows it: what it can do, its models,
    and whether it serves the caller's requests that name no provider."""

    id: str
    display_name: str
    #: it can edit source images
    edit: bool
    #: it honours an edit mask
    mask: bool
    #: it takes a negative prompt natively
    negative_prompt: bool
    #: it honours a seed
    seed: bool
    #: it renders style presets natively
    style: bool
    #: it sends previews while it works
    previews: bool
    #: it can extend an image (outpainting)
    outpaint: bool
    #: it can enlarge an image (upscaling) with one of its `upscalers`
    upscale: bool
    sizes: tuple[Size, ...]
    formats: tuple[ImageFormat, ...]
    #: images it makes per request at most
    max_count: int
    #: model names it offers; the first is its default
    models: tuple[str, ...]
    #: upscaler names it offers; the first is its default (empty when it cannot upscale)
    upscalers: tuple[str, ...]
    #: the caller's default provider (their stored choice, else the deployment's)
    default: bool
