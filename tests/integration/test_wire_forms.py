"""What each provider was asked, as its fake received it, for requests through a served
process (issue 9): size, model, seed, style and mask in the provider's own wire form
where its API has one; the style (and a negative prompt the API lacks) folded into the
prompt by providers/prompting.py's template where it has none; and what the API cannot
take (forge: a mask, a seed; openai: a seed) or a model it does not offer refused at
submit with IMG_003 naming the field, before any call. The size each provider is asked
for at every offered size is in test_size_matrix.py.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator

import grpc
import pybase64
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2
from PIL import Image

from tests.integration.all_providers import Served, serve_with_fakes
from tests.integration.callers import Stubs, completed

E = generation_pb2
C = common_pb2


@pytest.fixture(scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str
) -> AsyncIterator[Served]:
    async with serve_with_fakes(tmp_path_factory.mktemp("wire"), module_database_url) as made:
        yield made


def caller(served: Served) -> Stubs:
    return Stubs(served.channel, f"wire-{uuid.uuid4().hex[:12]}")


def encoded(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


#: An edit's source, and the contract's mask for it: its left half transparent (change
#: it), its right half opaque (keep it).
SOURCE = encoded(Image.new("RGB", (64, 48), (30, 90, 200)))
MASK_IMAGE = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
MASK_IMAGE.paste((0, 0, 0, 0), (0, 0, 32, 48))
MASK = encoded(MASK_IMAGE)


async def job_of(stubs: Stubs, spec: C.GenerationSpec) -> E.Generation:
    return await stubs.get(completed(await stubs.generate(spec)))


async def refused(stubs: Stubs, spec: C.GenerationSpec) -> tuple[str, str, str]:
    """Submit `spec`, which must be refused: (reason, the field named, the message)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.gen.SubmitGeneration(E.SubmitGenerationRequest(spec=spec), metadata=stubs.md)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    status = rpc_status.from_call(err)
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    assert len(fields) == 1, fields
    return reason, fields[0], err.details() or ""


async def test_local_makes_what_it_was_asked_and_says_so(served: Served) -> None:
    stubs = caller(served)
    job = await job_of(
        stubs,
        C.GenerationSpec(
            prompt="a harbour at dawn",
            negative_prompt="people",
            style=C.STYLE_CARTOON,
            provider="local",
            model="local-pillow-1",
            seed=4242,
            count=2,
            size=C.ImageSize(width=512, height=512),
        ),
    )
    assert [(i.model, i.seed, i.style, i.negative_prompt) for i in job.images] == [
        ("local-pillow-1", 4242, C.STYLE_CARTOON, "people"),
        ("local-pillow-1", 4243, C.STYLE_CARTOON, "people"),
    ], "one call per image, seed + index"
    reason, field, message = await refused(
        stubs, C.GenerationSpec(prompt="a fox", provider="local", model="gpt-image-1")
    )
    assert (reason, field) == ("IMG_003", "model") and "local-pillow-1" in message


async def test_forge_gets_the_folded_prompt_and_the_sources_and_nothing_it_has_no_field_for(
    served: Served,
) -> None:
    stubs = caller(served)
    before = len(served.forge.requests)
    generation = await job_of(
        stubs,
        C.GenerationSpec(
            prompt="a harbour at dawn",
            negative_prompt="people",
            style=C.STYLE_VINTAGE,
            provider="forge",
            model="forge-image",
            size=C.ImageSize(width=1536, height=1024),
            format=C.IMAGE_FORMAT_WEBP,
        ),
    )
    edit = await job_of(
        stubs,
        C.GenerationSpec(
            prompt="add a lighthouse",
            style=C.STYLE_ABSTRACT,
            provider="forge",
            size=C.ImageSize(width=256, height=256),
            sources=[C.ImageSource(data=SOURCE)],
        ),
    )
    made, edited = served.forge.requests[before:]
    assert made.headers["Authorization"] == "Bearer k"
    # GenerateImage has a prompt and images only: no size, model, seed or style field.
    assert made.json == {
        "prompt": "a harbour at dawn, vintage photo style, faded warm film tones, grain. "
        "Avoid: people"
    }
    assert edited.json == {
        "prompt": "add a lighthouse, abstract art, bold shapes, color and texture over subject",
        "original_images": [
            {"b64Json": pybase64.b64encode(SOURCE).decode(), "mimeType": "image/png"}
        ],
    }
    (image,) = generation.images
    assert (image.model, image.style, image.negative_prompt) == (
        "forge-image",
        C.STYLE_VINTAGE,
        "people",
    )
    assert not image.HasField("seed"), "forge neither takes nor reports a seed"
    assert not edit.images[0].HasField("seed")

    for spec, expected_field, named in (
        (
            C.GenerationSpec(prompt="a fox", provider="forge", model="forge-2"),
            "model",
            "forge-image",
        ),
        (C.GenerationSpec(prompt="a fox", provider="forge", seed=7), "seed", "seed"),
        (
            C.GenerationSpec(
                prompt="a hat",
                provider="forge",
                sources=[C.ImageSource(data=SOURCE)],
                mask=C.ImageSource(data=MASK),
            ),
            "mask",
            "mask",
        ),
    ):
        reason, field, message = await refused(stubs, spec)
        assert (reason, field) == ("IMG_003", expected_field) and named in message
    assert len(served.forge.requests) == before + 2, "nothing refused reached forge"


