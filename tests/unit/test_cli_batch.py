"""`imagegen batch` without a server: reading JSONL and CSV prompt files (mistakes named by
line or row), the specs built from rows and options, and the progress display on a
terminal (redrawn in place) and elsewhere (plain lines)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
from imagegen.v1 import common_pb2, generation_pb2

from imagegen.cli import _parser
from imagegen.cli_batch import BatchFileError, ProgressBoard, build_specs, read_rows

E = generation_pb2


def options(*extra: str) -> argparse.Namespace:
    return _parser().parse_args(["batch", "prompts.jsonl", *extra])


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_rows_are_objects_or_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "prompts.jsonl",
        '{"prompt": "a heron", "size": "512x512", "count": 2}\n'
        "\n"
        "# a comment\n"
        '"a fox in snow"\n'
        '{"prompt": "a kite", "style": "anime", "seed": 7, "negative_prompt": "rain"}\n',
    )
    rows = read_rows(path)
    assert rows == [
        {"prompt": "a heron", "size": "512x512", "count": "2"},
        {"prompt": "a fox in snow"},
        {"prompt": "a kite", "style": "anime", "seed": "7", "negative_prompt": "rain"},
    ]
    specs = build_specs(rows, options("--size", "256x256", "--style", "watercolor"))
    assert [(s.prompt, s.size.width, s.count) for s in specs] == [
        ("a heron", 512, 2),
        ("a fox in snow", 256, 1),
        ("a kite", 256, 1),
    ]
    assert [s.style for s in specs] == [
        common_pb2.STYLE_WATERCOLOR,
        common_pb2.STYLE_WATERCOLOR,
        common_pb2.STYLE_ANIME,
    ]
    assert specs[2].seed == 7 and specs[2].negative_prompt == "rain"
    assert not specs[0].HasField("seed")
    assert {s.source for s in specs} == {common_pb2.GENERATION_SOURCE_WORKFLOW}


def test_csv_rows_have_a_prompt_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "prompts.csv",
        'prompt,size,format\n"a heron, at dawn",512x512,webp\na fox,,\n,,\n',
    )
    rows = read_rows(path)
    assert rows == [
        {"prompt": "a heron, at dawn", "size": "512x512", "format": "webp"},
        {"prompt": "a fox"},
    ]
    specs = build_specs(rows, options())
    assert [s.format for s in specs] == [common_pb2.IMAGE_FORMAT_WEBP, common_pb2.IMAGE_FORMAT_PNG]
    assert specs[1].size.width == 1024


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "line 2: not JSON"),
        ("p.jsonl", "[1, 2]\n", "line 1: a line is an object or a string"),
        ("p.jsonl", '{"prompt": "ok", "colour": "red"}\n', "line 1: unknown field(s) colour"),
        ("p.jsonl", '{"prompt": "  "}\n', "line 1: the prompt is empty"),
        ("p.jsonl", "\n# nothing\n", "no prompts in it"),
        ("p.csv", "text\nhello\n", "row 1: the header row needs a `prompt` column"),
        ("p.csv", "prompt,size\na,512x512,extra\n", "row 2: more cells than the header"),
        ("p.txt", "a heron\n", "name it .jsonl (JSON Lines) or .csv"),
    ],
)
def test_a_mistake_in_the_file_names_its_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    with pytest.raises(BatchFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rows(write(tmp_path, name, text))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "size": "big"}, "prompt 1: size must look like 1024x1024"),
        ({"prompt": "a", "count": "two"}, "prompt 1: count must be a whole number"),
        ({"prompt": "a", "style": "cubist"}, "prompt 1: unknown style"),
        ({"prompt": "a", "format": "gif"}, "prompt 1: format must be one of"),
    ],
)
def test_a_bad_value_in_a_row_names_its_prompt(row: dict[str, str], message: str) -> None:
    with pytest.raises(BatchFileError, match=message):
        build_specs([row], options())


def progress(percent: int, stage: str) -> E.GenerationEvent:
    return E.GenerationEvent(
        type=E.GENERATION_EVENT_TYPE_PROGRESS,
        progress=E.GenerationProgress(percent=percent, stage=stage),
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_every_change_redraws_all_bars_in_place() -> None:
    out = Terminal()
    board = ProgressBoard.for_jobs(["1/2 a", "2/2 b"], out)
    board.event(1, progress(40, "shaping"))
    board.event(0, E.GenerationEvent(type=E.GENERATION_EVENT_TYPE_COMPLETED))
    frames = out.getvalue().split("\x1b[2F")
    # The first drawing, then one redraw per event, each from the first line again.
    assert len(frames) == 3
    assert frames[0].count("\n") == frames[1].count("\n") == frames[2].count("\n") == 2
    assert "2/2 b [########------------]  40% shaping" in frames[1]
    last = frames[2]
    assert "1/2 a [####################] 100% done" in last
    assert "2/2 b [########------------]  40% shaping" in last


def test_elsewhere_a_job_prints_a_line_when_its_stage_changes() -> None:
    out = io.StringIO()
    board = ProgressBoard.for_jobs(["1/1 a"], out)
    board.event(0, E.GenerationEvent(type=E.GENERATION_EVENT_TYPE_STARTED))
    board.event(0, progress(20, "composing"))
    board.event(0, progress(25, "composing"))
    board.event(0, progress(40, "shaping"))
    board.event(
        0,
        E.GenerationEvent(
            type=E.GENERATION_EVENT_TYPE_FAILED, error=E.GenerationError(code="IMG_002")
        ),
    )
    assert "\x1b" not in out.getvalue()
    assert [line.split("] ")[1] for line in out.getvalue().splitlines()] == [
        "  0% queued",
        "  0% started",
        " 20% composing",
        " 40% shaping",
        " 40% failed IMG_002",
    ]
