"""Candidates for prompt suggestions (SQL lives here only): the caller's own prompts
from `prompt_history` (migrations/0008_prompt_assist.sql, kept current by triggers on
images) and the templates they can see.

Every branch of the history query returns at most its LIMIT, and only the caller's rows:

    recent    the user's most recent prompts           prompt_history_recent_idx
    kept      their kept prompts containing the text   prompt_history_kept_idx, ANDed
                                                       with the trigram index when the
                                                       text is rare enough
    prefix    prompts that start with the text         prompt_history_prefix_idx (a range)
    contains  prompts with the text anywhere           prompt_history_trgm_idx (3+ chars)
                                                       ANDed with the user's rows, or the
                                                       user's rows filtered until enough
                                                       match, for a common text

Which way serves `kept` and `contains` depends on how common the text is, which only the
text itself tells: both statements run with custom plans (a generic plan, which
asyncpg's prepared statements get after five runs, cannot see the text and walked the
user's whole history in recency order). Measured in bench/suggest_bench.py.
"""

from __future__ import annotations

import asyncpg

from imagegen.domain.suggestions import PastPrompt, TemplateMatch
from imagegen.repositories.templates import VISIBLE

#: $1 user, $2 the typed text, $3 whether to look for prompts starting with it (there is
#: text), $4 whether to look for it anywhere (it is long enough for trigrams), $5 whether
#: to offer recent prompts (there is text), $6 how many recent prompts, $7 how many rows
#: each other branch may give. A module constant so the benchmark explains the real thing.
SUGGEST_HISTORY_SQL = r"""
WITH recent AS (
    SELECT * FROM prompt_history
     WHERE $5 AND user_id = $1
     ORDER BY last_used_at DESC
     LIMIT $6
), kept AS (
    SELECT * FROM prompt_history
     WHERE user_id = $1 AND kept_images > 0
       AND prompt_key LIKE prompt_history_pattern($2)
     ORDER BY last_used_at DESC
     LIMIT $7
), prefix AS (
    SELECT * FROM prompt_history
     WHERE $3 AND user_id = $1
       AND left(prompt_key, 256) >= left(prompt_history_key($2), 256)
       AND left(prompt_key, 256) < left(prompt_history_key($2), 256) || U&'\+10FFFF'
     ORDER BY left(prompt_key, 256)
     LIMIT $7
), contains AS (
    SELECT * FROM prompt_history
     WHERE $4 AND user_id = $1 AND prompt_key LIKE prompt_history_pattern($2)
     LIMIT $7
)
SELECT prompt, style, images_made, live_images, kept_images, deleted_images, last_used_at
  FROM (SELECT * FROM recent UNION SELECT * FROM kept
        UNION SELECT * FROM prefix UNION SELECT * FROM contains) AS candidates
 WHERE prompt_key LIKE prompt_history_pattern($2)
"""

#: $1 user, $2 sub-account, $3 the typed text, $4 how many. Bounded by the templates the
#: caller can see (their own, and those shared with their sub-account).
SUGGEST_TEMPLATES_SQL = f"""
SELECT id, prompt, name, style, usage_count FROM prompt_templates
 WHERE {VISIBLE}
   AND (prompt_history_key(prompt) LIKE prompt_history_pattern($3)
        OR prompt_history_key(name) LIKE prompt_history_pattern($3))
 ORDER BY usage_count DESC, updated_at DESC, id
 LIMIT $4
"""  # noqa: S608 - VISIBLE is a fixed clause

#: Set for the statements above only, inside their read-only transaction.
_CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"


class PromptCandidates:
    """Reads the caller's own prompts and visible templates that may complete a text."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def find(
        self,
        user_id: str,
        sub_account: str,
        text: str,
        *,
        prefix: bool,
        anywhere: bool,
        recent: int,
        per_branch: int,
        templates: int,
    ) -> tuple[list[PastPrompt], list[TemplateMatch]]:
        """History candidates (see the module docstring) and up to `templates` visible
        templates whose prompt or name contains the text (none for an empty text)."""
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(_CUSTOM_PLANS)
            rows = await conn.fetch(
                SUGGEST_HISTORY_SQL,
                user_id,
                text,
                prefix,
                anywhere,
                bool(text.strip()),
                recent,
                per_branch,
            )
            template_rows = []
            if text.strip() and templates:
                template_rows = await conn.fetch(
                    SUGGEST_TEMPLATES_SQL, user_id, sub_account, text, templates
                )
        history = [
            PastPrompt(
                prompt=r["prompt"],
                style=r["style"],
                images_made=r["images_made"],
                live_images=r["live_images"],
                kept_images=r["kept_images"],
                deleted_images=r["deleted_images"],
                last_used_at=r["last_used_at"],
            )
            for r in rows
        ]
        matches = [
            TemplateMatch(
                template_id=str(r["id"]),
                prompt=r["prompt"],
                display_name=r["name"],
                style=r["style"],
                usage_count=r["usage_count"],
            )
            for r in template_rows
        ]
        return history, matches
