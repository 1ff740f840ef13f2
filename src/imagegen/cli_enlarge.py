"""`imagegen outpaint` and `imagegen upscale`: enlarge an image with a progress bar and
save the result into a folder, through the Python client (imagegen.client).

The image is named as `images/{id}` (one of the caller's library images), an https
or `data:` URL, or a local file, which is sent as bytes and kept as the caller's
upload (the result's parent), as any edit source is.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc

from imagegen.cli_generate import (
    _token,
    address_of,
    prepare_out_dir,
    progress_bar,
    refused,
    save_results,
)
from imagegen.client import ImageGenClient
from imagegen.config import Settings

#: What the new area of an outpaint shows when the caller does not say (`local`
#: ignores the prompt; the other providers paint it).
DEFAULT_OUTPAINT_PROMPT = "the same scene continued beyond its edges, in the same style"
ANCHORS = (
    "center",
    "top",
    "bottom",
    "left",
    "right",
    "top_left",
    "top_right",
    "bottom_left",
    "bottom_right",
)


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], styles: tuple[str, ...]
) -> None:
    """The `outpaint` and `upscale` commands."""
    outpaint = sub.add_parser(
        "outpaint",
        help="extend an image outward (pixels per side, or --to a canvas size) and save it",
    )
    outpaint.add_argument(
        "image", help="images/ID from your library, an https or data: URL, or a file"
    )
    outpaint.add_argument("--left", type=int, default=0, help="pixels to add on the left")
    outpaint.add_argument("--top", type=int, default=0, help="pixels to add at the top")
    outpaint.add_argument("--right", type=int, default=0, help="pixels to add on the right")
    outpaint.add_argument("--bottom", type=int, default=0, help="pixels to add at the bottom")
    outpaint.add_argument("--to", help="the canvas size to reach, WIDTHxHEIGHT (instead of sides)")
    outpaint.add_argument(
        "--anchor",
        choices=ANCHORS,
        default="",
        help="where the image sits on --to (default: center)",
    )
    outpaint.add_argument(
        "--prompt",
        default=DEFAULT_OUTPAINT_PROMPT,
        help="what the new area shows (default: the same scene continued)",
    )
    outpaint.add_argument("--negative", default="", help="negative prompt")
    outpaint.add_argument("--style", choices=styles)
    outpaint.add_argument("--seed", type=int)
    upscale = sub.add_parser("upscale", help="enlarge an image 2x or 4x and save it")
    upscale.add_argument(
        "image", help="images/ID from your library, an https or data: URL, or a file"
    )
    upscale.add_argument("--factor", type=int, choices=(2, 4), default=2)
    upscale.add_argument(
        "--upscaler", default="", help="one of the provider's upscalers (default: its first)"
    )
    for command in (outpaint, upscale):
        command.add_argument("--provider", default="", help="provider id (default: yours)")
        command.add_argument(
            "--format",
            choices=("png", "jpeg", "webp"),
            help="output format (default: PNG; an upscale of a library image keeps its own)",
        )
        command.add_argument("--out", default=".", help="directory to save the image in")
        command.add_argument("--addr", default=None, help="server address (IMAGEGEN_ADDR)")
        command.add_argument(
            "--user", default="cli", help="user for a minted token when none is given"
        )


def _image_argument(value: str) -> str | bytes:
    """A library image or a URL as given; a file's bytes. SystemExit if neither."""
    if value.startswith(("images/", "https://", "data:")):
        return value
    try:
        return Path(value).expanduser().read_bytes()
    except OSError as exc:
        raise SystemExit(
            f"imagegen: {value!r} is neither images/ID, an https or data: URL, nor a file "
            f"that can be read ({exc.strerror})"
        ) from None


def _size_argument(value: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise SystemExit(f"imagegen: --to must look like 1536x1024, not {value!r}") from None
    return width, height


async def run_outpaint(settings: Settings, args: argparse.Namespace) -> int:
    """Outpaint, wait with a progress bar, and save the result into --out."""
    image = await asyncio.to_thread(_image_argument, args.image)
    size = _size_argument(args.to) if args.to else None
    out_dir = await asyncio.to_thread(prepare_out_dir, args.out)
    async with ImageGenClient(address_of(settings, args), _token(settings, args.user)) as client:
        try:
            result = await client.outpaint(
                image,
                prompt=args.prompt,
                left=args.left,
                top=args.top,
                right=args.right,
                bottom=args.bottom,
                size=size,
                anchor=args.anchor,
                provider=args.provider,
                negative_prompt=args.negative,
                style=args.style or "",
                output_format=args.format or "",
                seed=args.seed,
                on_event=progress_bar,
            )
        except grpc.aio.AioRpcError as err:
            return refused(err)
    return await save_results(result, out_dir, "outpaint")


async def run_upscale(settings: Settings, args: argparse.Namespace) -> int:
    """Upscale, wait with a progress bar, and save the result into --out."""
    image = await asyncio.to_thread(_image_argument, args.image)
    out_dir = await asyncio.to_thread(prepare_out_dir, args.out)
    async with ImageGenClient(address_of(settings, args), _token(settings, args.user)) as client:
        try:
            result = await client.upscale(
                image,
                factor=args.factor,
                upscaler=args.upscaler,
                provider=args.provider,
                output_format=args.format or "",
                on_event=progress_bar,
            )
        except grpc.aio.AioRpcError as err:
            return refused(err)
    return await save_results(result, out_dir, "upscale")
