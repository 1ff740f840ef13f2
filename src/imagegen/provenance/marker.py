"""Marking an encoded image: XMP fields first, then a signed C2PA manifest over the result.

The order matters: the manifest's hard binding hashes every byte outside the manifest
itself, XMP included, so XMP written after signing would break it (and is protected by
it when written before).

Offline by construction: no timestamp authority, no OCSP, no remote manifests, and the
C2PA library's network allow-list is empty. No thumbnail is embedded (encoding one would
cost more than the rest of the mark and the image is its own preview). No prompt text is
embedded: the marks say how the image was made, not what was asked for.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
from datetime import UTC, datetime
from typing import Any

import c2pa

from imagegen.config import ConfigError
from imagegen.domain.models import ImageFormat
from imagegen.imaging import sniff_format
from imagegen.provenance.facts import (
    GENERATOR_NAME,
    Ingredient,
    Origin,
    ProvenanceFacts,
)
from imagegen.provenance.signing import SigningMaterial
from imagegen.provenance.xmp import XmpError, XmpFields, embed_xmp

#: Our own assertion: what the C2PA actions do not hold (the parents' content hashes).
IMAGEGEN_ASSERTION = "org.imagegen.provenance"
ACTIONS_ASSERTION = "c2pa.actions.v2"
METADATA_ASSERTION = "c2pa.metadata"

_PARENT_LABEL = "parent-{index}"
_CONVERTED_FROM_LABEL = "converted-from"
_PROVIDER_OUTPUT_LABEL = "provider-output"
_PROVIDER_OUTPUT_TITLE = "provider output"


#: The PNG chunk C2PA embeds a manifest store in.
_PNG_MANIFEST_CHUNKS = frozenset({b"caBX"})
#: The text chunks XMP rides in, where dcterms:provenance may name a remote manifest.
_PNG_TEXT_CHUNKS = frozenset({b"iTXt", b"tEXt", b"zTXt"})


def _png_may_carry_manifest(data: bytes) -> bool:
    """False only when the PNG's chunks show no manifest: no caBX chunk and no text chunk
    that mentions provenance. Anything it cannot walk is left to the C2PA reader."""
    position = 8
    size = len(data)
    while position + 8 <= size:
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body_end = position + 8 + length
        if kind in _PNG_MANIFEST_CHUNKS:
            return True
        if kind in _PNG_TEXT_CHUNKS:
            body = data[position + 8 : body_end]
            if kind == b"zTXt" or b"provenance" in body:
                return True
            if kind == b"iTXt":
                keyword_end = body.find(b"\0")
                if keyword_end < 0 or body[keyword_end + 1 : keyword_end + 2] != b"\0":
                    return True  # compressed international text: unreadable here
        if kind == b"IEND":
            return False
        position = body_end + 4
    return True


class ProvenanceError(RuntimeError):
    """The image could not be marked (bad signing material, or bytes that the metadata
    libraries cannot rewrite). Never the caller's fault once the image was accepted."""


def c2pa_settings(
    trust_anchors_pem: str | None, *, verify: bool = True, verify_after_sign: bool = True
) -> dict[str, Any]:
    """Settings for every C2PA context we open: nothing may reach the network."""
    settings: dict[str, Any] = {
        "version": 1,
        "core": {"allowed_network_hosts": []},
        "verify": {
            "remote_manifest_fetch": False,
            "ocsp_fetch": False,
            "verify_after_reading": verify,
            "verify_after_sign": verify_after_sign,
        },
        "builder": {"thumbnail": {"enabled": False}},
    }
    if trust_anchors_pem:
        settings["trust"] = {"user_anchors": trust_anchors_pem}
    return settings


