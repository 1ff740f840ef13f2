"""End to end: every image a served process stores carries its provenance marks (a C2PA
manifest signed by the development CA, and XMP fields), in every format, for
generations and edits; DownloadImage conversions carry them again; uploads carry none.
The marks are read back from the bytes a caller gets (the signed URL, DownloadImage),
with the data directory's development CA as the trust anchor."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from imagegen.v1 import common_pb2, generation_pb2, library_pb2, library_pb2_grpc
from PIL import Image

from imagegen.domain.models import ImageFormat
from imagegen.provenance import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    DEV_CA_FILE,
    TRAINED_ALGORITHMIC_MEDIA,
    Origin,
    ProvenanceFacts,
    ProvenanceMarker,
    ProvenanceReport,
    read_marks,
)
from imagegen.provenance.signing import make_dev_chain, signing_material_from_pem
from tests.fakes.forge_server import ForgeFake, Reply
from tests.integration.test_imaging_pipeline import idat_chunks
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e

E = generation_pb2
L = library_pb2
NOTICE = "Made with AI at Example Corp; internal use only (provenance test)."
FORMATS = {
    "png": common_pb2.IMAGE_FORMAT_PNG,
    "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
    "webp": common_pb2.IMAGE_FORMAT_WEBP,
}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@pytest.fixture(scope="module")
async def forge() -> AsyncIterator[ForgeFake]:
    async with ForgeFake.start() as fake:
        yield fake


@pytest.fixture(scope="module")
async def server(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str, forge: ForgeFake
) -> AsyncIterator[ServedProcess]:
    tmp_path = tmp_path_factory.mktemp("provenance-e2e")
    served = await start_server(
        tmp_path,
        module_database_url,
        extra_env={
            "IMAGEGEN_USAGE_NOTICE": NOTICE,
            "IMAGEGEN_DEFAULT_PROVIDER": "local",
            "BUILT_IN_FORGE_API_URL": forge.url,
            "BUILT_IN_FORGE_API_KEY": "forge-test-key",
        },
    )
    try:
        yield served
    finally:
        served.terminate()
        await served.wait_exit(30)
    assert served.log_problems() == []


@pytest.fixture(scope="module")
def anchors(server: ServedProcess) -> str:
    return (server.data_dir / DEV_CA_FILE).read_text()


def png(width: int, height: int, color: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, 5):
        image.putpixel((x, (x * 7) % height), (255, x % 256, 0))
    image.save(out, format="PNG")
    return out.getvalue()


async def generate(
    server: ServedProcess, spec: common_pb2.GenerationSpec
) -> tuple[E.Generation, list[E.GenerationEvent]]:
    async with server.channel() as channel:
        stub = server.stub(channel)
        events = [
            r.event
            async for r in stub.GenerateImage(
                E.GenerateImageRequest(spec=spec), metadata=server.metadata(), timeout=60
            )
        ]
        assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED, events[-1]
        job = await stub.GetGeneration(
            E.GetGenerationRequest(name=events[-1].generation), metadata=server.metadata()
        )
    return job.generation, [e for e in events if e.type == E.GENERATION_EVENT_TYPE_IMAGE_READY]


async def fetch(url: str) -> bytes:
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(url)
    reply.raise_for_status()
    return reply.content


async def download(server: ServedProcess, name: str, fmt: int = 0) -> tuple[str, bytes]:
    async with server.channel() as channel:
        library = library_pb2_grpc.ImageLibraryServiceStub(channel)
        parts = [
            part
            async for part in library.DownloadImage(
                L.DownloadImageRequest(name=name, format=fmt),  # type: ignore[arg-type]
                metadata=server.metadata(),
                timeout=60,
            )
        ]
    return parts[0].metadata.mime_type, b"".join(p.data for p in parts)


async def get_image(server: ServedProcess, name: str) -> common_pb2.Image:
    async with server.channel() as channel:
        library = library_pb2_grpc.ImageLibraryServiceStub(channel)
        reply = await library.GetImage(L.GetImageRequest(name=name), metadata=server.metadata())
    return reply.image


def assert_marked(report: ProvenanceReport, *, source_type: str, provider: str) -> None:
    assert report.validation_state == "Trusted", report.failures
    assert report.failures == ()
    assert report.digital_source_type == source_type
    assert report.provider == provider
    assert report.claim_generator.startswith("imagegen")
    assert report.xmp.digital_source_type == source_type
    assert report.xmp.usage_terms == NOTICE
    assert report.xmp.rights == NOTICE
    assert report.xmp.creator_tool.startswith("imagegen")


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_generations_and_edits_are_marked_in_every_format(
    server: ServedProcess, anchors: str, fmt: str
) -> None:
    spec = common_pb2.GenerationSpec(
        prompt="a lighthouse at dusk",
        size=common_pb2.ImageSize(width=256, height=256),
        format=FORMATS[fmt],
    )
    job, ready = await generate(server, spec)
    assert job.usage_notice == NOTICE
    image = ready[0].image
    assert image.mime_type == MIME[fmt]
    assert image.usage_notice == NOTICE
    stored = await fetch(image.uri)
    assert len(stored) == image.size_bytes
    generated = read_marks(stored, trust_anchors_pem=anchors)
    assert_marked(generated, source_type=TRAINED_ALGORITHMIC_MEDIA, provider="local")
    assert generated.title == image.name
    assert generated.actions == ("c2pa.created",)
    assert generated.ingredients == ()
    # Without the development CA as an anchor the signature still verifies, untrusted.
    assert read_marks(stored).validation_state == "Valid"

    # An edit of that image with an uploaded second source: both are its parents.
    upload_bytes = png(256, 256)
    edit_spec = common_pb2.GenerationSpec(
        prompt="grayscale",
        format=FORMATS[fmt],
        sources=[
            common_pb2.ImageSource(image=image.name),
            common_pb2.ImageSource(data=upload_bytes),
        ],
    )
    edit_job, edit_ready = await generate(server, edit_spec)
    assert edit_job.usage_notice == NOTICE
    edited = edit_ready[0].image
    assert edited.usage_notice == NOTICE
    assert len(edited.parents) == 2 and edited.parents[0] == image.name
    upload_name = edited.parents[1]
    mime, edited_bytes = await download(server, edited.name)
    assert mime == MIME[fmt] and edited_bytes == await fetch(edited.uri)
    report = read_marks(edited_bytes, trust_anchors_pem=anchors)
    assert_marked(report, source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, provider="local")
    assert report.actions == ("c2pa.opened", "c2pa.placed", "c2pa.edited")
    assert [(i.title, i.relationship) for i in report.ingredients] == [
        (image.name, "parentOf"),
        (upload_name, "componentOf"),
    ]
    # The chain continues into the generated parent's own manifest; the upload has none.
    assert report.ingredients[0].manifest_label == generated.label
    assert report.ingredients[1].manifest_label == ""

    # The upload is the caller's file, stored as given: no marks, no notice.
    upload = await get_image(server, upload_name)
    assert upload.upload and upload.usage_notice == ""
    _, upload_stored = await download(server, upload_name)
    assert upload_stored == upload_bytes
    assert not read_marks(upload_stored).has_manifest


@pytest.mark.parametrize("target", ["jpeg", "webp", "png"])
async def test_download_conversions_are_marked_again(
    server: ServedProcess, anchors: str, target: str
) -> None:
    stored_format = "png" if target != "png" else "webp"
    _, ready = await generate(
        server,
        common_pb2.GenerationSpec(
            prompt="a red kite",
            size=common_pb2.ImageSize(width=256, height=256),
            format=FORMATS[stored_format],
        ),
    )
    image = ready[0].image
    stored_label = read_marks(await fetch(image.uri), trust_anchors_pem=anchors).label
    mime, converted = await download(server, image.name, FORMATS[target])
    assert mime == MIME[target]
    report = read_marks(converted, trust_anchors_pem=anchors)
    assert_marked(report, source_type=TRAINED_ALGORITHMIC_MEDIA, provider="local")
    assert report.actions == ("c2pa.opened", "c2pa.converted")
    [ingredient] = report.ingredients
    assert (ingredient.title, ingredient.relationship) == (image.name, "parentOf")
    assert ingredient.manifest_label == stored_label


async def test_a_passed_through_png_keeps_its_pixel_data_byte_for_byte(
    server: ServedProcess, anchors: str, forge: ForgeFake
) -> None:
    reply = png(256, 256, color=(10, 200, 90))
    forge.script(Reply(image=reply))
    _, ready = await generate(
        server,
        common_pb2.GenerationSpec(
            prompt="a green field",
            size=common_pb2.ImageSize(width=256, height=256),
            format=common_pb2.IMAGE_FORMAT_PNG,
            provider="forge",
        ),
    )
    stored = await fetch(ready[0].image.uri)
    assert stored != reply  # marked
    assert idat_chunks(stored) == idat_chunks(reply) != []
    assert_marked(
        read_marks(stored, trust_anchors_pem=anchors),
        source_type=TRAINED_ALGORITHMIC_MEDIA,
        provider="forge",
    )


def provider_signed_png(width: int, height: int) -> bytes:
    """A PNG signed by a provider's own chain (OpenAI signs its output), which we do not
    trust: its manifest is the provider's claim, kept in ours as a component."""
    key, leaf, ca = make_dev_chain()
    provider = ProvenanceMarker(signing_material_from_pem(leaf + ca, key))
    facts = ProvenanceFacts(
        origin=Origin.GENERATED,
        provider_id="a-provider",
        model="their-model",
        created=datetime.now(UTC),
        usage_notice="the provider's own notice",
        title="their output",
    )
    return provider.mark(png(width, height, color=(200, 40, 40)), ImageFormat.PNG, facts)


