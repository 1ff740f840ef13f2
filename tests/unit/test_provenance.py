"""Provenance marks: C2PA manifest and XMP written into PNG, JPEG and WebP, read back
with the development CA as the trust anchor. No network: the C2PA library is told to
fetch nothing, and a loopback listener proves it never tried."""

from __future__ import annotations

import binascii
import hashlib
import io
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import c2pa
import pyexiv2
import pytest
from PIL import Image

from imagegen.config import ProvenanceSettings
from imagegen.domain.models import ImageFormat
from imagegen.provenance import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
    Ingredient,
    Origin,
    ProvenanceError,
    ProvenanceFacts,
    ProvenanceMarker,
    open_marker,
    read_marks,
)
from imagegen.provenance.marker import _png_may_carry_manifest, c2pa_settings
from imagegen.provenance.signing import make_dev_chain, signing_material_from_pem
from imagegen.provenance.xmp import XmpFields, embed_xmp, read_xmp

NOTICE = "Made with AI by imagegen & friends <test>; usage: internal only. Ünïcødé ok."
CREATED = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
FORMATS = [ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.WEBP]


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> ProvenanceMarker:
    data_dir = tmp_path_factory.mktemp("provenance-data")
    return open_marker(ProvenanceSettings(cert=None, key=None, usage_notice=NOTICE), data_dir)


@pytest.fixture(scope="module")
def anchors(marker: ProvenanceMarker) -> str:
    assert marker.material.trust_anchors_pem is not None
    return marker.material.trust_anchors_pem


def encode(
    fmt: ImageFormat,
    *,
    color: tuple[int, ...] = (200, 40, 90),
    mode: str = "RGB",
    size: tuple[int, int] = (96, 64),
    **options: object,
) -> bytes:
    image = Image.new(mode, size, color)
    # Some texture, so the encoders produce real entropy-coded data.
    for x in range(0, size[0], 7):
        image.putpixel((x, x % size[1]), (x % 256,) * len(color))
    out = io.BytesIO()
    image.save(out, format=fmt.name, **options)
    return out.getvalue()


def generation(**overrides: object) -> ProvenanceFacts:
    facts = ProvenanceFacts(
        origin=Origin.GENERATED,
        provider_id="local",
        model="local-diffusion-1",
        created=CREATED,
        usage_notice=NOTICE,
        title="images/gen-1",
    )
    return replace(facts, **overrides)  # type: ignore[arg-type]


def edit(parents: tuple[Ingredient, ...]) -> ProvenanceFacts:
    return generation(origin=Origin.EDITED, title="images/edit-1", parents=parents)