class ProvenanceMarker:
    """Writes the provenance marks into images. Thread-safe; `mark` is synchronous and
    CPU-bound, so async callers run it in a worker thread."""

    def __init__(self, material: SigningMaterial, *, generator_version: str = "") -> None:
        self._material = material
        self._generator_version = generator_version or _server_version()
        # No verification after each signature: it hashes the whole asset again (about a
        # fifth of a 1024x1024 PNG's mark, bench/README.md) to re-prove what `check`
        # proves once at start-up by reading a signed probe back: that this material
        # signs manifests that validate.
        self._settings = c2pa_settings(material.trust_anchors_pem, verify_after_sign=False)
        self._probe_settings = c2pa_settings(material.trust_anchors_pem, verify=False)

    @property
    def material(self) -> SigningMaterial:
        """The key and chain this marker signs with."""
        return self._material

    @property
    def generator(self) -> str:
        """`imagegen <version>`, as the marks name the software."""
        return f"{GENERATOR_NAME} {self._generator_version}"

    def mark(self, data: bytes, fmt: ImageFormat, facts: ProvenanceFacts) -> bytes:
        """`data` (an encoded `fmt` image) with XMP fields and a signed C2PA manifest.

        Pixel data is untouched: only metadata chunks/segments are added. Raises
        ValueError when `data` is not a `fmt` image, ProvenanceError when marking fails.
        """
        found = sniff_format(data)
        if found is not fmt:
            raise ValueError(
                f"the bytes are {found.value if found else 'not an image'}, not {fmt.value}"
            )
        try:
            with_xmp = embed_xmp(data, self._xmp_fields(facts))
        except XmpError as exc:
            raise ProvenanceError(str(exc)) from exc
        try:
            return self._sign(data, with_xmp, fmt, facts)
        except c2pa.C2paError as exc:
            raise ProvenanceError(f"C2PA signing failed: {exc}") from exc

    def check(self) -> None:
        """Sign a tiny image once, so bad signing material fails at start-up (ConfigError)
        rather than on the first generation."""
        from imagegen.provenance.report import read_marks

        probe = _ONE_PIXEL_PNG
        facts = ProvenanceFacts(
            origin=Origin.GENERATED,
            provider_id="self-check",
            model="self-check",
            created=datetime.now(UTC),
            usage_notice="self-check",
        )
        try:
            marked = self.mark(probe, ImageFormat.PNG, facts)
        except ProvenanceError as exc:
            raise ConfigError(
                f"the C2PA signing certificate and key do not sign: {exc} (C2PA wants a leaf "
                "issued by a CA, with the digitalSignature key usage, an extended key usage "
                "such as emailProtection or documentSigning, and an authority key identifier)"
            ) from None
        report = read_marks(marked, trust_anchors_pem=self._material.trust_anchors_pem)
        if report.validation_state not in ("Valid", "Trusted"):
            raise ConfigError(
                "a manifest signed with the C2PA certificate and key does not validate: "
                + "; ".join(report.failures or ("no validation state",))
            )

    def _xmp_fields(self, facts: ProvenanceFacts) -> XmpFields:
        return XmpFields(
            digital_source_type=facts.digital_source_type,
            usage_terms=facts.usage_notice,
            rights=facts.usage_notice,
            creator_tool=self.generator,
            create_date=_iso(facts),
        )

    def _sign(
        self, original: bytes, data: bytes, fmt: ImageFormat, facts: ProvenanceFacts
    ) -> bytes:
        mime = fmt.mime_type
        # The pipeline marks what it stores, whose metadata (a provider's manifest
        # included) is already gone; the reply as it came tells whether there was one.
        original = facts.provider_output or original
        provider_signed = self._carries_manifest(original, _mime_of(original))
        software_agent = {"name": GENERATOR_NAME, "version": self._generator_version}
        parameters = {"provider": facts.provider_id, "model": facts.model}
        ingredients: list[tuple[dict[str, Any], Ingredient]] = []
        actions: list[dict[str, Any]] = []
        if facts.converted_from is not None:
            ingredients.append(
                (
                    _ingredient_json(facts.converted_from, "parentOf", _CONVERTED_FROM_LABEL),
                    facts.converted_from,
                )
            )
            actions.append(_uses("c2pa.opened", _CONVERTED_FROM_LABEL))
            final_action = "c2pa.converted"
        elif facts.origin is Origin.GENERATED:
            actions.append(
                {
                    "action": "c2pa.created",
                    "when": _iso(facts),
                    "digitalSourceType": facts.digital_source_type,
                    "softwareAgent": software_agent,
                    "parameters": parameters,
                }
            )
            final_action = ""
        else:
            for index, parent in enumerate(facts.parents):
                label = _PARENT_LABEL.format(index=index)
                relationship = "parentOf" if index == 0 else "componentOf"
                ingredients.append((_ingredient_json(parent, relationship, label), parent))
                actions.append(_uses("c2pa.opened" if index == 0 else "c2pa.placed", label))
            final_action = "c2pa.edited"
        if provider_signed:
            # The provider signed its output (OpenAI does): keep its manifest in our chain
            # as a placed component instead of overwriting it.
            provider_output = Ingredient(data=original, title=_PROVIDER_OUTPUT_TITLE)
            ingredients.append(
                (
                    _ingredient_json(provider_output, "componentOf", _PROVIDER_OUTPUT_LABEL),
                    provider_output,
                )
            )
            actions.append(_uses("c2pa.placed", _PROVIDER_OUTPUT_LABEL))
        if final_action:
            actions.append(
                {
                    "action": final_action,
                    "when": _iso(facts),
                    "digitalSourceType": facts.digital_source_type,
                    "softwareAgent": software_agent,
                    "parameters": parameters,
                }
            )
        manifest = {
            "claim_generator_info": [software_agent],
            "title": facts.title or f"{GENERATOR_NAME} {facts.origin.value} image",
            "format": mime,
            "assertions": [
                {"label": ACTIONS_ASSERTION, "data": {"actions": actions}},
                {"label": METADATA_ASSERTION, "data": self._metadata(facts)},
                {"label": IMAGEGEN_ASSERTION, "data": _imagegen_assertion(facts)},
            ],
        }
        with c2pa.Context.from_dict(self._settings) as context:
            builder = c2pa.Builder(manifest, context=context)
            try:
                for ingredient_json, ingredient in ingredients:
                    builder.add_ingredient(
                        ingredient_json, _mime_of(ingredient.data), io.BytesIO(ingredient.data)
                    )
                with self._signer() as signer:
                    output = io.BytesIO()
                    builder.sign(signer, mime, io.BytesIO(data), output)
            finally:
                builder.close()
        return output.getvalue()

    def _signer(self) -> c2pa.Signer:
        # One per call: cheap (well under a millisecond) and never shared across threads.
        return c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(
                self._material.algorithm,
                self._material.certificate_chain_pem.encode(),
                self._material.private_key_pem.encode(),
                None,
            )
        )

    def _carries_manifest(self, data: bytes, mime: str) -> bool:
        if mime == "image/png" and not _png_may_carry_manifest(data):
            # Opening a reader on a PNG hashes it (about 1.5 ms for 1.6 MiB); walking its
            # chunk headers answers for nearly every reply in microseconds.
            return False
        with c2pa.Context.from_dict(self._probe_settings) as context:
            try:
                reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
            except c2pa.C2paError:
                # A manifest is there but unreadable here (remote, damaged): still the
                # provider's claim, which the ingredient records with its status.
                return True
            if reader is None:
                return False
            reader.close()
            return True

    def _metadata(self, facts: ProvenanceFacts) -> dict[str, Any]:
        # The same facts as the XMP packet, inside the signed manifest where C2PA tools
        # show them.
        return {
            "@context": {
                "dc": "http://purl.org/dc/elements/1.1/",
                "xmp": "http://ns.adobe.com/xap/1.0/",
                "xmpRights": "http://ns.adobe.com/xap/1.0/rights/",
                "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
            },
            "Iptc4xmpExt:DigitalSourceType": facts.digital_source_type,
            "dc:rights": facts.usage_notice,
            "xmpRights:UsageTerms": facts.usage_notice,
            "xmp:CreatorTool": self.generator,
            "xmp:CreateDate": _iso(facts),
        }


