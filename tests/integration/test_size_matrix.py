"""What you ask for is what you get, and what you pay for (issue 9): for every provider,
every offered size asked for, and whatever size its fake answers with, the stored image
has exactly the asked size and format and the caller is charged that size's price;
for generations and for edits (asked with a size, or without one: then the source's).

One server in this process serves the whole module, with each outside provider pointed
at its wire-format fake (tests/fakes/) and the local renderer without pauses. Each case
is one job of its own user, so its credit balance before and after is its own: the
stored bytes are read back through the image's signed URL and decoded; the Image, the
job, the usage record and the balance must all say the asked size's price, and the
fake must have been asked for that size in its provider's own terms.
"""

from __future__ import annotations

import io
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pybase64
import pytest
from imagegen.v1 import common_pb2, generation_pb2, usage_pb2, usage_pb2_grpc
from PIL import Image, ImageChops, ImageOps, ImageStat

from tests.fakes.forge_server import Reply
from tests.fakes.openai_server import OpenAIReply
from tests.fakes.sdwebui_server import SDReply
from tests.integration.all_providers import PROVIDERS, Served, serve_with_fakes
from tests.integration.callers import Stubs, completed

E = generation_pb2
U = usage_pb2
Dimensions = tuple[int, int]

#: The sizes the contract offers, and each one's price per image in credits as
#: docs/plans-and-prices.md states it (written out here, not computed by the code under
#: test): up to 512x512 1, up to 1024x1024 2, up to 1536x1536 3.
PRICES = {(256, 256): 1, (512, 512): 1, (1024, 1024): 2, (1024, 1536): 3, (1536, 1024): 3}
#: What a fake answers with: square, landscape, portrait, small, and an odd aspect.
REPLIES = [(1024, 1024), (1536, 1024), (1024, 1536), (256, 256), (1000, 700)]
FORMATS = [
    (common_pb2.IMAGE_FORMAT_PNG, "image/png", "PNG"),
    (common_pb2.IMAGE_FORMAT_JPEG, "image/jpeg", "JPEG"),
    (common_pb2.IMAGE_FORMAT_WEBP, "image/webp", "WEBP"),
]
#: OpenAI's gpt-image sizes: what is asked of it for each size.
OPENAI_NATIVE = {
    (256, 256): "1024x1024",
    (512, 512): "1024x1024",
    (1024, 1024): "1024x1024",
    (1024, 1536): "1024x1536",
    (1536, 1024): "1536x1024",
    (600, 400): "1536x1024",
}
#: The fakes paint their answers in one flat colour (tests/fakes: encoded_image and
#: png_bytes; sdwebui's img2img in its own): a fitted image keeps it to its corners
#: (cover-crop), where a letterbox would leave bars of another colour.
FAKE_COLOUR = {"forge": (200, 40, 40), "openai": (200, 40, 40), "sdwebui": (200, 40, 40)}
FAKE_EDIT_COLOUR = {**FAKE_COLOUR, "sdwebui": (40, 200, 40)}

#: The source of every edit: 600x400 (3:2), red rising left to right and green top to
#: bottom, so that which part a crop kept, and whether anything was stretched, shows.
SOURCE_SIZE = (600, 400)
#: 600x400 is 240,000 pixels: the price of up to 512x512; an edit costs at least 2.
SOURCE_PRICE = 1
EDIT_MINIMUM = 2
#: What the local renderer is asked to do: mirror keeps the geometry, so what it
#: answers is the source flipped, and what is stored is that fitted to the asked size.
LOCAL_INSTRUCTION = "mirror"


def gradient(width: int, height: int) -> Image.Image:
    ramp = Image.linear_gradient("L")  # 256x256, black at the top to white at the bottom
    red = ramp.transpose(Image.Transpose.ROTATE_90)
    return Image.merge(
        "RGB",
        (
            red.resize((width, height)),
            ramp.resize((width, height)),
            Image.new("L", (width, height), 90),
        ),
    )


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


SOURCE = gradient(*SOURCE_SIZE)
SOURCE_PNG = png(SOURCE)


