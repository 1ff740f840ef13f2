"""End to end: `imagegen batch FILE` against a served process, through the Python client's
`batch_generate`: one job per row, a progress line per job (plain lines when not on a
terminal), every job's images saved, and the same request id again making no more jobs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e


async def cli(server: ServedProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **server.env,
        "IMAGEGEN_ADDR": server.grpc_address,
        "IMAGEGEN_TOKEN": server.token("alice"),
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "imagegen.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


async def test_batch_from_a_jsonl_file_saves_every_jobs_images(
    tmp_path: Path, database_url: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a heron at dawn"}\n'
        '"a red fox in snow"\n'
        '{"prompt": "a paper kite", "size": "512x512", "count": 2, "format": "webp"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "images"
    server = await start_server(tmp_path, database_url)
    try:
        args = ("batch", str(prompts), "--size", "256x256", "--out", str(out))
        first = await cli(server, *args, "--request-id", "cli-batch-1")
        assert first.returncode == 0, first.stderr
        batch_line, *saved = first.stdout.splitlines()
        assert batch_line.startswith("batch batches/")
        assert len(saved) == 4 and all(line.startswith("saved ") for line in saved)
        # Not a terminal: plain lines, one per stage change, each job to its end.
        assert "\x1b" not in first.stderr
        for number in (1, 2, 3):
            assert f"{number}/3 " in first.stderr
        assert first.stderr.count("100% done") == 3

        files = sorted(out.iterdir())
        assert [f.name[:4] for f in files] == ["001-", "002-", "003-", "003-"]
        with Image.open(files[0]) as image:
            assert image.size == (256, 256) and image.format == "PNG"
        with Image.open(files[3]) as image:
            assert image.size == (512, 512) and image.format == "WEBP"

        again = await cli(server, *args, "--request-id", "cli-batch-1")
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines()[0] == batch_line
        assert sorted(out.iterdir()) == files

        bad = tmp_path / "bad.csv"
        bad.write_text("prompt,size\na heron,huge\n", encoding="utf-8")
        refused = await cli(server, "batch", str(bad), "--out", str(out))
        assert refused.returncode == 2
        assert "prompt 1: size must look like 1024x1024" in refused.stderr
    finally:
        server.terminate()
        await server.wait_exit(60)

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM generations") == 3
    finally:
        await conn.close()