# Container parsers, so tests can say exactly which bytes changed.


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        chunks.append((kind, data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Marker segments up to SOS, and everything from SOS on (the entropy-coded scan)."""
    assert data[:2] == b"\xff\xd8"
    segments, position = [], 2
    while data[position + 1] != 0xDA:
        marker_byte = data[position + 1]
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        segments.append((marker_byte, data[position + 4 : position + 2 + length]))
        position += 2 + length
    return segments, data[position:]


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    (riff_size,) = struct.unpack("<I", data[4:8])
    assert riff_size + 8 == len(data)
    chunks, position = [], 12
    while position < len(data):
        kind = data[position : position + 4]
        (length,) = struct.unpack("<I", data[position + 4 : position + 8])
        chunks.append((kind, data[position + 8 : position + 8 + length]))
        position += 8 + length + (length & 1)
    return chunks


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.tobytes()


# Generations and edits in every format.


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_a_generation_reads_back_trusted_with_its_marks(
    marker: ProvenanceMarker, anchors: str, fmt: ImageFormat
) -> None:
    marked = marker.mark(encode(fmt), fmt, generation())

    report = read_marks(marked, trust_anchors_pem=anchors)

    assert report.validation_state == "Trusted", report.failures
    assert report.failures == ()
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert report.actions == ("c2pa.created",)
    assert report.title == "images/gen-1"
    assert report.claim_generator == "imagegen 0.1.0"
    assert (report.provider, report.model) == ("local", "local-diffusion-1")
    assert report.created == "2026-11-25T10:30:00+00:00"
    assert report.ingredients == ()
    assert report.xmp == XmpFields(
        digital_source_type=TRAINED_ALGORITHMIC_MEDIA,
        usage_terms=NOTICE,
        rights=NOTICE,
        creator_tool="imagegen 0.1.0",
        create_date="2026-11-25T10:30:00+00:00",
    )


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_an_edit_with_two_parents_names_them_in_its_ingredient_chain(
    marker: ProvenanceMarker, anchors: str, fmt: ImageFormat
) -> None:
    # The first parent is one of ours (it carries a manifest), the second an upload.
    first = marker.mark(
        encode(ImageFormat.PNG, color=(0, 0, 255)),
        ImageFormat.PNG,
        generation(title="images/parent-1"),
    )
    first_label = read_marks(first, trust_anchors_pem=anchors).label
    second = encode(ImageFormat.JPEG, color=(0, 255, 0))
    facts = edit((Ingredient(first, "images/parent-1"), Ingredient(second, "uploads/cat.jpg")))

    report = read_marks(marker.mark(encode(fmt), fmt, facts), trust_anchors_pem=anchors)

    assert report.validation_state == "Trusted", report.failures
    assert report.digital_source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert report.actions == ("c2pa.opened", "c2pa.placed", "c2pa.edited")
    assert [(i.title, i.relationship, i.format) for i in report.ingredients] == [
        ("images/parent-1", "parentOf", "image/png"),
        ("uploads/cat.jpg", "componentOf", "image/jpeg"),
    ]
    assert [i.sha256 for i in report.ingredients] == [
        hashlib.sha256(first).hexdigest(),
        hashlib.sha256(second).hexdigest(),
    ]
    # The chain goes on into the parent's own manifest; the upload had none.
    assert report.ingredients[0].manifest_label == first_label
    assert first_label.startswith("urn:c2pa:")
    assert report.ingredients[1].manifest_label == ""
    assert report.xmp.digital_source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert report.xmp.usage_terms == NOTICE
    assert report.xmp.rights == NOTICE


def test_a_conversion_opens_the_stored_image_and_keeps_its_chain(
    marker: ProvenanceMarker, anchors: str
) -> None:
    stored = marker.mark(encode(ImageFormat.PNG), ImageFormat.PNG, generation())
    stored_label = read_marks(stored, trust_anchors_pem=anchors).label
    # DownloadImage re-encodes, which drops every mark...
    with Image.open(io.BytesIO(stored)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=90)
    assert not read_marks(out.getvalue()).has_manifest
    facts = generation(converted_from=Ingredient(stored, "images/gen-1"))

    report = read_marks(
        marker.mark(out.getvalue(), ImageFormat.JPEG, facts), trust_anchors_pem=anchors
    )

    assert report.validation_state == "Trusted", report.failures
    assert report.actions == ("c2pa.opened", "c2pa.converted")
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert [(i.title, i.relationship, i.manifest_label) for i in report.ingredients] == [
        ("images/gen-1", "parentOf", stored_label)
    ]
    assert report.xmp.usage_terms == NOTICE


def test_a_provider_signed_output_keeps_the_providers_manifest_in_the_chain(
    marker: ProvenanceMarker, anchors: str
) -> None:
    # A provider (OpenAI does this) signs with its own chain, which we do not trust.
    provider_key, provider_leaf, provider_ca = make_dev_chain()
    provider = ProvenanceMarker(
        signing_material_from_pem(provider_leaf + provider_ca, provider_key)
    )
    from_provider = provider.mark(encode(ImageFormat.PNG), ImageFormat.PNG, generation(title="x"))
    provider_label = read_marks(from_provider).label

    report = read_marks(
        marker.mark(from_provider, ImageFormat.PNG, generation()), trust_anchors_pem=anchors
    )

    assert report.validation_state == "Trusted", report.failures
    assert report.actions == ("c2pa.created", "c2pa.placed")
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert [(i.title, i.relationship, i.manifest_label) for i in report.ingredients] == [
        ("provider output", "componentOf", provider_label)
    ]


# Only metadata is added: the image data stays byte-identical.


def test_png_idat_chunks_are_identical_and_only_metadata_chunks_are_added(
    marker: ProvenanceMarker,
) -> None:
    original = encode(ImageFormat.PNG, size=(300, 200))
    marked = marker.mark(original, ImageFormat.PNG, generation())

    before, after = png_chunks(original), png_chunks(marked)
    assert [c for c in after if c[0] == b"IDAT"] == [c for c in before if c[0] == b"IDAT"]
    assert [c for c in after if c[0] not in (b"iTXt", b"caBX")] == before
    added = [c for c in after if c not in before]
    assert sorted(kind for kind, _ in added) == [b"caBX", b"iTXt"]
    assert next(body for kind, body in added if kind == b"iTXt").startswith(b"XML:com.adobe.xmp\0")
    # Both sit before the image data, where streaming readers find them first.
    kinds = [kind for kind, _ in after]
    assert kinds.index(b"iTXt") < kinds.index(b"IDAT")
    assert kinds.index(b"caBX") < kinds.index(b"IDAT")


def test_jpeg_scan_data_is_identical_and_app0_stays_first(marker: ProvenanceMarker) -> None:
    original = encode(ImageFormat.JPEG, quality=85)
    marked = marker.mark(original, ImageFormat.JPEG, generation())

    segments_before, scan_before = jpeg_segments(original)
    segments_after, scan_after = jpeg_segments(marked)
    assert scan_after == scan_before
    assert segments_after[0] == segments_before[0]  # APP0 (JFIF)
    assert [s for s in segments_after if s[0] not in (0xE1, 0xEB)] == segments_before
    assert any(
        m == 0xE1 and body.startswith(b"http://ns.adobe.com/xap/1.0/\0")
        for m, body in segments_after
    )
    assert any(m == 0xEB for m, _ in segments_after)  # APP11: the C2PA JUMBF


@pytest.mark.parametrize(
    ("mode", "color", "options", "bitstream"),
    [
        ("RGB", (10, 20, 30), {"quality": 80}, b"VP8 "),
        ("RGBA", (10, 20, 30, 128), {"lossless": True}, b"VP8L"),
        ("RGBA", (10, 20, 30, 128), {"quality": 80}, b"VP8 "),
    ],
    ids=["lossy", "lossless-alpha", "lossy-alpha"],
)
def test_webp_bitstream_is_identical_and_the_file_is_extended_with_xmp(
    marker: ProvenanceMarker,
    mode: str,
    color: tuple[int, ...],
    options: dict[str, object],
    bitstream: bytes,
) -> None:
    original = encode(ImageFormat.WEBP, mode=mode, color=color, **options)
    marked = marker.mark(original, ImageFormat.WEBP, generation())

    before, after = riff_chunks(original), riff_chunks(marked)
    assert [c for c in after if c[0] in (bitstream, b"ALPH")] == [
        c for c in before if c[0] in (bitstream, b"ALPH")
    ]
    assert after[0][0] == b"VP8X"
    flags = after[0][1][0]
    assert flags & 0x04, "the VP8X header must announce the XMP chunk"
    assert bool(flags & 0x10) == (mode == "RGBA"), "alpha flag lost or invented"
    assert {kind for kind, _ in after} >= {b"XMP ", b"C2PA"}
    assert pixels(marked) == pixels(original)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_marked_images_decode_to_the_same_pixels(
    marker: ProvenanceMarker, fmt: ImageFormat
) -> None:
    original = encode(fmt)
    assert pixels(marker.mark(original, fmt, generation())) == pixels(original)


# Determinism: only what must vary (manifest ids, the signature) does.


def test_marking_twice_differs_only_in_the_manifest(marker: ProvenanceMarker, anchors: str) -> None:
    original = encode(ImageFormat.PNG)
    first = marker.mark(original, ImageFormat.PNG, generation())
    second = marker.mark(original, ImageFormat.PNG, generation())

    assert [c for c in png_chunks(first) if c[0] != b"caBX"] == [
        c for c in png_chunks(second) if c[0] != b"caBX"
    ]
    first_report = read_marks(first, trust_anchors_pem=anchors).to_dict()
    second_report = read_marks(second, trust_anchors_pem=anchors).to_dict()
    assert first_report.pop("label") != second_report.pop("label")
    assert first_report == second_report


# What the reader says about other images.


def test_an_unmarked_image_has_no_manifest_and_no_xmp() -> None:
    report = read_marks(encode(ImageFormat.PNG))
    assert not report.has_manifest
    assert report.validation_state == ""
    assert report.xmp == XmpFields()


def test_without_the_anchor_the_signature_is_valid_but_not_trusted(
    marker: ProvenanceMarker,
) -> None:
    marked = marker.mark(encode(ImageFormat.PNG), ImageFormat.PNG, generation())
    assert read_marks(marked).validation_state == "Valid"


def test_changed_pixels_make_the_manifest_invalid(marker: ProvenanceMarker, anchors: str) -> None:
    marked = bytearray(marker.mark(encode(ImageFormat.PNG), ImageFormat.PNG, generation()))
    idat = marked.index(b"IDAT")
    marked[idat + 8] ^= 0xFF

    report = read_marks(bytes(marked), trust_anchors_pem=anchors)

    assert report.validation_state == "Invalid"
    assert any("dataHash.mismatch" in failure for failure in report.failures)


def test_xmp_changed_after_signing_breaks_the_hard_binding(
    marker: ProvenanceMarker, anchors: str
) -> None:
    marked = marker.mark(encode(ImageFormat.JPEG), ImageFormat.JPEG, generation())
    tampered = embed_xmp(marked, XmpFields(usage_terms="anything goes"))
    assert read_marks(tampered, trust_anchors_pem=anchors).validation_state == "Invalid"


def test_xmp_a_provider_wrote_is_kept() -> None:
    image = pyexiv2.ImageData(encode(ImageFormat.PNG))
    try:
        image.modify_xmp({"Xmp.dc.title": {'lang="x-default"': "from the provider"}})
        with_title = image.get_bytes()
    finally:
        image.close()

    marked = embed_xmp(with_title, XmpFields(rights="ours"))

    image = pyexiv2.ImageData(marked)
    try:
        found = image.read_xmp()
    finally:
        image.close()
    assert found["Xmp.dc.title"] == {'lang="x-default"': "from the provider"}
    assert read_xmp(marked).rights == "ours"


# Nothing reaches the network, even when an image points somewhere.


@pytest.fixture
def counting_listener() -> Iterator[tuple[str, list[int]]]:
    """A loopback TCP listener that counts connections; yields (url, counts)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    connections: list[int] = []

    def accept() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            connections.append(1)
            client.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/manifest.c2pa", connections
    finally:
        server.close()
        thread.join(timeout=5)


def remote_manifest_png(anchors_marker: ProvenanceMarker, url: str) -> bytes:
    material = anchors_marker.material
    manifest = {
        "claim_generator_info": [{"name": "elsewhere", "version": "1"}],
        "title": "remote",
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {
                    "actions": [
                        {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA}
                    ]
                },
            }
        ],
    }
    with c2pa.Context.from_dict(c2pa_settings(None)) as context:
        builder = c2pa.Builder(manifest, context=context)
        builder.set_no_embed()
        builder.set_remote_url(url)
        signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(
                material.algorithm,
                material.certificate_chain_pem.encode(),
                material.private_key_pem.encode(),
                None,
            )
        )
        out = io.BytesIO()
        with signer:
            builder.sign(signer, "image/png", io.BytesIO(encode(ImageFormat.PNG)), out)
    return out.getvalue()


