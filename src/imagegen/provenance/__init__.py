"""AI-provenance marks on every image: a signed C2PA manifest and IPTC/XMP fields.

The composition root builds one `ProvenanceMarker` with `open_marker(settings.provenance,
settings.data_dir)`; the pipeline calls `marker.mark(data, fmt, facts)` in a worker thread
for every image it stores or converts. `read_marks` reads them back.
"""

from __future__ import annotations

from pathlib import Path

from imagegen.config import ProvenanceSettings
from imagegen.provenance.facts import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
    Ingredient,
    Origin,
    ProvenanceFacts,
)
from imagegen.provenance.marker import ProvenanceError, ProvenanceMarker
from imagegen.provenance.report import (
    IngredientReport,
    ProvenanceReport,
    format_report,
    read_marks,
)
from imagegen.provenance.signing import (
    DEV_CA_FILE,
    SigningMaterial,
    load_signing_material,
)
from imagegen.provenance.xmp import XmpFields

__all__ = [
    "COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA",
    "DEV_CA_FILE",
    "TRAINED_ALGORITHMIC_MEDIA",
    "Ingredient",
    "IngredientReport",
    "Origin",
    "ProvenanceError",
    "ProvenanceFacts",
    "ProvenanceMarker",
    "ProvenanceReport",
    "SigningMaterial",
    "XmpFields",
    "format_report",
    "load_signing_material",
    "open_marker",
    "read_marks",
]


def open_marker(settings: ProvenanceSettings, data_dir: Path) -> ProvenanceMarker:
    """The marker for this deployment: its configured chain and key, or the development CA
    in `data_dir` (made on first use). Signs a test image once; raises ConfigError when
    the material cannot sign. Blocking (file I/O, key generation on first use)."""
    marker = ProvenanceMarker(load_signing_material(settings, data_dir))
    marker.check()
    return marker
