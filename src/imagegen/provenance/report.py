"""Reading the marks back: what an image says about its provenance, and whether the C2PA
manifest verifies. Used by tests and by `imagegen provenance FILE`. Offline, like marking:
a manifest kept at a remote URL is reported, never fetched."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import c2pa

from imagegen.imaging import sniff_format
from imagegen.provenance.marker import IMAGEGEN_ASSERTION, c2pa_settings
from imagegen.provenance.xmp import XmpError, XmpFields, read_xmp


@dataclass(frozen=True)
class IngredientReport:
    """One ingredient of the active manifest."""

    title: str
    format: str
    #: parentOf (the image that was edited or converted) or componentOf (placed into it).
    relationship: str
    #: SHA-256 of the ingredient's bytes as imagegen recorded them; empty if not ours.
    sha256: str
    #: The ingredient's own manifest, when it carried one (the chain continues there).
    manifest_label: str


@dataclass(frozen=True)
class ProvenanceReport:
    """What `read_marks` found. `validation_state` is Trusted (signature valid and the
    signer chains to a trust anchor), Valid (signature valid, signer not trusted here),
    Invalid, or empty when there is no readable manifest."""

    has_manifest: bool
    validation_state: str
    #: Validation failures as `code: explanation`.
    failures: tuple[str, ...]
    #: Why a manifest could not be read (remote, damaged); empty otherwise.
    manifest_error: str
    #: The active manifest's label (`urn:c2pa:...`), which an edit's ingredient names.
    label: str
    title: str
    claim_generator: str
    signer: str
    #: The IPTC digital source type the C2PA actions declare.
    digital_source_type: str
    actions: tuple[str, ...]
    provider: str
    model: str
    created: str
    ingredients: tuple[IngredientReport, ...]
    xmp: XmpFields = field(default_factory=XmpFields)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)


def read_marks(data: bytes, *, trust_anchors_pem: str | None = None) -> ProvenanceReport:
    """The C2PA and XMP marks in `data`; `trust_anchors_pem` are the roots to trust
    (e.g. the development CA). Raises ValueError for bytes that are not PNG/JPEG/WebP."""
    found = sniff_format(data)
    if found is None:
        raise ValueError("the bytes are not a PNG, JPEG or WebP image")
    try:
        xmp = read_xmp(data)
    except XmpError:
        xmp = XmpFields()
    with c2pa.Context.from_dict(c2pa_settings(trust_anchors_pem)) as context:
        try:
            reader = c2pa.Reader.try_create(found.mime_type, io.BytesIO(data), None, context)
        except c2pa.C2paError as exc:
            return _empty(xmp, has_manifest=True, manifest_error=str(exc))
        if reader is None:
            return _empty(xmp, has_manifest=False, manifest_error="")
        with reader:
            store = json.loads(reader.json())
    return _report(store, xmp)


def _empty(xmp: XmpFields, *, has_manifest: bool, manifest_error: str) -> ProvenanceReport:
    return ProvenanceReport(
        has_manifest=has_manifest,
        validation_state="",
        failures=(),
        manifest_error=manifest_error,
        label="",
        title="",
        claim_generator="",
        signer="",
        digital_source_type="",
        actions=(),
        provider="",
        model="",
        created="",
        ingredients=(),
        xmp=xmp,
    )


def _report(store: dict[str, Any], xmp: XmpFields) -> ProvenanceReport:
    manifests: dict[str, Any] = store.get("manifests") or {}
    active: dict[str, Any] = manifests.get(store.get("active_manifest") or "", {})
    assertions = {
        item.get("label"): item.get("data") or {} for item in active.get("assertions", [])
    }
    actions: list[dict[str, Any]] = []
    for label in ("c2pa.actions.v2", "c2pa.actions"):
        actions.extend(assertions.get(label, {}).get("actions", []))
    ours: dict[str, Any] = assertions.get(IMAGEGEN_ASSERTION, {})
    recorded = list(ours.get("ingredients", []))
    ingredients = []
    for ingredient in active.get("ingredients", []):
        title = str(ingredient.get("title", ""))
        sha256 = ""
        for index, entry in enumerate(recorded):
            if entry.get("title") == title:
                sha256 = str(entry.get("sha256", ""))
                del recorded[index]
                break
        ingredients.append(
            IngredientReport(
                title=title,
                format=str(ingredient.get("format", "")),
                relationship=str(ingredient.get("relationship", "")),
                sha256=sha256,
                manifest_label=str(ingredient.get("active_manifest", "")),
            )
        )
    generators = active.get("claim_generator_info") or [{}]
    signature = active.get("signature_info") or {}
    return ProvenanceReport(
        has_manifest=True,
        validation_state=str(store.get("validation_state", "")),
        failures=_failures(store.get("validation_results") or {}),
        manifest_error="",
        label=str(store.get("active_manifest", "")),
        title=str(active.get("title", "")),
        claim_generator=" ".join(
            str(part) for part in (generators[0].get("name"), generators[0].get("version")) if part
        ),
        signer=" / ".join(
            str(part) for part in (signature.get("common_name"), signature.get("issuer")) if part
        ),
        digital_source_type=next(
            (str(a["digitalSourceType"]) for a in actions if a.get("digitalSourceType")), ""
        ),
        actions=tuple(str(a.get("action", "")) for a in actions),
        provider=str(ours.get("provider", "")),
        model=str(ours.get("model", "")),
        created=str(ours.get("created", "")),
        ingredients=tuple(ingredients),
        xmp=xmp,
    )


def _failures(results: dict[str, Any]) -> tuple[str, ...]:
    found = [
        f"{item.get('code')}: {item.get('explanation', '')}"
        for item in (results.get("activeManifest") or {}).get("failure", [])
    ]
    for delta in results.get("ingredientDeltas") or []:
        found.extend(
            f"{item.get('code')}: {item.get('explanation', '')}"
            for item in (delta.get("validationDeltas") or {}).get("failure", [])
        )
    return tuple(found)


def format_report(report: ProvenanceReport) -> str:
    """The report as text for a terminal (what `imagegen provenance FILE` prints)."""
    lines: list[str] = []
    if not report.has_manifest:
        lines.append("C2PA manifest: none")
    elif report.manifest_error:
        lines.append(f"C2PA manifest: unreadable ({report.manifest_error})")
    else:
        lines.append(f"C2PA manifest: {report.validation_state} ({report.label})")
        lines += [
            f"  title: {report.title}",
            f"  claim generator: {report.claim_generator}",
            f"  signer: {report.signer}",
            f"  digital source type: {report.digital_source_type}",
            f"  actions: {', '.join(report.actions)}",
            f"  provider: {report.provider or '-'}, model: {report.model or '-'}",
            f"  created: {report.created or '-'}",
        ]
        for ingredient in report.ingredients:
            lines.append(
                f"  ingredient ({ingredient.relationship}): {ingredient.title} "
                f"[{ingredient.format}]"
                + (f" sha256 {ingredient.sha256}" if ingredient.sha256 else "")
                + (f" manifest {ingredient.manifest_label}" if ingredient.manifest_label else "")
            )
        lines += [f"  failure: {failure}" for failure in report.failures]
    xmp = report.xmp
    lines += [
        "XMP:",
        f"  Iptc4xmpExt:DigitalSourceType: {xmp.digital_source_type or '-'}",
        f"  xmpRights:UsageTerms: {xmp.usage_terms or '-'}",
        f"  dc:rights: {xmp.rights or '-'}",
        f"  xmp:CreatorTool: {xmp.creator_tool or '-'}",
        f"  xmp:CreateDate: {xmp.create_date or '-'}",
    ]
    return "\n".join(lines)