def test_a_remote_manifest_is_reported_and_never_fetched(
    marker: ProvenanceMarker, anchors: str, counting_listener: tuple[str, list[int]]
) -> None:
    url, connections = counting_listener
    remote = remote_manifest_png(marker, url)

    report = read_marks(remote, trust_anchors_pem=anchors)
    assert report.has_manifest
    assert report.validation_state == ""
    assert "remote" in report.manifest_error.lower()

    # Editing it records the parent with its unreachable manifest, again without fetching.
    facts = edit((Ingredient(remote, "images/remote"),))
    edited = read_marks(
        marker.mark(encode(ImageFormat.PNG), ImageFormat.PNG, facts), trust_anchors_pem=anchors
    )
    assert edited.validation_state == "Trusted", edited.failures
    assert [i.title for i in edited.ingredients] == ["images/remote"]
    # A generation over it (a provider that pointed at a remote manifest) too.
    generated = read_marks(
        marker.mark(remote, ImageFormat.PNG, generation()), trust_anchors_pem=anchors
    )
    assert generated.validation_state == "Trusted", generated.failures
    assert connections == []


# Bad input is refused before anything is written.


def test_facts_that_contradict_themselves_are_refused() -> None:
    parent = Ingredient(encode(ImageFormat.PNG), "images/p")
    with pytest.raises(ValueError, match="no parents"):
        generation(parents=(parent,))
    with pytest.raises(ValueError, match="at least one parent"):
        generation(origin=Origin.EDITED)
    with pytest.raises(ValueError, match="timezone-aware"):
        generation(created=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="converted_from"):
        replace(edit((parent,)), converted_from=parent)
    with pytest.raises(ValueError, match="usage_notice"):
        generation(usage_notice="  ")
    with pytest.raises(ValueError, match="title"):
        generation(title="x" * 513)
    with pytest.raises(ValueError, match="control characters"):
        Ingredient(b"data", "bad\ntitle")
    with pytest.raises(ValueError, match="bytes"):
        Ingredient(b"", "images/p")


