"""The built-in style and composition phrases (prompt_phrases.json beside this module):
per style preset, and `neutral` for none, the lighting, composition and quality phrases
that the local enhancer adds and SuggestPrompts offers, best first, and what a proposed
negative prompt lists."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from imagegen.domain.models import Style

NEUTRAL = "neutral"
GROUPS = ("lighting", "composition", "quality")


@dataclass(frozen=True)
class StylePhrases:
    """One style's phrases by group, best first."""

    lighting: tuple[str, ...]
    composition: tuple[str, ...]
    quality: tuple[str, ...]
    negative: tuple[str, ...]

    def groups(self) -> tuple[tuple[str, ...], ...]:
        """lighting, composition and quality, in that order."""
        return (self.lighting, self.composition, self.quality)


@dataclass(frozen=True)
class PhraseBook:
    """The phrases of every style and of none (`neutral`)."""

    neutral: StylePhrases
    styles: dict[Style, StylePhrases]

    def for_style(self, style: Style | None) -> StylePhrases:
        """The style's phrases; the neutral ones for no style."""
        return self.neutral if style is None else self.styles[style]

    @classmethod
    def from_json(cls, text: str) -> PhraseBook:
        """Parse the phrase file; ValueError naming what is missing (every style needs
        every group, each with at least one phrase)."""
        data = json.loads(text)

        def entry(name: str) -> StylePhrases:
            found = data.get(name) or {}
            groups: dict[str, tuple[str, ...]] = {}
            for group in (*GROUPS, "negative"):
                phrases = found.get(group)
                if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
                    raise ValueError(f"{name!r} needs a non-empty list of {group} phrases")
                groups[group] = tuple(p.strip() for p in phrases)
            return StylePhrases(**groups)

        return cls(neutral=entry(NEUTRAL), styles={style: entry(style.value) for style in Style})


@cache
def builtin_phrases() -> PhraseBook:
    """The phrase book shipped with the package (read once)."""
    text = resources.files("imagegen.domain").joinpath("prompt_phrases.json").read_text("utf-8")
    return PhraseBook.from_json(text)
