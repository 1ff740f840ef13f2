"""Prompt suggestions (SuggestPrompts): what a request may ask, and how candidates from
the caller's own prompts, the templates they can see and the built-in phrases are
ranked, merged and de-duplicated. Pure functions over what the repository found.

A candidate's score adds up:

    match     how it contains the typed text: from its start 1.0, at a word's start
              0.75, anywhere 0.5 (weighted 2); nothing typed: 0
    kept      own prompts only: 1 when one of its images is a favourite and not
              deleted, down to -1 when all its images were deleted (weighted 1.5)
    style     0.3 when it was used with (or, for a template, is of) the asked style
    recency   up to 0.2, halving every 30 days since the prompt was last used
    use       up to 0.1 with the images it made (a template: times it was used)
    template  0.5 for a template (a curated prompt)
    phrase    0.2 to 0.5 for a built-in phrase (the style's own ones higher)

so a prompt whose images were kept outranks, at an equal match, any whose images were
deleted, and even one that matches better but was never kept or was deleted.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import datetime

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import Style
from imagegen.domain.phrases import PhraseBook
from imagegen.domain.validation import MAX_PROMPT_CHARS, check_text

MAX_SUGGESTIONS = 50
DEFAULT_SUGGESTIONS = 10

MATCH_WEIGHT = 2.0
KEPT_WEIGHT = 1.5
STYLE_BONUS = 0.3
RECENCY_BONUS = 0.2
RECENCY_HALF_LIFE_DAYS = 30.0
USE_BONUS = 0.1
TEMPLATE_BONUS = 0.5
PHRASE_SCORE = 0.2
STYLE_PHRASE_BONUS = 0.3

#: The typed text has a run of three letters or digits: enough for a trigram search.
_SEARCHABLE = re.compile(r"\w{3}")
_SPACES = re.compile(r"\s+")


class SuggestionSource(enum.StrEnum):
    """Where a suggestion comes from."""

    HISTORY = "history"
    TEMPLATE = "template"
    PHRASE = "phrase"


@dataclass(frozen=True)
class PastPrompt:
    """One of the caller's own prompts, and what became of the images it made."""

    prompt: str
    style: str
    images_made: int
    live_images: int
    kept_images: int
    deleted_images: int
    last_used_at: datetime


@dataclass(frozen=True)
class TemplateMatch:
    """A template the caller can see whose prompt or name contains the text."""

    template_id: str
    prompt: str
    display_name: str
    style: str
    usage_count: int


@dataclass(frozen=True)
class Suggestion:
    """One ranked completion."""

    text: str
    source: SuggestionSource
    score: float
    template_id: str = ""


def check_suggest_request(text: str, limit: int) -> int:
    """IMG_003 for text over 4000 characters or with control characters (line breaks and
    tabs pass), or a limit outside 0 to 50; returns the limit to use (0 means 10)."""
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"text has {len(text)} characters; send at most {MAX_PROMPT_CHARS}",
            field="text",
            metadata={"limit": str(MAX_PROMPT_CHARS)},
        )
    check_text(text, "text", multiline=True)
    if not 0 <= limit <= MAX_SUGGESTIONS:
        raise InvalidRequest(
            f"limit is {limit}; ask for 1 to {MAX_SUGGESTIONS} suggestions (0 for "
            f"{DEFAULT_SUGGESTIONS})",
            field="limit",
            metadata={"min": "0", "max": str(MAX_SUGGESTIONS)},
        )
    return limit or DEFAULT_SUGGESTIONS


def prompt_key(text: str) -> str:
    """What prompts are compared and de-duplicated by: lower case, runs of whitespace
    as one space (the database's prompt_history_key does the same)."""
    return _SPACES.sub(" ", text.strip()).lower()


def searchable(text: str) -> bool:
    """Whether the text is long enough to be looked for anywhere in a prompt (a run of
    three letters or digits); shorter texts complete only from a prompt's start."""
    return _SEARCHABLE.search(text) is not None


def match_strength(candidate_key: str, text_key: str) -> float | None:
    """1.0 if the candidate starts with the text, 0.75 if a word of it does, 0.5 if it
    contains it anywhere, None if not at all; 0.0 for an empty text."""
    if not text_key:
        return 0.0
    if candidate_key.startswith(text_key):
        return 1.0
    at = candidate_key.find(text_key)
    if at < 0:
        return None
    while at >= 0:
        if not candidate_key[at - 1].isalnum():
            return 0.75
        at = candidate_key.find(text_key, at + 1)
    return 0.5


def kept_signal(prompt: PastPrompt) -> float:
    """1 when an image of the prompt is kept (favourite, not deleted); else minus the
    share of its images that were deleted (-1 when all were)."""
    if prompt.kept_images > 0:
        return 1.0
    seen = prompt.live_images + prompt.deleted_images
    return -prompt.deleted_images / seen if seen else 0.0


def _recency(last_used_at: datetime, now: datetime) -> float:
    age_days = max((now - last_used_at).total_seconds(), 0.0) / 86400
    return RECENCY_BONUS * math.pow(0.5, age_days / RECENCY_HALF_LIFE_DAYS)


