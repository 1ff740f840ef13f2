"""End to end: `imagegen suggest`, `imagegen enhance` and the Python client's
`suggest_prompts` / `enhance_prompt` against a served process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from imagegen.v1 import common_pb2, generation_pb2

from imagegen.client import EnhancedPrompt, ImageGenClient, PromptSuggestion
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e
E = generation_pb2


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
        timeout=120,
    )


async def test_suggest_and_enhance_from_the_cli_and_the_client(
    tmp_path: Path, database_url: str
) -> None:
    server = await start_server(tmp_path, database_url)
    try:
        async with server.channel() as channel:
            async for _ in server.stub(channel).GenerateImage(
                E.GenerateImageRequest(
                    spec=common_pb2.GenerationSpec(
                        prompt="a lighthouse in a storm",
                        provider="local",
                        size=common_pb2.ImageSize(width=256, height=256),
                    )
                ),
                metadata=server.metadata("alice"),
                timeout=60,
            ):
                pass

        suggested = await cli(server, "suggest", "a lighth", "--limit", "3")
        assert suggested.returncode == 0, suggested.stderr
        lines = suggested.stdout.splitlines()
        assert lines[0] == "history  a lighthouse in a storm" and len(lines) == 3
        styled = await cli(server, "suggest", "", "--style", "anime", "--limit", "1")
        assert styled.stdout.splitlines() == ["phrase   vibrant cel-shaded lighting"]
        refused = await cli(server, "suggest", "x", "--limit", "51")
        assert refused.returncode == 1 and "INVALID_ARGUMENT IMG_003" in refused.stderr

        enhanced = await cli(server, "enhance", "a quiet harbour", "--style", "watercolor")
        assert enhanced.returncode == 0, enhanced.stderr
        prompt, negative = enhanced.stdout.splitlines()
        assert prompt.startswith("a quiet harbour, soft daylight")
        assert negative.startswith("negative: hard edges")
        assert "enhancer: local, 0 credits" in enhanced.stderr

        async with ImageGenClient(server.grpc_address, server.token("alice")) as client:
            found = await client.suggest_prompts("lighthouse", limit=2)
            assert found[0] == PromptSuggestion(
                "a lighthouse in a storm", "history", "", found[0].score
            )
            assert len(found) == 2
            answer = await client.enhance_prompt("a quiet harbour", style="watercolor")
            assert answer == EnhancedPrompt(
                prompt=prompt,
                negative_prompt=negative.removeprefix("negative: "),
                enhancer="local",
                credits=0,
            )
            agent = await client.enhance_prompt(
                "a quiet harbour", style=common_pb2.STYLE_WATERCOLOR, source="agent"
            )
            assert agent == answer
            with pytest.raises(ValueError, match="watercolour"):
                await client.suggest_prompts("x", style="watercolour")
    finally:
        server.terminate()
        await server.wait_exit(60)
