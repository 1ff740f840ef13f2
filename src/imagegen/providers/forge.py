"""`forge`: the platform's Forge ImageService, JSON over HTTP (Connect's unary protocol).

POST {BUILT_IN_FORGE_API_URL}/images.v1.ImageService/GenerateImage
Authorization: Bearer {BUILT_IN_FORGE_API_KEY}
{"prompt": "...", "original_images": [{"b64Json": "...", "mimeType": "image/png"}]}
-> {"image": {"b64Json": "...", "mimeType": "image/png"}}
failures: HTTP status + {"code": "invalid_argument", "message": "...", "details": [...]}

The request body is only `prompt` and `original_images`: the API has no field for the
size, model, seed, style or negative prompt. So the style preset and the negative
prompt are folded into the prompt (providers/prompting.py); the reply, whatever its
size, is fitted to the asked size by the pipeline's one fit rule; the seed is not used
(capabilities.seed is false) and the one model is `forge-image`.

A content-policy refusal (IMG_010) is recognised in a Connect error by a
google.rpc.ErrorInfo detail whose reason names a policy, safety or moderation block, or
by a message that does; any other 4xx is the request's own failure.
"""

from __future__ import annotations

import asyncio
import binascii
import re
from typing import Any

import httpx
import pybase64
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2

from imagegen.domain.errors import ProviderNotConfigured
from imagegen.domain.models import STANDARD_SIZES, ImageFormat
from imagegen.providers.base import (
    ProgressCallback,
    ProviderCapabilities,
    ProviderImage,
    ProviderRequest,
    ProviderUnavailable,
    check_enlargement,
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
    #: GenerateImage takes a prompt and images only: no mask and no size, so neither an
    #: outpaint nor an upscale can be asked of it
    upscalers: tuple[str, ...] = ()
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
        """Everything the contract allows but outpainting and upscaling can be sent to
        Forge (edits take free text); its one model is the only name accepted."""
        check_model(self.id, self.models, request.model)
        check_enlargement(self.id, self.capabilities, self.upscalers, request)

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
        if reply.status_code >= 400:
            code, message, refused = _connect_error(reply)
            raise_for_status(
                reply,
                provider=self.id,
                key_setting="BUILT_IN_FORGE_API_KEY",
                detail=message,
                provider_code=code,
                content_policy=refused,
            )
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


_REFUSAL = re.compile(r"content[ _-]?policy|safety|moderat", re.IGNORECASE)


def _connect_error(reply: httpx.Response) -> tuple[str, str, bool]:
    """A Connect error's code, message, and whether it is a content-policy refusal."""
    try:
        error = reply.json()
    except ValueError:
        return "", "", False
    if not isinstance(error, dict):
        return "", "", False
    code = str(error.get("code") or "")
    message = str(error.get("message") or "")
    reasons: list[str] = []
    for detail in error.get("details") or ():
        if not isinstance(detail, dict) or detail.get("type") != "google.rpc.ErrorInfo":
            continue
        info = error_details_pb2.ErrorInfo()
        try:
            value = str(detail.get("value") or "")
            info.ParseFromString(pybase64.b64decode(value + "=" * (-len(value) % 4)))
        except (binascii.Error, ValueError, DecodeError):
            continue
        reasons.append(info.reason)
    refused = any(_REFUSAL.search(reason) for reason in reasons) or (
        code in _REFUSAL_CODES and bool(_REFUSAL.search(message))
    )
    return code, message, refused


#: Connect codes a refusal of content comes with (never unavailable or internal).
_REFUSAL_CODES = {"invalid_argument", "permission_denied", "failed_precondition"}
