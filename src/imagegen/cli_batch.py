"""`imagegen batch FILE`: many prompts in one BatchGenerate call, one progress bar per job,
every job's images saved to a folder.

FILE is JSON Lines (one object per line, `{"prompt": ...}`, or a bare JSON string) or CSV
with a header row (a `prompt` column); its extension says which (`.jsonl`/`.ndjson`,
`.csv`). Besides `prompt`, a row may set `negative_prompt`, `style`, `size`
(`WIDTHxHEIGHT`), `count`, `format`, `seed` and `provider`; what a row leaves out comes
from the command's options. Blank lines (and JSON lines starting with `#`) are skipped.

On a terminal the bars are redrawn in place; otherwise (a pipe, a log, or more jobs than
the terminal has lines) each job prints a plain line when it starts, reaches a new stage
and ends.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import shutil
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import httpx

from imagegen.cli_generate import (
    _EXTENSIONS,
    _FORMATS,
    _STYLES,
    _token,
    address_of,
    prepare_out_dir,
)
from imagegen.client import GenerationResult, ImageGenClient
from imagegen.config import Settings
from imagegen.domain.models import Style
from imagegen.v1 import common_pb2, generation_pb2

BAR_WIDTH = 20
#: Seconds one job is followed at most: a queued job of a large batch may wait long for
#: the plan's concurrency to reach it.
WATCH_TIMEOUT = 24 * 3600.0
#: Columns a row may set; anything else is a mistake worth telling about.
ROW_FIELDS = frozenset(
    {"prompt", "negative_prompt", "style", "size", "count", "format", "seed", "provider"}
)
#: How a bar shows a job that has not sent progress yet, and one that ended.
_ENDED = {
    generation_pb2.GENERATION_EVENT_TYPE_COMPLETED: "done",
    generation_pb2.GENERATION_EVENT_TYPE_FAILED: "failed",
    generation_pb2.GENERATION_EVENT_TYPE_CANCELLED: "cancelled",
}


class BatchFileError(ValueError):
    """The prompts file cannot be read as a batch; the message names the line or row."""


def add_parser(sub: Any) -> None:
    """The `batch` command."""
    batch = sub.add_parser(
        "batch",
        help="generate images for every prompt of a JSONL or CSV file, one job each, "
        "with a progress bar per job",
    )
    batch.add_argument("file", help="JSON Lines (.jsonl) or CSV (.csv, with a header row)")
    batch.add_argument("--style", choices=sorted(style.value for style in Style))
    batch.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, e.g. 512x512")
    batch.add_argument("--format", default="png", choices=tuple(_FORMATS))
    batch.add_argument("--negative", default="", help="negative prompt")
    batch.add_argument("--count", type=int, default=1, help="images per prompt")
    batch.add_argument("--provider", default="")
    batch.add_argument("--out", default=".", help="directory to save the images in")
    batch.add_argument(
        "--request-id",
        default="",
        help="idempotency key of the batch (default: a new one); the same id and file "
        "again returns the same jobs instead of making more",
    )
    batch.add_argument(
        "--callback-uri", default="", help="https URL told once every job has ended"
    )
    batch.add_argument(
        "--streams",
        type=int,
        default=8,
        help="jobs followed at once (the rest, queued, are followed as those end)",
    )
    batch.add_argument("--addr", default=None, help="server address (IMAGEGEN_ADDR)")
    batch.add_argument("--user", default="cli", help="user for a minted token when none is given")


# --- the file -----------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a prompts file, each a mapping of column to text, in file order;
    BatchFileError naming the line or row of a mistake, or for a file without prompts."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise BatchFileError(f"{path.name}: name it .jsonl (JSON Lines) or .csv")
    text = path.read_text(encoding="utf-8-sig")
    rows = _csv_rows(text) if suffix == ".csv" else _json_rows(text)
    if not rows:
        raise BatchFileError(f"{path.name}: no prompts in it")
    return rows


def _json_rows(text: str) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise BatchFileError(f"line {number}: not JSON ({exc.msg})") from None
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise BatchFileError(f"line {number}: a line is an object or a string")
        rows.append(_row(value, f"line {number}"))
    return rows


def _csv_rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise BatchFileError("row 1: the header row needs a `prompt` column")
    rows = []
    for row in reader:
        # Row numbers as a spreadsheet shows them: the header is row 1.
        where = f"row {reader.line_num}"
        if None in row:
            raise BatchFileError(f"{where}: more cells than the header has columns")
        if not any((cell or "").strip() for cell in row.values()):
            continue
        rows.append(_row({k: v for k, v in row.items() if v not in (None, "")}, where))
    return rows


def _row(value: Mapping[str, object], where: str) -> dict[str, str]:
    unknown = sorted(set(value) - ROW_FIELDS)
    if unknown:
        raise BatchFileError(
            f"{where}: unknown field(s) {', '.join(unknown)}; use {', '.join(sorted(ROW_FIELDS))}"
        )
    row = {key: "" if item is None else str(item) for key, item in value.items()}
    if not row.get("prompt", "").strip():
        raise BatchFileError(f"{where}: the prompt is empty")
    return row


def _size(text: str, where: str) -> common_pb2.ImageSize:
    try:
        width_text, height_text = text.lower().split("x")
        return common_pb2.ImageSize(width=int(width_text), height=int(height_text))
    except ValueError:
        raise BatchFileError(f"{where}: size must look like 1024x1024, not {text!r}") from None


def _integer(text: str, name: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BatchFileError(f"{where}: {name} must be a whole number, not {text!r}") from None


def build_specs(
    rows: list[dict[str, str]], defaults: argparse.Namespace
) -> list[common_pb2.GenerationSpec]:
    """One spec per row: the row's own fields, else the command's options."""
    specs = []
    for index, row in enumerate(rows):
        where = f"prompt {index + 1}"
        style = row.get("style", defaults.style or "")
        if style and style.lower() not in _STYLES:
            raise BatchFileError(f"{where}: unknown style {style!r}")
        output_format = row.get("format", defaults.format).lower()
        if output_format not in _FORMATS:
            raise BatchFileError(f"{where}: format must be one of {', '.join(_FORMATS)}")
        spec = common_pb2.GenerationSpec(
            prompt=row["prompt"],
            negative_prompt=row.get("negative_prompt", defaults.negative),
            style=_STYLES[style.lower()] if style else common_pb2.STYLE_UNSPECIFIED,
            size=_size(row.get("size", defaults.size), where),
            count=_integer(row["count"], "count", where) if "count" in row else defaults.count,
            format=_FORMATS[output_format],
            provider=row.get("provider", defaults.provider),
            source=common_pb2.GENERATION_SOURCE_WORKFLOW,
        )
        if "seed" in row:
            spec.seed = _integer(row["seed"], "seed", where)
        specs.append(spec)
    return specs


# --- the display --------------------------------------------------------------------------


@dataclass
class _Line:
    label: str
    percent: int = 0
    stage: str = "queued"
    ended: bool = False


@dataclass
class ProgressBoard:
    """One progress line per job. On a terminal every change redraws all lines in place
    (the cursor moves back up over them); elsewhere a job prints a plain line when its
    stage changes."""

    out: TextIO
    interactive: bool
    lines: list[_Line] = field(default_factory=list)
    _drawn: int = 0

    @classmethod
    def for_jobs(cls, labels: list[str], out: TextIO) -> ProgressBoard:
        """A board for these jobs, drawn at once: in place on a terminal tall enough to
        hold every line (the cursor cannot move back above the screen's top), else as
        plain lines."""
        isatty = getattr(out, "isatty", None)
        fits = len(labels) < shutil.get_terminal_size().lines
        board = cls(out=out, interactive=bool(isatty and isatty()) and fits)
        board.lines = [_Line(label) for label in labels]
        board.draw()
        return board

    def event(self, index: int, event: generation_pb2.GenerationEvent) -> None:
        """Show a job's event."""
        line = self.lines[index]
        before = line.stage
        if event.type == generation_pb2.GENERATION_EVENT_TYPE_STARTED:
            line.stage = "started"
        elif event.type == generation_pb2.GENERATION_EVENT_TYPE_PROGRESS:
            line.percent = max(line.percent, event.progress.percent)
            line.stage = event.progress.stage or line.stage
        elif event.type in _ENDED:
            line.ended = True
            line.stage = _ENDED[event.type]
            if event.type == generation_pb2.GENERATION_EVENT_TYPE_COMPLETED:
                line.percent = 100
            elif event.error.code:
                line.stage = f"failed {event.error.code}"
        else:
            return
        if self.interactive:
            self.draw()
        elif line.stage != before:
            self.out.write(self._render(line) + "\n")
            self.out.flush()

    def draw(self) -> None:
        """Redraw every line (on a terminal); elsewhere print each line once."""
        if not self.interactive:
            if not self._drawn:
                for line in self.lines:
                    self.out.write(self._render(line) + "\n")
                self._drawn = len(self.lines)
                self.out.flush()
            return
        # Back to the first line, then every line rewritten (\x1b[2K clears one).
        text = f"\x1b[{self._drawn}F" if self._drawn else ""
        text += "".join(f"\x1b[2K{self._render(line)}\n" for line in self.lines)
        self._drawn = len(self.lines)
        self.out.write(text)
        self.out.flush()

    @staticmethod
    def _render(line: _Line) -> str:
        filled = BAR_WIDTH * line.percent // 100
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return f"{line.label} [{bar}] {line.percent:3d}% {line.stage}"


# --- the run ------------------------------------------------------------------------------


def _labels(specs: list[common_pb2.GenerationSpec]) -> list[str]:
    width = len(str(len(specs)))
    labels = []
    for number, spec in enumerate(specs, start=1):
        prompt = " ".join(spec.prompt.split())
        shown = prompt if len(prompt) <= 28 else prompt[:25] + "..."
        labels.append(f"{number:>{width}}/{len(specs)} {shown:<28}")
    return labels


def _refusal(err: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    reason = ""
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return f"imagegen: {err.code().name} {reason}: {err.details()}".replace("  ", " ")


async def run_batch(settings: Settings, args: argparse.Namespace) -> int:
    """Run `imagegen batch`; returns the exit code (0 when every job completed)."""
    try:
        rows = await asyncio.to_thread(read_rows, Path(args.file))
        specs = build_specs(rows, args)
    except (BatchFileError, OSError, UnicodeDecodeError) as exc:
        print(f"imagegen: {exc}", file=sys.stderr)
        return 2
    if args.streams < 1:
        print("imagegen: --streams must be at least 1", file=sys.stderr)
        return 2
    address = address_of(settings, args)
    token = _token(settings, args.user)
    out_dir = await asyncio.to_thread(prepare_out_dir, args.out)
    async with ImageGenClient(address, token) as client:
        try:
            reply = await client.batch_generate(
                specs,
                request_id=args.request_id or uuid.uuid4().hex,
                callback_uri=args.callback_uri,
            )
        except grpc.aio.AioRpcError as err:
            print(_refusal(err), file=sys.stderr)
            return 1
    print(f"batch {reply.batch}", flush=True)
    board = ProgressBoard.for_jobs(_labels(specs), sys.stderr)
    jobs = [job.name for job in reply.generations]
    try:
        results = await _follow(address, token, jobs, board, streams=args.streams)
    except grpc.aio.AioRpcError as err:
        print(_refusal(err), file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"imagegen: {exc}", file=sys.stderr)
        return 1
    failed = 0
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        for number, result in enumerate(results, start=1):
            if result.state != "completed":
                failed += 1
                print(
                    f"imagegen: {number}/{len(results)} {result.generation} {result.state}: "
                    f"{result.error_code} {result.error_message}".rstrip(),
                    file=sys.stderr,
                )
                continue
            for image in result.images:
                reply_image = await http.get(image.uri)
                reply_image.raise_for_status()
                image_id = image.name.removeprefix("images/")
                extension = _EXTENSIONS.get(image.mime_type, "bin")
                path = out_dir / f"{number:03d}-{image_id}.{extension}"
                await asyncio.to_thread(path.write_bytes, reply_image.content)
                print(f"saved {path} ({image.width}x{image.height}, {image.size_bytes} bytes)")
    return 1 if failed else 0


async def _follow(
    address: str, token: str, jobs: list[str], board: ProgressBoard, *, streams: int
) -> list[GenerationResult]:
    """Watch every job to its end, at most `streams` at once, in batch order (the order
    the service starts them in); each watch on a client of its own, so one that moves to
    another replica does not disturb the others."""
    slots = asyncio.Semaphore(streams)

    async def follow(index: int, name: str) -> GenerationResult:
        async with slots, ImageGenClient(address, token, timeout=WATCH_TIMEOUT) as watcher:
            return await watcher.wait(name, on_event=lambda e: board.event(index, e))

    tasks = [asyncio.create_task(follow(i, name)) for i, name in enumerate(jobs)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        # One watch refused (or this run interrupted): the others stop too.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