def test_bytes_of_another_format_are_refused(marker: ProvenanceMarker) -> None:
    with pytest.raises(ValueError, match="png, not jpeg"):
        marker.mark(encode(ImageFormat.PNG), ImageFormat.JPEG, generation())
    with pytest.raises(ValueError, match="not an image"):
        marker.mark(b"plain text", ImageFormat.PNG, generation())
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP"):
        read_marks(b"plain text")


def test_a_truncated_image_fails_as_a_provenance_error(marker: ProvenanceMarker) -> None:
    truncated = encode(ImageFormat.PNG)[:40]
    with pytest.raises(ProvenanceError):
        marker.mark(truncated, ImageFormat.PNG, generation())


def test_an_ingredient_that_is_not_an_image_is_refused(marker: ProvenanceMarker) -> None:
    facts = edit((Ingredient(b"not an image", "images/p"),))
    with pytest.raises(ValueError, match="ingredient"):
        marker.mark(encode(ImageFormat.PNG), ImageFormat.PNG, facts)


def test_marks_from_two_threads_at_once_both_verify(marker: ProvenanceMarker, anchors: str) -> None:
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work(fmt: ImageFormat) -> None:
        try:
            for _ in range(5):
                results.append(marker.mark(encode(fmt), fmt, generation()))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(fmt,)) for fmt in FORMATS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(results) == 15
    assert {read_marks(r, trust_anchors_pem=anchors).validation_state for r in results} == {
        "Trusted"
    }