@dataclass(frozen=True)
class Case:
    """One job: a generation, or an edit of SOURCE when `edit`."""

    provider: str
    #: the asked size; None for an edit asked without one (it takes its source's)
    asked: Dimensions | None
    #: what the fake answers with; None for the local renderer's own output
    reply: Dimensions | None
    count: int
    format_index: int
    edit: bool = False

    @property
    def id(self) -> str:
        answered = "own" if self.reply is None else "{}x{}".format(*self.reply)
        asked = "source" if self.asked is None else "{}x{}".format(*self.asked)
        kind = "edit-" if self.edit else ""
        return f"{kind}{self.provider}-{asked}-from-{answered}-n{self.count}"

    @property
    def size(self) -> Dimensions:
        """What must be stored: the asked size, else the source's."""
        return self.asked or SOURCE_SIZE

    @property
    def image_price(self) -> int:
        price = PRICES[self.asked] if self.asked else SOURCE_PRICE
        return max(EDIT_MINIMUM, price) if self.edit else price


def generation_cases() -> list[Case]:
    made = []
    for provider in PROVIDERS:
        replies: list[Dimensions | None] = [None] if provider == "local" else list(REPLIES)
        for (asked_index, asked), (reply_index, reply), count in itertools.product(
            enumerate(PRICES), enumerate(replies), (1, 2)
        ):
            # Each provider meets every format across its cases.
            format_index = (asked_index + reply_index + count) % len(FORMATS)
            made.append(Case(provider, asked, reply, count, format_index))
    return made


def edit_cases() -> list[Case]:
    made = []
    asked_sizes: list[Dimensions | None] = [*PRICES, None]
    edit_replies: list[Dimensions | None] = [(1536, 1024), (1000, 700), (256, 256)]
    for provider in PROVIDERS:
        replies = [None] if provider == "local" else edit_replies
        for (asked_index, asked), (reply_index, reply) in itertools.product(
            enumerate(asked_sizes), enumerate(replies)
        ):
            turn = asked_index + reply_index
            made.append(Case(provider, asked, reply, 1 + turn % 2, turn % len(FORMATS), True))
    return made


@pytest.fixture(scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str
) -> AsyncIterator[Served]:
    """One server for the module, every outside provider pointed at its fake."""
    tmp_path = tmp_path_factory.mktemp("size-matrix")
    async with serve_with_fakes(tmp_path, module_database_url) as made:
        yield made


def script_replies(served: Served, case: Case) -> int:
    """Make the case's fake answer each of its calls at `case.reply`; returns how many
    calls that fake had received before."""
    if case.reply is None:
        return 0
    if case.provider == "forge":
        served.forge.script(*[Reply(size=case.reply) for _ in range(case.count)])
        return len(served.forge.requests)
    if case.provider == "openai":
        served.openai.script(*[OpenAIReply(size=case.reply) for _ in range(case.count)])
        return len(served.openai.calls)
    served.sdwebui.script(*[SDReply(size=case.reply) for _ in range(case.count)])
    return len(served.sdwebui.calls)


def spec_of(case: Case) -> common_pb2.GenerationSpec:
    spec = common_pb2.GenerationSpec(
        prompt=f"a lighthouse at dusk ({case.id})",
        provider=case.provider,
        count=case.count,
        format=FORMATS[case.format_index][0],
    )
    if case.asked is not None:
        spec.size.CopyFrom(common_pb2.ImageSize(width=case.asked[0], height=case.asked[1]))
    if case.edit:
        if case.provider == "local":
            spec.prompt = LOCAL_INSTRUCTION
        spec.sources.append(common_pb2.ImageSource(data=SOURCE_PNG))
    return spec


async def available_credits(served: Served, stubs: Stubs) -> int:
    usage = usage_pb2_grpc.UsageServiceStub(served.channel)
    reply = await usage.GetCreditBalance(U.GetCreditBalanceRequest(), metadata=stubs.md)
    return int(reply.balance.available_credits)


def assert_corners(stored: Image.Image, colour: tuple[int, int, int]) -> None:
    """The fake's flat colour reaches every corner: cover-cropped, not letterboxed."""
    rgb = stored.convert("RGB")
    width, height = rgb.size
    for corner in ((0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1)):
        got = rgb.getpixel(corner)
        assert isinstance(got, tuple)
        assert all(abs(a - b) <= 8 for a, b in zip(got, colour, strict=True)), (
            f"corner {corner} is {got}, not {colour}: the image was not cover-cropped"
        )


