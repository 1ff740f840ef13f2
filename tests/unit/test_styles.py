"""The seed's style presets in the contract (issue 9 item 2): every contract value reaches
a domain preset and comes back as itself, each preset has words of its own that the
prompt-only providers fold in, and the two presets named differently from the seed say
which of the seed's they stand for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from imagegen.v1 import common_pb2

from imagegen.api.convert import all_styles_proto, style_from_proto
from imagegen.domain.models import Style
from imagegen.providers.prompting import STYLE_WORDS, fold_prompt

ROOT = Path(__file__).resolve().parents[2]
#: The seed's presets (its `ImageStyle`), and the contract value each one is.
SEED_PRESETS = {
    "photorealistic": common_pb2.STYLE_PHOTOGRAPHIC,
    "artistic": common_pb2.STYLE_ARTISTIC,
    "illustration": common_pb2.STYLE_DIGITAL_ART,
    "cartoon": common_pb2.STYLE_CARTOON,
    "abstract": common_pb2.STYLE_ABSTRACT,
    "minimalist": common_pb2.STYLE_MINIMALIST,
    "vintage": common_pb2.STYLE_VINTAGE,
    "modern": common_pb2.STYLE_MODERN,
}
CONTRACT_STYLES = [
    value
    for value in common_pb2.Style.DESCRIPTOR.values_by_number
    if value != common_pb2.STYLE_UNSPECIFIED
]


@pytest.mark.parametrize("value", CONTRACT_STYLES, ids=common_pb2.Style.Name)
def test_every_contract_style_is_a_preset_and_listed(value: int) -> None:
    style = style_from_proto(value)  # type: ignore[arg-type]
    assert style is not None
    assert value in all_styles_proto(), "ListProviders offers every preset"


def test_presets_and_contract_values_are_one_to_one() -> None:
    assert len({style_from_proto(v) for v in CONTRACT_STYLES}) == len(CONTRACT_STYLES)
    assert {style_from_proto(v) for v in CONTRACT_STYLES} == set(Style)
    assert sorted(all_styles_proto()) == sorted(CONTRACT_STYLES)


@pytest.mark.parametrize("seed_name", SEED_PRESETS)
def test_each_seed_preset_reads_as_itself_when_folded(seed_name: str) -> None:
    style = style_from_proto(SEED_PRESETS[seed_name])  # type: ignore[arg-type]
    assert style is not None
    folded = fold_prompt("a fox", style=style)
    # The words a prompt-only provider receives name the preset (the two renamed ones
    # by the contract's own name for them).
    own_word = {"photorealistic": "photographic", "illustration": "illustration"}.get(
        seed_name, seed_name
    )
    assert own_word in folded, folded


def test_every_preset_has_words_of_its_own() -> None:
    assert set(STYLE_WORDS) == set(Style)
    words = [STYLE_WORDS[style].strip() for style in Style]
    assert all(words) and len(set(words)) == len(words)


def test_the_renamed_presets_say_which_seed_preset_they_stand_for() -> None:
    proto = (ROOT / "proto" / "imagegen" / "v1" / "common.proto").read_text()

    def comment_above(value_name: str) -> str:
        match = re.search(rf"((?:\s*//[^\n]*\n)+)\s*{value_name} = \d+;", proto)
        assert match, value_name
        return match.group(1)

    assert "photorealistic" in comment_above("STYLE_PHOTOGRAPHIC")
    assert "illustration" in comment_above("STYLE_DIGITAL_ART")