def test_open_marker_makes_the_development_ca_once(tmp_path: Path) -> None:
    settings = ProvenanceSettings(cert=None, key=None, usage_notice=NOTICE)
    first = open_marker(settings, tmp_path)
    second = open_marker(settings, tmp_path)
    assert first.material == second.material
    assert first.material.development


def _with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    chunk = struct.pack(">I", len(body)) + kind + body
    chunk += struct.pack(">I", binascii.crc32(kind + body))
    return png[:33] + chunk + png[33:]  # after the signature and IHDR


def test_the_png_chunk_walk_sends_only_manifest_free_pngs_past_the_reader(
    marker: ProvenanceMarker,
) -> None:
    plain = encode(ImageFormat.PNG)
    assert not _png_may_carry_manifest(plain)
    # Text that cannot hold a manifest reference, and one that may.
    assert not _png_may_carry_manifest(_with_chunk(plain, b"tEXt", b"Comment\0a fox"))
    xmp = b"XML:com.adobe.xmp\0\0\0\0\0<x dcterms:provenance='https://m.example/x'/>"
    assert _png_may_carry_manifest(_with_chunk(plain, b"iTXt", xmp))
    # Compressed text is not read here: the reader decides.
    assert _png_may_carry_manifest(_with_chunk(plain, b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0x"))
    assert _png_may_carry_manifest(_with_chunk(plain, b"zTXt", b"Comment\0\0x"))
    assert _png_may_carry_manifest(_with_chunk(plain, b"caBX", b"jumbf"))
    # A PNG it cannot walk to its end is left to the reader too.
    assert _png_may_carry_manifest(plain[: len(plain) // 2])
    assert _png_may_carry_manifest(marker.mark(plain, ImageFormat.PNG, generation()))
