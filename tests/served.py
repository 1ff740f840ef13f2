"""Start the real server as a child process (port 0, ready file) and talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from imagegen.v1 import generation_pb2_grpc

from imagegen.identity import mint_token

TEST_JWT_KEY = "test-signing-key-0123456789abcdef0123456789abcdef"
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)


@dataclass
class ServedProcess:
    """A running `imagegen serve` child process."""

    process: subprocess.Popen[bytes]
    grpc_address: str
    http_address: str
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    #: MCP over Streamable HTTP, when started with IMAGEGEN_MCP_PORT; else empty.
    mcp_address: str = ""

    def token(self, user: str = "alice", plan: str = "free", **kwargs: object) -> str:
        return mint_token(TEST_JWT_KEY, user_id=user, plan=plan, **kwargs)  # type: ignore[arg-type]

    def metadata(self, user: str = "alice") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(user)}"),)

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.grpc_address, options=CHANNEL_OPTIONS)

    def stub(self, channel: grpc.aio.Channel) -> generation_pb2_grpc.ImageGenerationServiceStub:
        return generation_pb2_grpc.ImageGenerationServiceStub(channel)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        code = self.process.poll()
        if code is None:
            raise TimeoutError(f"server still running after {timeout}s")
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self) -> list[dict[str, Any]]:
        """The server's JSON log lines (other output, such as the ready line, left out)."""
        entries = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def log_problems(self) -> list[str]:
        """Lines a clean run never logs: ERROR and above, tracebacks, asyncio's
        "Task was destroyed but it is pending!"."""
        problems = [
            f"{e.get('logger')}: {e.get('message')}"
            for e in self.log_entries()
            if e.get("level") in ("ERROR", "CRITICAL")
        ]
        problems += [
            line
            for line in self.log_text().splitlines()
            if "Task was destroyed" in line or line.startswith("Traceback")
        ]
        return problems


async def start_server(
    tmp_path: Path,
    database_url: str | None,
    *,
    extra_env: Mapping[str, str] | None = None,
    name: str = "server",
    timeout: float = 60,
    data_dir: Path | None = None,
) -> ServedProcess:
    """Start `imagegen serve` on free ports and wait for its ready line. With no
    database_url it runs the embedded PostgreSQL in its data directory (which must be
    one the postgres system user can enter: tests.conftest.postgres_friendly_dir)."""
    data_dir = data_dir or tmp_path / f"{name}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    ready = tmp_path / f"{name}.ready"
    log_path = tmp_path / f"{name}.log"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGEN_", "OTEL_", "BUILT_IN"))
    }
    env.update(
        {
            "IMAGEGEN_DATA_DIR": str(data_dir),
            "IMAGEGEN_GRPC_PORT": "0",
            "IMAGEGEN_HTTP_PORT": "0",
            "IMAGEGEN_READY_FILE": str(ready),
            "IMAGEGEN_JWT_KEY": TEST_JWT_KEY,
            "IMAGEGEN_LOCAL_STEP_DELAY": "0.01",
            # Plan limits out of the way; tests of the limits themselves set their own.
            "IMAGEGEN_PLANS_FILE": str(Path(__file__).parent / "data" / "plans-unlimited.json"),
        }
    )
    env.pop("DATABASE_URL", None)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    env.update(extra_env or {})
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "imagegen.cli", "serve"],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    deadline = time.monotonic() + timeout
    while not ready.exists() or not ready.read_text().strip():
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"server not ready in {timeout}s:\n{log_path.read_text()}")
        await asyncio.sleep(0.05)
    line = ready.read_text().strip()
    parts = dict(p.split("=", 1) for p in line.split()[2:])
    return ServedProcess(
        process=process,
        grpc_address=parts["grpc"],
        http_address=parts["http"],
        data_dir=data_dir,
        log_path=log_path,
        env=env,
        mcp_address=parts.get("mcp", ""),
    )
