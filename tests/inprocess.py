"""Run the real Server in this process (for tests that need to look inside it:
spans, injected database faults)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from imagegen.config import Settings
from imagegen.server import RunningServer, Server
from imagegen.telemetry import Telemetry

TEST_JWT_KEY = "test-signing-key-0123456789abcdef0123456789abcdef"
#: Plan limits out of the way; tests of the limits themselves set their own.
UNLIMITED_PLANS = Path(__file__).parent / "data" / "plans-unlimited.json"


@contextlib.asynccontextmanager
async def serve_in_process(
    tmp_path: Path,
    database_url: str,
    *,
    env: Mapping[str, str] | None = None,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[RunningServer]:
    """Start a Server on free ports; stop it gracefully on exit."""
    settings = Settings.from_env(
        {
            "IMAGEGEN_DATA_DIR": str(tmp_path / "data"),
            "IMAGEGEN_GRPC_PORT": "0",
            "IMAGEGEN_HTTP_PORT": "0",
            "IMAGEGEN_JWT_KEY": TEST_JWT_KEY,
            "IMAGEGEN_LOCAL_STEP_DELAY": "0.01",
            "IMAGEGEN_SHUTDOWN_GRACE": "5",
            "IMAGEGEN_PLANS_FILE": str(UNLIMITED_PLANS),
            "DATABASE_URL": database_url,
            **(env or {}),
        }
    )
    server = Server(settings, telemetry=telemetry)
    task = asyncio.create_task(server.run(install_signal_handlers=False))
    started = asyncio.create_task(server.wait_started())
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises the startup error
    try:
        yield started.result()
    finally:
        server.request_stop()
        await asyncio.wait_for(task, timeout=30)
