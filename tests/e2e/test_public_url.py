"""End to end: the local store's signed URLs start with IMAGEGEN_PUBLIC_URL, the
address callers reach (a container or pod is not reached on its own loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from imagegen.v1 import common_pb2, generation_pb2

from tests.served import start_server

pytestmark = pytest.mark.e2e
E = generation_pb2


async def test_signed_urls_follow_imagegen_public_url(tmp_path: Path, database_url: str) -> None:
    server = await start_server(
        tmp_path,
        database_url,
        # Never fetched: only the URL's text is checked.
        extra_env={"IMAGEGEN_PUBLIC_URL": "http://images.imagegen.test:8443/edge/"},
    )
    try:
        async with server.channel() as channel:
            stub = server.stub(channel)
            request = E.GenerateImageRequest(
                spec=common_pb2.GenerationSpec(
                    prompt="a lighthouse", size=common_pb2.ImageSize(width=256, height=256)
                )
            )
            uris = [
                response.event.image.uri
                async for response in stub.GenerateImage(
                    request, metadata=server.metadata(), timeout=60
                )
                if response.event.type == E.GENERATION_EVENT_TYPE_IMAGE_READY
            ]
        assert len(uris) == 1
        assert uris[0].startswith("http://images.imagegen.test:8443/edge/blobs/"), uris[0]
        assert "IMAGEGEN_PUBLIC_URL is not set" not in server.log_text()
    finally:
        server.kill()
