"""Prompt enhancement (EnhancePrompt): the deterministic local enhancer, and the rule
that every enhancement, local or from a chat model, fits the prompt limits.

The local enhancer keeps the caller's prompt as the subject and appends, for the style
(or neutrally), the first lighting, composition and quality phrase of the phrase book
whose group the prompt does not already speak to; its negative prompt lists the
style's and the neutral unwanted traits that the prompt does not itself ask for. The
same prompt and style always give the same result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imagegen.domain.models import Style
from imagegen.domain.phrases import PhraseBook
from imagegen.domain.validation import MAX_NEGATIVE_PROMPT_CHARS, MAX_PROMPT_CHARS

#: What the local enhancer is called in responses and usage records.
LOCAL_ENHANCER = "local"
#: The usage record's provider for every enhancement (its model is the enhancer).
ENHANCER_PROVIDER = "enhancer"

#: Control characters a prompt may not hold (line breaks and tabs may stay).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t]+")
#: Words too common, or naming a group itself, to tell whether a prompt already speaks
#: to a group ("golden hour" is a lighting choice with or without "lighting").
_COMMON = frozenset(
    {"a", "an", "and", "the", "of", "with", "in", "on", "style", "view", "shot"}
    | {"light", "lighting", "composition", "framing", "quality"}
)


@dataclass(frozen=True)
class EnhancedText:
    """A richer prompt and a proposed negative prompt, within the prompt limits."""

    prompt: str
    negative_prompt: str


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _COMMON}


def enhance_locally(prompt: str, style: Style | None, book: PhraseBook) -> EnhancedText:
    """The prompt with the style's lighting, composition and quality phrases added, and a
    negative prompt; deterministic."""
    base = _SPACES.sub(" ", prompt.strip()).rstrip(" ,.;:")
    phrases = book.for_style(style)
    have = _words(base)
    enhanced = base
    for group, neutral_group in zip(phrases.groups(), book.neutral.groups(), strict=True):
        # A prompt that already names a phrase of the group (by its telling words, in
        # this style or none) keeps its own choice.
        if any(_words(p) and _words(p) <= have for p in (*group, *neutral_group)):
            continue
        for phrase in group:
            if phrase.lower() not in enhanced.lower():
                longer = f"{enhanced}, {phrase}" if enhanced else phrase
                # The caller's own words are never cut for a phrase.
                if len(longer) <= MAX_PROMPT_CHARS:
                    enhanced = longer
                break
    negatives: list[str] = []
    for term in (*phrases.negative, *book.neutral.negative):
        # Never negate what the caller asked for ("a blurry photo" keeps its blur).
        if term not in negatives and not (_words(term) and _words(term) <= have):
            negatives.append(term)
    return fit_to_limits(enhanced, ", ".join(negatives))


def fit_text(text: str, limit: int) -> str:
    """The text without control characters (line breaks and tabs stay), trimmed, and cut
    to at most `limit` characters, at a comma or a space when one is in its second half."""
    cleaned = _CONTROL.sub("", text).strip()
    if len(cleaned) <= limit:
        return cleaned
    cut = cleaned[:limit]
    for boundary in (", ", " "):
        at = cut.rfind(boundary)
        if at >= limit // 2:
            cut = cut[:at]
            break
    return cut.rstrip(" ,;:")


def fit_to_limits(prompt: str, negative_prompt: str) -> EnhancedText:
    """An enhancement cut to the prompt limits: 4000 characters for the prompt, 1000 for
    the negative prompt."""
    return EnhancedText(
        prompt=fit_text(prompt, MAX_PROMPT_CHARS),
        negative_prompt=fit_text(negative_prompt, MAX_NEGATIVE_PROMPT_CHARS),
    )
