"""End to end: `imagegen outpaint`, `imagegen upscale` and the Python client's `outpaint`
/ `upscale` against a served process: the files saved, their sizes, and refusals."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from imagegen.client import ImageGenClient
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e


async def cli(
    server: ServedProcess, *args: str, user: str = "alice"
) -> subprocess.CompletedProcess[str]:
    env = {
        **server.env,
        "IMAGEGEN_ADDR": server.grpc_address,
        "IMAGEGEN_TOKEN": server.token(user),
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "imagegen.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def png_file(path: Path, width: int, height: int) -> Path:
    Image.new("RGB", (width, height), (30, 120, 200)).save(path, format="PNG")
    return path


def saved(out: Path) -> list[Image.Image]:
    images = []
    for path in sorted(out.iterdir()):
        with Image.open(path) as image:
            image.load()
            images.append(image)
    return images


@pytest.fixture
async def served(tmp_path: Path, database_url: str) -> AsyncIterator[ServedProcess]:
    server = await start_server(tmp_path, database_url)
    try:
        yield server
    finally:
        server.terminate()
        await server.wait_exit(30)


async def test_outpaint_and_upscale_from_the_cli(served: ServedProcess, tmp_path: Path) -> None:
    source = png_file(tmp_path / "photo.png", 120, 80)
    out = tmp_path / "outpainted"
    done = await cli(
        served, "outpaint", str(source), "--left", "40", "--bottom", "20", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr, "a progress bar"
    (outpainted,) = saved(out)
    assert outpainted.size == (160, 100)
    uri, line = done.stdout.splitlines()
    assert uri.startswith("http://127.0.0.1:") and line.startswith("saved ")
    image_id = Path(line.split()[1]).stem

    targeted = tmp_path / "targeted"
    done = await cli(
        served, "outpaint", f"images/{image_id}", "--to", "200x100", "--anchor", "left",
        "--format", "webp", "--out", str(targeted),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wider,) = saved(targeted)
    assert wider.size == (200, 100) and wider.format == "WEBP"

    upscaled = tmp_path / "upscaled"
    done = await cli(
        served, "upscale", f"images/{image_id}", "--factor", "4", "--out", str(upscaled)
    )
    assert done.returncode == 0, done.stderr
    (big,) = saved(upscaled)
    assert big.size == (640, 400) and big.format == "PNG"

    from_file = tmp_path / "from-file"
    done = await cli(served, "upscale", str(source), "--out", str(from_file))
    assert done.returncode == 0, done.stderr
    assert saved(from_file)[0].size == (240, 160)

    # Refusals: another user's image, both forms at once, an unreadable file, a bad --to.
    other = await cli(
        served, "upscale", f"images/{image_id}", "--out", str(tmp_path / "x"), user="bob"
    )
    assert other.returncode == 1 and "NOT_FOUND" in other.stderr
    both = await cli(served, "outpaint", str(source), "--left", "8", "--to", "300x300")
    assert both.returncode == 1 and "INVALID_ARGUMENT IMG_003" in both.stderr
    missing = await cli(served, "upscale", str(tmp_path / "nope.png"))
    assert missing.returncode == 1 and "neither images/ID" in missing.stderr
    bad_size = await cli(served, "outpaint", str(source), "--to", "wide")
    assert bad_size.returncode == 1 and "--to must look like" in bad_size.stderr


async def test_outpaint_and_upscale_from_the_python_client(served: ServedProcess) -> None:
    data = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 50, 50)).save(data, format="PNG")
    async with ImageGenClient(served.grpc_address, served.token("alice")) as client:
        events: list[int] = []
        wider = await client.outpaint(
            data.getvalue(),
            prompt="more sky",
            top=16,
            on_event=lambda event: events.append(event.sequence),
        )
        assert wider.state == "completed" and events == sorted(events)
        (image,) = wider.images
        assert (image.width, image.height) == (64, 64)
        anchored = await client.outpaint(
            image.name, prompt="x", size=(128, 64), anchor="right", output_format="jpeg"
        )
        assert (anchored.images[0].width, anchored.images[0].mime_type) == (128, "image/jpeg")
        upscaled = await client.upscale(image.name, factor=2, request_id="client-up")
        assert upscaled.state == "completed" and upscaled.request_id == "client-up"
        assert (upscaled.images[0].width, upscaled.images[0].height) == (128, 128)
        again = await client.upscale(image.name, factor=2, request_id="client-up")
        assert again.generation == upscaled.generation
        with pytest.raises(ValueError, match="anchor 'middle' is not known"):
            await client.outpaint(image.name, prompt="x", size=(99, 99), anchor="middle")