def _uses(action: str, ingredient_label: str) -> dict[str, Any]:
    return {"action": action, "parameters": {"ingredientIds": [ingredient_label]}}


def _ingredient_json(ingredient: Ingredient, relationship: str, label: str) -> dict[str, Any]:
    return {"title": ingredient.title, "relationship": relationship, "label": label}


def _imagegen_assertion(facts: ProvenanceFacts) -> dict[str, Any]:
    sources = list(facts.parents)
    if facts.converted_from is not None:
        sources.append(facts.converted_from)
    return {
        "origin": facts.origin.value,
        "provider": facts.provider_id,
        "model": facts.model,
        "created": _iso(facts),
        "ingredients": [
            {
                "title": source.title,
                "format": _mime_of(source.data),
                "sha256": hashlib.sha256(source.data).hexdigest(),
            }
            for source in sources
        ],
    }


def _mime_of(data: bytes) -> str:
    found = sniff_format(data)
    if found is None:
        raise ValueError("an ingredient is not a PNG, JPEG or WebP image")
    return found.mime_type


def _iso(facts: ProvenanceFacts) -> str:
    return facts.created.isoformat(timespec="seconds")


# A white 1x1 PNG for the start-up check (made once with Pillow; any valid PNG does).
_ONE_PIXEL_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478"
    "9c63f8ffff3f0005fe02fe0def46b80000000049454e44ae426082"
)


def _server_version() -> str:
    """The installed server distribution's version (the generator named in marks)."""
    try:
        return importlib.metadata.version("imagegen")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
