"""Outpainting on OpenAI Images, against a local server speaking its wire format: the
padded canvas (transparent padding, the source at its offset) and its mask as the
edits endpoint RECEIVED them, at a size gpt-image takes; and no upscaling."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import httpx
import pytest
from PIL import Image, ImageChops, ImageStat

from imagegen.domain.enlarge import outpaint_geometry
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import OutpaintAnchor, OutpaintSpec, Size, Style, UpscaleSpec
from imagegen.imaging.fit import cover_crop
from imagegen.providers.base import PENDING_OUTPAINT, ProviderRequest, SourceImage
from imagegen.providers.openai import OpenAIProvider
from tests.fakes.openai_server import OpenAIFake

LIMIT = 4096 * 4096


@pytest.fixture
async def fake_and_client() -> AsyncIterator[tuple[OpenAIFake, httpx.AsyncClient]]:
    async with OpenAIFake.start() as fake, httpx.AsyncClient(trust_env=False) as http:
        yield fake, http


async def quiet(percent: int, stage: str, preview: bytes | None) -> None:
    return None


def gradient(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(x * 5 % 256, y * 3 % 256, (x * y) % 256) for y in range(height) for x in range(width)]
    )
    return image


def source_of(image: Image.Image) -> SourceImage:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return SourceImage(out.getvalue(), "image/png", image.width, image.height)


def opened(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image


async def test_a_small_outpaint_sends_the_canvas_padded_to_a_native_shape_as_is(
    fake_and_client: tuple[OpenAIFake, httpx.AsyncClient],
) -> None:
    fake, http = fake_and_client
    source = gradient(96, 80)
    # 192x208 is nearly square: gpt-image is asked for 1024x1024, and the canvas is
    # widened to 208x208 (8 more columns of new area on each side).
    geometry = outpaint_geometry(
        Size(96, 80), OutpaintSpec(left=64, right=32, bottom=128), max_pixels=LIMIT
    )
    assert geometry.canvas == Size(192, 208)
    provider = OpenAIProvider(fake.url, "sk", http)
    request = ProviderRequest(
        prompt="the rest of the harbour",
        negative_prompt="boats",
        style=Style.CINEMATIC,
        sources=(source_of(source),),
        outpaint=geometry,
    )
    provider.check(request)
    reply = await provider.generate(request, quiet)
    (call,) = fake.calls
    assert call.is_edit and call.size == "1024x1024" and call.model == "gpt-image-1"
    assert call.prompt.startswith("the rest of the harbour, cinematic") and "boats" in call.prompt
    (image_bytes,) = call.images
    canvas = opened(image_bytes)
    assert canvas.mode == "RGBA" and canvas.size == (208, 208)
    box = (72, 0, 72 + 96, 80)
    # The source, opaque and pixel for pixel, at its offset on the widened canvas.
    assert ImageChops.difference(canvas.crop(box).convert("RGB"), source).getbbox() is None
    alpha = canvas.getchannel("A")
    assert alpha.crop(box).getextrema() == (255, 255)
    assert alpha.histogram()[0] == 208 * 208 - 96 * 80, "every other pixel transparent"
    # The mask: the same size, transparent exactly where the canvas is.
    assert call.mask is not None
    mask = opened(call.mask)
    assert mask.format == "PNG" and mask.size == canvas.size
    assert mask.getchannel("A").tobytes() == alpha.tobytes()
    assert opened(reply.data).size == (1024, 1024), "the pipeline fits it to the canvas"


async def test_a_large_outpaint_is_scaled_down_to_the_native_size_with_a_small_mask(
    fake_and_client: tuple[OpenAIFake, httpx.AsyncClient],
) -> None:
    fake, http = fake_and_client
    noise = Image.effect_noise((1024, 1024), 90).convert("RGB")
    geometry = outpaint_geometry(
        Size(1024, 1024),
        OutpaintSpec(target=Size(2048, 1024), anchor=OutpaintAnchor.LEFT),
        max_pixels=LIMIT,
    )
    await OpenAIProvider(fake.url, "sk", http).generate(
        ProviderRequest(prompt="wider", sources=(source_of(noise),), outpaint=geometry), quiet
    )
    (call,) = fake.calls
    assert call.size == "1536x1024"
    canvas = opened(call.images[0])
    assert canvas.size == (1536, 1024)
    # Widened to 2048x1366 (171 rows above), then scaled by 3/4: the source is 768x768
    # at (0, 128).
    box = (0, 128, 768, 896)
    alpha = canvas.getchannel("A")
    assert alpha.crop(box).getextrema() == (255, 255)
    assert alpha.histogram()[255] == 768 * 768
    sent = canvas.crop(box).convert("RGB")
    expected = noise.resize((768, 768), Image.Resampling.LANCZOS)
    assert max(ImageStat.Stat(ImageChops.difference(sent, expected)).mean) < 2
    assert call.mask is not None and len(call.mask) < 64 * 1024, "a mask far under 4 MB"
    assert opened(call.mask).getchannel("A").tobytes() == alpha.tobytes()


@pytest.mark.parametrize(
    ("source", "spec"),
    [
        (Size(96, 80), OutpaintSpec(left=64, right=32, bottom=128)),
        (Size(1024, 1024), OutpaintSpec(target=Size(2048, 1024), anchor=OutpaintAnchor.LEFT)),
        (Size(1000, 700), OutpaintSpec(top=333, right=17)),
        (Size(300, 1200), OutpaintSpec(target=Size(700, 1300), anchor=OutpaintAnchor.BOTTOM)),
        (Size(4000, 50), OutpaintSpec(top=7, bottom=3)),
    ],
)
async def test_the_pipelines_fit_brings_the_source_back_where_the_geometry_puts_it(
    fake_and_client: tuple[OpenAIFake, httpx.AsyncClient], source: Size, spec: OutpaintSpec
) -> None:
    """The reply comes at the native size; the pipeline's one fit rule (cover, then crop
    around the centre) must map the sent source box onto the geometry's box."""
    fake, http = fake_and_client
    geometry = outpaint_geometry(source, spec, max_pixels=LIMIT)
    image = Image.new("RGB", (source.width, source.height), (200, 100, 50))
    await OpenAIProvider(fake.url, "sk", http).generate(
        ProviderRequest(prompt="more", sources=(source_of(image),), outpaint=geometry), quiet
    )
    native = Size(*map(int, fake.calls[0].size.split("x")))
    sent = opened(fake.calls[0].images[0])
    left, top, right, bottom = sent.getchannel("A").getbbox() or (0, 0, 0, 0)
    # The reply is `native`; as if it kept the sent layout, scaled to it.
    ratio = native.width / sent.width
    fit = cover_crop(native.width, native.height, geometry.canvas.width, geometry.canvas.height)
    scale = fit.scaled_width / native.width
    landed = [
        round(left * ratio * scale) - fit.left,
        round(top * ratio * scale) - fit.top,
        round(right * ratio * scale) - fit.left,
        round(bottom * ratio * scale) - fit.top,
    ]
    for got, want in zip(landed, geometry.box, strict=True):
        assert abs(got - want) <= 2, (landed, geometry.box)


async def test_openai_outpaints_but_cannot_upscale(
    fake_and_client: tuple[OpenAIFake, httpx.AsyncClient],
) -> None:
    fake, http = fake_and_client
    provider = OpenAIProvider(fake.url, "sk", http)
    assert provider.capabilities.outpaint and not provider.capabilities.upscale
    assert provider.upscalers == ()
    placeholder = SourceImage(b"", "", 0, 0)
    provider.check(ProviderRequest(prompt="x", sources=(placeholder,), outpaint=PENDING_OUTPAINT))
    with pytest.raises(InvalidRequest) as caught:
        provider.check(ProviderRequest(prompt="x", sources=(placeholder,), upscale=UpscaleSpec(2)))
    assert caught.value.metadata["capability"] == "upscale"
    assert fake.calls == []
