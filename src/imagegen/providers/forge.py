"""`forge`: the platform's Forge ImageService, JSON over HTTP.

POST {BUILT_IN_FORGE_API_URL}/images.v1.ImageService/GenerateImage
Authorization: Bearer {BUILT_IN_FORGE_API_KEY}
{"prompt": "...", "original_images": [{"b64Json": "...", "mimeType": "image/png"}]}
-> {"image": {"b64Json": "...", "mimeType": "image/png"}}
"""

from __future__ import annotations

import asyncio
import binascii
from typing import Any

import httpx
import pybase64

from imagegen.domain.errors import ProviderNotConfigured
from imagegen.domain.models import STANDARD_SIZES, ImageFormat
from imagegen.providers.base import (
    ProgressCallback,
    ProviderCapabilities,
    ProviderImage,
    ProviderRequest,
    ProviderUnavailable,
    check_model,
)
from imagegen.providers.http_failures import raise_for_status, transport_errors
from imagegen.providers.prompting import fold_prompt

GENERATE_PATH = "/images.v1.ImageService/GenerateImage"
MODEL = "forge-image"


class ForgeProvider:
    """The Forge ImageService behind the Provider protocol."""

    id = "forge"
    display_name = "Forge ImageService"
    models = (MODEL,)
    capabilities = ProviderCapabilities(
        edit=True,
        mask=False,
        negative_prompt=False,
        seed=False,
        style=False,
        previews=False,
        sizes=STANDARD_SIZES,
        formats=tuple(ImageFormat),
        max_count=4,
    )

    def __init__(
        self, base_url: str | None, api_key: str | None, client: httpx.AsyncClient
    ) -> None:
        self._base_url = (base_url or "").rstrip("/")
        self._api_key = api_key or ""
        self._client = client

    @property
    def configured(self) -> bool:
        return bool(self._base_url and self._api_key)

    def check(self, request: ProviderRequest) -> None:
        """Everything the contract allows can be sent to Forge (edits take free text); its
        one model is the only name accepted."""
        check_model(self.id, self.models, request.model)

    async def generate(self, request: ProviderRequest, progress: ProgressCallback) -> ProviderImage:
        """One call to GenerateImage. IMG_001 before any request when unconfigured."""
        if not self.configured:
            raise ProviderNotConfigured(
                "the forge provider has no credentials: set BUILT_IN_FORGE_API_URL and "
                "BUILT_IN_FORGE_API_KEY, or choose another provider"
            )
        body: dict[str, Any] = {
            "prompt": fold_prompt(request.prompt, request.negative_prompt, request.style)
        }
        if request.sources:
            body["original_images"] = [
                {"b64Json": pybase64.b64encode(s.data).decode("ascii"), "mimeType": s.mime_type}
                for s in request.sources
            ]
        await progress(0, "requesting", None)
        with transport_errors(provider=self.id, timeout=request.timeout):
            async with asyncio.timeout(request.timeout):
                reply = await self._client.post(
                    self._base_url + GENERATE_PATH,
                    json=body,
                    headers={"Authorization": f"Bearer {self._api_key}"},
                    timeout=httpx.Timeout(request.timeout, connect=min(request.timeout, 10.0)),
                )
        raise_for_status(reply, provider=self.id, key_setting="BUILT_IN_FORGE_API_KEY")
        image = _decode(reply)
        await progress(90, "received", None)
        return image


def _decode(reply: httpx.Response) -> ProviderImage:
    try:
        payload = reply.json()
        image = payload["image"]
        encoded = image["b64Json"]
        mime_type = str(image.get("mimeType", ""))
        data = pybase64.b64decode(str(encoded), validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ProviderUnavailable(
            f"the forge provider answered something that is not a base64 image ({exc})"
        ) from exc
    if not data:
        raise ProviderUnavailable("the forge provider answered an empty image")
    return ProviderImage(data=data, mime_type=mime_type, model=MODEL)
