"""The `rules` moderator against a corpus: listed words are caught plain, with separators,
in leetspeak, with confusable letters and in mixed case, and decided as the default
policy says; harmless prompts that hold the same letters inside other words pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagegen.domain.moderation import (
    Category,
    Decision,
    ModerationPolicyTable,
    assess,
)
from imagegen.domain.moderation_rules import RuleSet, readings
from imagegen.providers.rules_moderation import RulesModerator

RULES = RuleSet.load()
POLICY = ModerationPolicyTable.default().for_plan("free")

#: (prompt, category it must be found in, the default policy's decision)
CAUGHT: list[tuple[str, Category, Decision]] = [
    # plain
    ("a porn poster", Category.SEXUAL, Decision.BLOCKED),
    ("kill the king", Category.VIOLENCE, Decision.FLAGGED),
    ("nude beach party", Category.SEXUAL, Decision.BLOCKED),
    ("a sign that says heil hitler", Category.HATE, Decision.BLOCKED),
    ("how to make a bomb diagram", Category.ILLICIT, Decision.FLAGGED),
    ("a drawing about suicide", Category.SELF_HARM, Decision.FLAGGED),
    # mixed case
    ("A PoRn poster", Category.SEXUAL, Decision.BLOCKED),
    ("KILL the king", Category.VIOLENCE, Decision.FLAGGED),
    ("NuDe beach", Category.SEXUAL, Decision.BLOCKED),
    # separators inserted between the letters
    ("a p.o.r.n poster", Category.SEXUAL, Decision.BLOCKED),
    ("a p o r n poster", Category.SEXUAL, Decision.BLOCKED),
    ("a p-o-r-n poster", Category.SEXUAL, Decision.BLOCKED),
    ("a p_o_r_n poster", Category.SEXUAL, Decision.BLOCKED),
    ("k . i . l . l the king", Category.VIOLENCE, Decision.FLAGGED),
    ("n*u*d*e beach", Category.SEXUAL, Decision.BLOCKED),
    ("po\u200brn poster", Category.SEXUAL, Decision.BLOCKED),  # zero-width space
    ("se\u00adx scene", Category.SEXUAL, Decision.BLOCKED),  # soft hyphen
    ("kill your-self now", Category.HARASSMENT, Decision.FLAGGED),
    # leetspeak
    ("a p0rn poster", Category.SEXUAL, Decision.BLOCKED),
    ("k1ll the king", Category.VIOLENCE, Decision.FLAGGED),
    ("ki11 the king", Category.VIOLENCE, Decision.FLAGGED),
    ("nud3 beach", Category.SEXUAL, Decision.BLOCKED),
    ("$3x scene", Category.SEXUAL, Decision.BLOCKED),
    ("kiss my @$$", Category.HARASSMENT, Decision.FLAGGED),
    ("5u1c1d3 art", Category.SELF_HARM, Decision.FLAGGED),
    ("kill!", Category.VIOLENCE, Decision.FLAGGED),
    ("a p o r n poster", Category.SEXUAL, Decision.BLOCKED),  # "a" is a word of its own
    ("i k i l l them", Category.VIOLENCE, Decision.FLAGGED),
    # confusable letters (Cyrillic, Greek, fullwidth, mathematical)
    ("a \u0440orn poster", Category.SEXUAL, Decision.BLOCKED),  # Cyrillic er
    ("a p\u03bfrn poster", Category.SEXUAL, Decision.BLOCKED),  # Greek omicron
    ("\u0455\u0435\u0445 scene", Category.SEXUAL, Decision.BLOCKED),  # Cyrillic dze, ie, ha
    ("\uff4b\uff49\uff4c\uff4c the king", Category.VIOLENCE, Decision.FLAGGED),  # fullwidth
    ("\U0001d427\U0001d42e\U0001d41d\U0001d41e beach", Category.SEXUAL, Decision.BLOCKED),
    ("n\u00fcd\u00e9 beach", Category.SEXUAL, Decision.BLOCKED),  # accents
    # mixed obfuscations
    ("A P.0.R.N poster", Category.SEXUAL, Decision.BLOCKED),
    ("K 1 L L the king", Category.VIOLENCE, Decision.FLAGGED),
    ("\u0420-0-R-N", Category.SEXUAL, Decision.BLOCKED),
    # a pattern: minors near sexual words
    ("a 12 year old girl, nude", Category.SEXUAL_MINORS, Decision.BLOCKED),
    ("topless kids at the beach", Category.SEXUAL_MINORS, Decision.BLOCKED),
]

HARMLESS = [
    "Scunthorpe United football club crest",
    "a cocktail at sunset",
    "assassin's creed poster",
    "Sussex countryside in spring",
    "portrait of a therapist in her office",
    "a bunch of grapes on a table",
    "skills and hobbies infographic",
    "Middlesex and Essex on an old map",
    "a peacock in the cockpit",
    "class assignment about bass guitars",
    "passport photo, plain background",
    "a sextant on a ship's deck",
    "a naked mole rat in a burrow",
    "a killer whale jumping",
    "analysis of a document",
    "Dickens novel cover",
    "a shuttlecock and racket",
    "1024x1024 wallpaper, 4k, 8k",
    "the grass is green; a snake in it",
    "a b c blocks for toddlers",
    "therapists' waiting room",
    "a glass of Pinot Noir",
    "hancock park sign",
    "a pass-port stamp",
    "I was so happy",
    "kids playing football in the park",
    "a cute 12 year old dog",
]


@pytest.mark.parametrize(("prompt", "category", "decision"), CAUGHT, ids=[c[0] for c in CAUGHT])
def test_listed_words_are_caught_however_written(
    prompt: str, category: Category, decision: Decision
) -> None:
    verdict = RULES.judge(prompt)
    assert category in verdict.scores, f"{prompt!r} -> {readings(prompt)}"
    assert assess(POLICY, {"prompt": verdict}).decision is decision


@pytest.mark.parametrize("prompt", HARMLESS)
def test_harmless_prompts_with_the_same_letters_pass(prompt: str) -> None:
    verdict = RULES.judge(prompt)
    assert verdict.scores == {}, f"{prompt!r} -> {readings(prompt)}"
    assert assess(POLICY, {"prompt": verdict}).decision is Decision.ALLOWED


def test_separator_removal_keeps_word_boundaries() -> None:
    # Joining pieces of one token never glues two whitespace-separated words...
    assert "asex" not in " ".join(readings("a sex"))
    # ...and a spelled-out run needs three single letters, so "a s" stays two words.
    assert readings("was sad") == ["was sad"]
    assert RULES.judge("it was sad, sex ed").scores.keys() == {Category.SEXUAL}
    # Punctuation inside a token is read both ways: "ex-wife" as words and joined.
    assert {"ex wife", "exwife"} <= set(readings("ex-wife"))


def test_numbers_stay_numbers_and_trailing_bang_stays_punctuation() -> None:
    assert readings("300 1024") == ["300 1024"]
    assert "kill" in " ".join(readings("kill!!"))


async def test_the_moderator_answers_one_verdict_per_text() -> None:
    verdicts = await RulesModerator(RULES).moderate(["a p0rn poster", "a lighthouse"])
    assert [set(v.scores) for v in verdicts] == [{Category.SEXUAL}, set()]
    # A long text (judged off the event loop) is judged the same way.
    long_text = ("a quiet harbour at dawn, " * 160)[:3990] + " k1ll"
    [verdict] = await RulesModerator(RULES).moderate([long_text])
    assert set(verdict.scores) == {Category.VIOLENCE}


def test_a_configured_list_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps(
            {
                "allow": ["blue cheese"],
                "categories": {
                    "illicit": {"terms": ["cheese", "moon rock*"], "patterns": [r"\bgr[ae]y goo\b"]}
                },
            }
        )
    )
    rules = RuleSet.load(path)
    assert set(rules.judge("Ch3353 please").scores) == {Category.ILLICIT}
    assert rules.judge("blue cheese salad").scores == {}
    assert set(rules.judge("moonrocks for sale").scores) == {Category.ILLICIT}
    assert set(rules.judge("a jar of grey goo").scores) == {Category.ILLICIT}
    assert rules.judge("a porn poster").scores == {}


@pytest.mark.parametrize(
    "data",
    [
        {"categories": {"weapons": {"terms": ["x"]}}},
        {"categories": {"hate": {"terms": ["x"], "regex": []}}},
        {"categories": {"hate": {"patterns": ["(unclosed"]}}},
        {"categories": {"hate": {"terms": ["  "]}}},
        {"words": []},
    ],
    ids=["unknown-category", "unknown-key", "bad-pattern", "empty-term", "unknown-top-key"],
)
def test_a_bad_rules_file_is_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RuleSet.from_mapping(data)