async def test_openai_gets_model_native_size_format_the_folded_prompt_and_the_mask(
    served: Served,
) -> None:
    stubs = caller(served)
    before = len(served.openai.calls)
    generation = await job_of(
        stubs,
        C.GenerationSpec(
            prompt="a harbour at dawn",
            negative_prompt="people",
            style=C.STYLE_MINIMALIST,
            provider="openai",
            model="gpt-image-1-mini",
            size=C.ImageSize(width=1024, height=1536),
            format=C.IMAGE_FORMAT_JPEG,
        ),
    )
    edit = await job_of(
        stubs,
        C.GenerationSpec(
            prompt="add a hat",
            provider="openai",
            size=C.ImageSize(width=512, height=512),
            sources=[C.ImageSource(data=SOURCE)],
            mask=C.ImageSource(data=MASK),
        ),
    )
    made, edited = served.openai.calls[before:]
    assert made.path == "/v1/images/generations" and not made.files
    assert made.headers["Authorization"] == "Bearer sk-test"
    assert (made.model, made.size, made.output_format, made.n) == (
        "gpt-image-1-mini",
        "1024x1536",
        "jpeg",
        1,
    )
    assert made.prompt == (
        "a harbour at dawn, minimalist style, few elements, generous empty space, "
        "restrained palette. Avoid: people"
    )
    assert "seed" not in made.fields and "style" not in made.fields
    # An edit is multipart: the source and the mask as they were given (the contract's
    # mask convention, transparent = change, is OpenAI's own), 512x512 asked as its
    # nearest native size.
    assert edited.path == "/v1/images/edits"
    assert (edited.model, edited.size, edited.prompt) == ("gpt-image-1", "1024x1024", "add a hat")
    assert edited.images == [SOURCE] and edited.mask == MASK
    assert [(i.model, i.HasField("seed")) for i in (*generation.images, *edit.images)] == [
        ("gpt-image-1-mini", False),
        ("gpt-image-1", False),
    ], "the Images API neither takes nor reports a seed"

    for spec, expected_field, named in (
        (
            C.GenerationSpec(prompt="a fox", provider="openai", model="dall-e-3"),
            "model",
            "gpt-image-1, gpt-image-1-mini",
        ),
        (C.GenerationSpec(prompt="a fox", provider="openai", seed=7), "seed", "seed"),
    ):
        reason, field, message = await refused(stubs, spec)
        assert (reason, field) == ("IMG_003", expected_field) and named in message
    assert len(served.openai.calls) == before + 2, "nothing refused reached openai"


async def test_sdwebui_gets_checkpoint_seed_size_negative_prompt_the_style_fold_and_mask(
    served: Served,
) -> None:
    stubs = caller(served)
    before = len(served.sdwebui.calls)
    generation = await job_of(
        stubs,
        C.GenerationSpec(
            prompt="a harbour at dawn",
            negative_prompt="people",
            style=C.STYLE_CARTOON,
            provider="sdwebui",
            model="dreamshaper_8",
            seed=4242,
            count=2,
            size=C.ImageSize(width=1024, height=1536),
        ),
    )
    edit = await job_of(
        stubs,
        C.GenerationSpec(
            prompt="add a hat",
            provider="sdwebui",
            seed=99,
            size=C.ImageSize(width=512, height=512),
            sources=[C.ImageSource(data=SOURCE)],
            mask=C.ImageSource(data=MASK),
        ),
    )
    first, second, edited = served.sdwebui.calls[before:]
    for (path, body), seed in ((first, 4242), (second, 4243)):
        assert path == "/sdapi/v1/txt2img"
        assert body["prompt"] == (
            "a harbour at dawn, cartoon style, bold outlines, flat saturated colors"
        )
        assert (body["negative_prompt"], body["seed"]) == ("people", seed)
        assert (body["width"], body["height"]) == (1024, 1536)
        assert body["override_settings"] == {"sd_model_checkpoint": "dreamshaper_8"}
        assert "mask" not in body and "init_images" not in body
    path, body = edited
    assert path == "/sdapi/v1/img2img"
    assert [pybase64.b64decode(i) for i in body["init_images"]] == [SOURCE]
    assert (body["width"], body["height"], body["seed"], body["resize_mode"]) == (512, 512, 99, 1)
    assert body["prompt"] == "add a hat" and "override_settings" not in body
    with Image.open(io.BytesIO(pybase64.b64decode(body["mask"]))) as mask:
        # A1111's inpainting mask: white repaints (the contract's transparent half).
        assert (mask.size, mask.mode) == ((64, 48), "L")
        assert (mask.getpixel((8, 24)), mask.getpixel((56, 24))) == (255, 0)
    # The model and seed the server reports it used are what the images say.
    assert [(i.model, i.seed) for i in (*generation.images, *edit.images)] == [
        ("dreamshaper_8", 4242),
        ("dreamshaper_8", 4243),
        ("v1-5-pruned-emaonly", 99),
    ]

    reason, field, message = await refused(
        stubs, C.GenerationSpec(prompt="a fox", provider="sdwebui", model="no-such-checkpoint")
    )
    assert (reason, field) == ("IMG_003", "model")
    assert "v1-5-pruned-emaonly, sd_xl_base_1.0, dreamshaper_8" in message
    assert len(served.sdwebui.calls) == before + 3, "nothing refused reached sdwebui"