def assert_looks_like(stored: Image.Image, expected: Image.Image) -> None:
    """Within lossy-encoding noise of `expected`, band by band (a stretch instead of the
    cover-crop puts the red ramp tens of levels off)."""
    difference = ImageChops.difference(stored.convert("RGB"), expected)
    worst = max(ImageStat.Stat(difference).mean)
    assert worst < 4, f"{worst:.1f} levels off on average: not the source fitted by cover-crop"


def content_check(case: Case) -> Callable[[Image.Image], None]:
    if case.reply is not None:
        colour = (FAKE_EDIT_COLOUR if case.edit else FAKE_COLOUR)[case.provider]
        return lambda stored: assert_corners(stored, colour)
    if case.edit:
        # Independent of the code under test: Pillow's own cover-and-centre-crop.
        mirrored = SOURCE.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        expected = ImageOps.fit(mirrored, case.size, Image.Resampling.LANCZOS)
        return lambda stored: assert_looks_like(stored, expected)
    return lambda stored: None  # the local renderer paints at the asked size itself


def assert_asked_in_wire_form(served: Served, case: Case, calls_before: int) -> None:
    """Each call the fake received asked for the case's size in its provider's terms."""
    count = case.count
    if case.provider == "openai":
        calls = served.openai.calls[calls_before:]
        assert [c.size for c in calls] == [OPENAI_NATIVE[case.size]] * count
        pil_format = FORMATS[case.format_index][2]
        assert [c.output_format for c in calls] == [pil_format.lower()] * count
        assert all(c.is_edit == case.edit for c in calls)
        if case.edit:
            assert all(c.images == [SOURCE_PNG] for c in calls)
    elif case.provider == "sdwebui":
        received = served.sdwebui.calls[calls_before:]
        path = "/sdapi/v1/img2img" if case.edit else "/sdapi/v1/txt2img"
        assert [p for p, _ in received] == [path] * count
        assert [(b["width"], b["height"]) for _, b in received] == [case.size] * count
        if case.edit:
            # A1111's "Crop and resize": the source is fitted by the same rule.
            assert all(b["resize_mode"] == 1 for _, b in received)
            assert all(pybase64.b64decode(b["init_images"][0]) == SOURCE_PNG for _, b in received)
    elif case.provider == "forge":
        bodies = [r.json for r in served.forge.requests[calls_before:]]
        fields = {"prompt", "original_images"} if case.edit else {"prompt"}
        assert [set(b) for b in bodies] == [fields] * count, "the API has no size field"


@pytest.mark.parametrize("case", generation_cases() + edit_cases(), ids=lambda c: c.id)
async def test_the_asked_size_is_stored_and_charged_whatever_the_provider_answers(
    served: Served, case: Case
) -> None:
    _, mime_type, pil_format = FORMATS[case.format_index]
    stubs = Stubs(served.channel, f"matrix-{uuid.uuid4().hex[:12]}")
    calls_before = script_replies(served, case)
    before = await available_credits(served, stubs)
    job = await stubs.get(completed(await stubs.generate(spec_of(case))))
    charged = before - await available_credits(served, stubs)

    price = case.image_price * case.count
    assert charged == price, "charged the price of the size stored"
    assert job.credits == price
    assert (job.spec.size.width, job.spec.size.height) == case.size
    assert len(job.images) == case.count
    check = content_check(case)
    async with httpx.AsyncClient(trust_env=False) as http:
        for image in job.images:
            assert (image.width, image.height, image.mime_type) == (*case.size, mime_type)
            assert image.credits == case.image_price
            fetched = await http.get(image.uri)
            assert fetched.status_code == 200
            assert fetched.headers["Content-Type"] == mime_type
            assert image.size_bytes == len(fetched.content)
            with Image.open(io.BytesIO(fetched.content)) as stored:
                assert (stored.format, stored.size) == (pil_format, case.size)
                check(stored)
    usage = usage_pb2_grpc.UsageServiceStub(served.channel)
    records = (await usage.ListUsage(U.ListUsageRequest(), metadata=stubs.md)).usage_records
    assert [(r.status, r.image_count, r.credits, r.provider) for r in records] == [
        (U.USAGE_STATUS_SUCCEEDED, case.count, price, case.provider)
    ]
    assert_asked_in_wire_form(served, case, calls_before)