def _use(count: int) -> float:
    return USE_BONUS * min(math.log2(1 + max(count, 0)) / 4, 1.0)


def history_score(
    prompt: PastPrompt, text_key: str, style: Style | None, now: datetime
) -> float | None:
    """The score of one of the caller's prompts; None when it does not contain the text."""
    match = match_strength(prompt_key(prompt.prompt), text_key)
    if match is None:
        return None
    score = MATCH_WEIGHT * match + KEPT_WEIGHT * kept_signal(prompt)
    if style is not None and prompt.style == style.value:
        score += STYLE_BONUS
    return score + _recency(prompt.last_used_at, now) + _use(prompt.images_made)


def template_score(template: TemplateMatch, text_key: str, style: Style | None) -> float | None:
    """The score of a visible template; None when neither its prompt nor its name
    contains the text."""
    matches = [
        m
        for m in (
            match_strength(prompt_key(template.prompt), text_key),
            match_strength(prompt_key(template.display_name), text_key),
        )
        if m is not None
    ]
    if not matches:
        return None
    score = MATCH_WEIGHT * max(matches) + TEMPLATE_BONUS
    if style is not None and template.style == style.value:
        score += STYLE_BONUS
    return score + _use(template.usage_count)


def phrase_suggestions(text: str, style: Style | None, book: PhraseBook) -> list[Suggestion]:
    """The text completed or continued with built-in phrases (the style's own first,
    then the neutral ones):

    - nothing typed: the phrases themselves;
    - the last comma-separated part is the start of a phrase ("a fox, gold"): that part
      completed ("a fox, golden hour lighting");
    - otherwise (the part is finished, or no phrase starts with it): phrases appended
      after a comma ("a fox" -> "a fox, soft natural lighting").

    A phrase the text already holds is not offered again, nor a result over 4000
    characters."""
    ordered: list[tuple[str, bool]] = []
    seen: set[str] = set()
    own = book.for_style(style)
    for phrases, is_style in ((own, style is not None), (book.neutral, False)):
        for group in phrases.groups():
            for phrase in group:
                if phrase.lower() not in seen:
                    seen.add(phrase.lower())
                    ordered.append((phrase, is_style))

    def score(index: int, is_style: bool) -> float:
        return PHRASE_SCORE + (STYLE_PHRASE_BONUS if is_style else 0.0) - 0.001 * index

    text_lower = text.lower()
    if not text.strip():
        return [
            Suggestion(phrase, SuggestionSource.PHRASE, score(i, is_style))
            for i, (phrase, is_style) in enumerate(ordered)
        ]
    head_end = text.rfind(",") + 1
    fragment = text[head_end:].lstrip()
    fragment_lower = prompt_key(fragment)
    found: list[Suggestion] = []
    if fragment_lower and not text[-1].isspace():
        start = len(text) - len(fragment)
        for i, (phrase, is_style) in enumerate(ordered):
            lowered = phrase.lower()
            if lowered.startswith(fragment_lower) and lowered != fragment_lower:
                completed = text[:start] + phrase
                if len(completed) <= MAX_PROMPT_CHARS:
                    found.append(Suggestion(completed, SuggestionSource.PHRASE, score(i, is_style)))
        if found:
            return found
    base = text.rstrip().rstrip(",").rstrip()
    for i, (phrase, is_style) in enumerate(ordered):
        if phrase.lower() in text_lower:
            continue
        appended = f"{base}, {phrase}" if base else phrase
        if len(appended) <= MAX_PROMPT_CHARS:
            found.append(Suggestion(appended, SuggestionSource.PHRASE, score(i, is_style)))
    return found


_SOURCE_ORDER = {
    SuggestionSource.HISTORY: 0,
    SuggestionSource.TEMPLATE: 1,
    SuggestionSource.PHRASE: 2,
}


def rank_suggestions(
    text: str,
    style: Style | None,
    limit: int,
    *,
    history: list[PastPrompt],
    templates: list[TemplateMatch],
    book: PhraseBook,
    now: datetime,
) -> list[Suggestion]:
    """The best `limit` suggestions, best first, each text once (compared as
    `prompt_key`, keeping the best-scored one); ties go to the caller's own prompts,
    then templates, then phrases, then alphabetical order."""
    text_key = prompt_key(text)
    found: list[Suggestion] = []
    for past in history:
        score = history_score(past, text_key, style, now)
        if score is not None:
            found.append(Suggestion(past.prompt, SuggestionSource.HISTORY, score))
    for template in templates:
        score = template_score(template, text_key, style)
        if score is not None:
            found.append(
                Suggestion(
                    template.prompt,
                    SuggestionSource.TEMPLATE,
                    score,
                    template_id=template.template_id,
                )
            )
    found.extend(phrase_suggestions(text, style, book))
    found.sort(key=lambda s: (-s.score, _SOURCE_ORDER[s.source], s.text))
    best: list[Suggestion] = []
    keys: set[str] = set()
    for suggestion in found:
        key = prompt_key(suggestion.text)
        if key in keys or key == text_key:
            continue
        keys.add(key)
        best.append(suggestion)
        if len(best) == limit:
            break
    return [Suggestion(s.text, s.source, round(s.score, 6), s.template_id) for s in best]