@pytest.mark.parametrize(
    ("fmt", "reply_side"),
    [("png", 256), ("jpeg", 256), ("png", 320)],
    ids=["passed-through", "converted", "fitted"],
)
async def test_a_provider_signed_reply_keeps_the_providers_manifest_in_the_chain(
    server: ServedProcess, anchors: str, forge: ForgeFake, fmt: str, reply_side: int
) -> None:
    # The pipeline stores the reply without its metadata (the provider's manifest goes
    # with it), so the marks must have looked at the reply as it came.
    reply = provider_signed_png(reply_side, reply_side)
    provider_label = read_marks(reply).label
    assert provider_label
    forge.script(Reply(image=reply))
    _, ready = await generate(
        server,
        common_pb2.GenerationSpec(
            prompt="a red barn",
            size=common_pb2.ImageSize(width=256, height=256),
            format=FORMATS[fmt],
            provider="forge",
        ),
    )
    stored = await fetch(ready[0].image.uri)
    report = read_marks(stored, trust_anchors_pem=anchors)
    assert_marked(report, source_type=TRAINED_ALGORITHMIC_MEDIA, provider="forge")
    assert report.actions == ("c2pa.created", "c2pa.placed")
    assert [(i.title, i.relationship, i.manifest_label) for i in report.ingredients] == [
        ("provider output", "componentOf", provider_label)
    ]
