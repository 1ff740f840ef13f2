"""End to end: the README's `buf curl` commands work, as written, against a served process."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.served import start_server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README_ADDRESS = "127.0.0.1:50051"


def readme_buf_curl_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Calling it with a gRPC command line", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "the section has a sh block"
    joined = block.group(1).replace("\\\n", " ")
    commands = [line.strip() for line in joined.splitlines() if line.strip()]
    assert commands and all(c.startswith("npx --no-install buf curl ") for c in commands)
    return commands


@pytest.mark.skipif(
    not (ROOT / "node_modules" / ".bin" / "buf").exists(),
    reason="buf is not in node_modules (./dev test installs it before running the suite)",
)
async def test_the_readme_buf_curl_commands_work(tmp_path: Path, database_url: str) -> None:
    server = await start_server(tmp_path, database_url)
    try:
        outputs = []
        for command in readme_buf_curl_commands():
            done = await asyncio.to_thread(
                subprocess.run,
                ["bash", "-c", command.replace(README_ADDRESS, server.grpc_address)],
                env={**os.environ, "TOKEN": server.token("alice", plan="pro")},
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, f"{command}\n{done.stderr}"
            outputs.append(done.stdout)
        services, health, generation = outputs
        assert "imagegen.v1.ImageGenerationService" in services.split()
        assert '"status": "SERVING"' in health
        assert "GENERATION_EVENT_TYPE_COMPLETED" in generation
        assert "GENERATION_EVENT_TYPE_IMAGE_READY" in generation
    finally:
        server.terminate()
        await server.wait_exit(60)
