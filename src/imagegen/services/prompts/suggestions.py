"""SuggestPrompts: ranked completions of what a caller has typed, from their own
prompts, the templates they can see and the built-in phrases.

The request is checked (domain/suggestions.py), the candidates are read through the
indexes of repositories/prompts.py (a bounded number of rows whatever the size of the
caller's history), and ranked, merged and de-duplicated by the domain. Another user's
prompts are never read: every history row is the caller's own, and templates follow the
template repository's visibility rule (own, or shared with the caller's sub-account).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from imagegen.domain.models import Identity, Style
from imagegen.domain.phrases import PhraseBook
from imagegen.domain.suggestions import (
    Suggestion,
    check_suggest_request,
    rank_suggestions,
    searchable,
)
from imagegen.repositories.prompts import PromptCandidates


@dataclass(frozen=True)
class SuggestionSettings:
    """How many candidates each source may give before ranking."""

    #: the caller's most recent prompts looked at for every text
    recent: int = 100
    #: rows each other history branch may give (at least the asked limit)
    per_branch: int = 50
    #: visible templates looked at
    templates: int = 50


def _utc_now() -> datetime:
    return datetime.now(UTC)


class PromptSuggestions:
    """Suggests prompts to the caller; IMG_003 for a bad text or limit."""

    def __init__(
        self,
        candidates: PromptCandidates,
        *,
        phrases: PhraseBook,
        settings: SuggestionSettings | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._candidates = candidates
        self._phrases = phrases
        self._settings = settings or SuggestionSettings()
        self._clock = clock

    async def suggest(
        self, identity: Identity, text: str, style: Style | None, limit: int
    ) -> list[Suggestion]:
        """Up to `limit` (0: 10) completions of `text`, best first."""
        count = check_suggest_request(text, limit)
        settings = self._settings
        history, templates = await self._candidates.find(
            identity.user_id,
            identity.sub_account,
            text,
            prefix=bool(text.strip()),
            anywhere=searchable(text),
            recent=settings.recent,
            per_branch=max(settings.per_branch, count),
            templates=max(settings.templates, count),
        )
        return rank_suggestions(
            text,
            style,
            count,
            history=history,
            templates=templates,
            book=self._phrases,
            now=self._clock(),
        )
