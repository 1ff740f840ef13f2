"""`rules` moderator: the local term and pattern lists (domain/moderation_rules.py)
behind the Moderator protocol. No network: it is never unavailable."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from imagegen.domain.moderation import Verdict
from imagegen.domain.moderation_rules import RuleSet

#: Texts up to this many characters in all are judged on the event loop (well under a
#: millisecond); longer ones in a worker thread (a 4000-character prompt full of
#: obfuscations takes several milliseconds).
INLINE_CHARS = 500


class RulesModerator:
    """The `rules` moderator."""

    id = "rules"

    def __init__(self, rules: RuleSet) -> None:
        self._rules = rules

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """One verdict per text, in order."""
        if sum(len(text) for text in texts) <= INLINE_CHARS:
            return [self._rules.judge(text) for text in texts]
        return await asyncio.to_thread(lambda: [self._rules.judge(text) for text in texts])
