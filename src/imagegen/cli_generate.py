"""`imagegen generate`: one generation with a progress bar, images saved to a folder."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc
import httpx
from grpc_status import rpc_status

from imagegen.client import GenerationResult, ImageGenClient
from imagegen.config import Settings
from imagegen.v1 import common_pb2, generation_pb2

_STYLES = {name.removeprefix("STYLE_").lower(): value for name, value in common_pb2.Style.items()}
_FORMATS = {
    "png": common_pb2.IMAGE_FORMAT_PNG,
    "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
    "webp": common_pb2.IMAGE_FORMAT_WEBP,
}
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
BAR_WIDTH = 30


def _token(settings: Settings, user: str) -> str:
    token = os.environ.get("IMAGEGEN_TOKEN")
    if token:
        return token
    from imagegen.identity import mint_token, resolve_jwt_key

    return mint_token(
        resolve_jwt_key(settings.jwt, settings.data_dir),
        user_id=user,
        algorithm=settings.jwt.algorithms[0],
        issuer=settings.jwt.issuer,
        audience=settings.jwt.audience,
    )


def _spec(args: argparse.Namespace) -> common_pb2.GenerationSpec:
    try:
        width_text, height_text = args.size.lower().split("x")
        width, height = int(width_text), int(height_text)
    except ValueError:
        raise SystemExit(f"imagegen: --size must look like 1024x1024, not {args.size!r}") from None
    spec = common_pb2.GenerationSpec(
        prompt=args.prompt,
        negative_prompt=args.negative,
        style=_STYLES[args.style] if args.style else common_pb2.STYLE_UNSPECIFIED,
        size=common_pb2.ImageSize(width=width, height=height),
        count=args.count,
        format=_FORMATS[args.format],
        provider=args.provider,
        source=common_pb2.GENERATION_SOURCE_API,
    )
    if args.seed is not None:
        spec.seed = args.seed
    return spec


def _draw(percent: int, stage: str) -> None:
    filled = BAR_WIDTH * percent // 100
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    sys.stderr.write(f"\r[{bar}] {percent:3d}% {stage:<12}")
    sys.stderr.flush()


def prepare_out_dir(out: str) -> Path:
    """The directory to save images in, made if missing."""
    path = Path(out).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def address_of(settings: Settings, args: argparse.Namespace) -> str:
    """The server to call: --addr, else IMAGEGEN_ADDR, else this machine's gRPC port."""
    return args.addr or os.environ.get("IMAGEGEN_ADDR") or f"127.0.0.1:{settings.grpc_port}"


def progress_bar(event: generation_pb2.GenerationEvent) -> None:
    """Draw a job's progress on stderr from its events (an `on_event` handler)."""
    if event.type == generation_pb2.GENERATION_EVENT_TYPE_PROGRESS:
        _draw(event.progress.percent, event.progress.stage)
    elif event.type == generation_pb2.GENERATION_EVENT_TYPE_QUEUED:
        _draw(0, "queued")
    elif event.type == generation_pb2.GENERATION_EVENT_TYPE_COMPLETED:
        _draw(100, "done")
        sys.stderr.write("\n")


def refused(err: grpc.aio.AioRpcError) -> int:
    """Print a refused call as `imagegen: STATUS REASON: message`; the exit code."""
    sys.stderr.write("\n")
    status = rpc_status.from_call(err)
    reason = ""
    if status is not None:
        from google.rpc import error_details_pb2

        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    print(
        f"imagegen: {err.code().name} {reason}: {err.details()}".replace("  ", " "),
        file=sys.stderr,
    )
    return 1


async def save_results(result: GenerationResult, out_dir: Path, what: str = "generation") -> int:
    """Save a finished job's images into `out_dir`, printing each URL and file; the
    exit code (1 when the job did not complete)."""
    if result.state != "completed":
        print(
            f"\nimagegen: {what} {result.state}: {result.error_code} {result.error_message}",
            file=sys.stderr,
        )
        return 1
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        for image in result.images:
            reply = await http.get(image.uri)
            reply.raise_for_status()
            image_id = image.name.removeprefix("images/")
            path = out_dir / f"{image_id}.{_EXTENSIONS.get(image.mime_type, 'bin')}"
            await asyncio.to_thread(path.write_bytes, reply.content)
            print(image.uri)
            print(f"saved {path} ({image.width}x{image.height}, {image.size_bytes} bytes)")
    return 0


async def run_generate(settings: Settings, args: argparse.Namespace) -> int:
    out_dir = await asyncio.to_thread(prepare_out_dir, args.out)
    async with ImageGenClient(address_of(settings, args), _token(settings, args.user)) as client:
        try:
            result = await client.generate(_spec(args), on_event=progress_bar)
        except grpc.aio.AioRpcError as err:
            return refused(err)
    return await save_results(result, out_dir)
