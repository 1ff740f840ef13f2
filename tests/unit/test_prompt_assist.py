"""The prompt assistant's rules without I/O: the phrase book, ranking and merging of
suggestions, the local enhancer, the prompt limits, reading a chat model's answer, the
price and the settings."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from importlib import resources

import pytest

from imagegen.config import ConfigError, Settings
from imagegen.domain.enhancement import enhance_locally, fit_text, fit_to_limits
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import Style
from imagegen.domain.phrases import PhraseBook, builtin_phrases
from imagegen.domain.pricing import PriceTable
from imagegen.domain.suggestions import (
    PastPrompt,
    SuggestionSource,
    TemplateMatch,
    check_suggest_request,
    kept_signal,
    match_strength,
    phrase_suggestions,
    rank_suggestions,
    searchable,
)
from imagegen.providers.chat_enhancer import parse_answer, user_message

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
BOOK = builtin_phrases()


def past(
    prompt: str,
    *,
    kept: int = 0,
    live: int = 1,
    deleted: int = 0,
    days_ago: float = 1,
    style: str = "",
    made: int = 1,
) -> PastPrompt:
    return PastPrompt(
        prompt=prompt,
        style=style,
        images_made=made,
        live_images=live,
        kept_images=kept,
        deleted_images=deleted,
        last_used_at=NOW - timedelta(days=days_ago),
    )


def ranked(text: str, history: list[PastPrompt], **kwargs: object) -> list[str]:
    found = rank_suggestions(
        text,
        kwargs.pop("style", None),  # type: ignore[arg-type]
        int(kwargs.pop("limit", 50)),  # type: ignore[call-overload]
        history=history,
        templates=kwargs.pop("templates", []),  # type: ignore[arg-type]
        book=BOOK,
        now=NOW,
    )
    return [s.text for s in found if s.source is SuggestionSource.HISTORY]


def test_every_style_has_every_group_of_phrases() -> None:
    assert set(BOOK.styles) == set(Style)
    for phrases in (BOOK.neutral, *BOOK.styles.values()):
        assert all(group for group in phrases.groups()) and phrases.negative
    data = json.loads(
        resources.files("imagegen.domain").joinpath("prompt_phrases.json").read_text()
    )
    del data["cinematic"]["quality"]
    with pytest.raises(ValueError, match="cinematic"):
        PhraseBook.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [("", 0, 10), ("a fox", 1, 1), ("x" * 4000, 50, 50), ("two\nlines\tand tab", 7, 7)],
)
def test_suggest_requests_within_the_limits(text: str, limit: int, expected: int) -> None:
    assert check_suggest_request(text, limit) == expected


@pytest.mark.parametrize(
    ("text", "limit", "field"),
    [("x" * 4001, 10, "text"), ("a\x00b", 10, "text"), ("a", 51, "limit"), ("a", -1, "limit")],
)
def test_suggest_requests_past_the_limits_are_img_003(text: str, limit: int, field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_suggest_request(text, limit)
    assert refused.value.field == field and refused.value.code == "IMG_003"


def test_how_a_prompt_matches_the_text() -> None:
    assert match_strength("a red fox", "a red") == 1.0
    assert match_strength("a red fox", "fox") == 0.75
    assert match_strength("a red fox, redfox", "ox") == 0.5
    assert match_strength("a red fox", "wolf") is None
    assert match_strength("anything", "") == 0.0
    assert searchable("fox") and searchable("a fox") and not searchable("a r")


def test_kept_ranks_above_deleted_whatever_else() -> None:
    assert kept_signal(past("x", kept=1)) == 1.0
    assert kept_signal(past("x", live=0, deleted=2)) == -1.0
    assert kept_signal(past("x", live=1, deleted=1)) == -0.5
    history = [
        # Deleted, yet the best match, the most used, the newest and in the asked style.
        past("a lighthouse at noon", live=0, deleted=4, made=16, days_ago=0, style="cinematic"),
        past("a lighthouse in fog", days_ago=400),
        # Kept, but only containing the text, and old.
        past("old a lighthouse at night", kept=1, days_ago=400),
    ]
    assert ranked("a lighthouse", history, style=Style.CINEMATIC) == [
        "old a lighthouse at night",
        "a lighthouse in fog",
        "a lighthouse at noon",
    ]


def test_ties_are_broken_by_style_recency_and_use() -> None:
    history = [
        past("a fox one", days_ago=90),
        past("a fox two", days_ago=1),
        past("a fox three", days_ago=90, made=15),
        past("a fox four", days_ago=90, style="anime"),
    ]
    assert ranked("a fox", history, style=Style.ANIME) == [
        "a fox four",
        "a fox two",
        "a fox three",
        "a fox one",
    ]


def test_suggestions_are_unique_limited_and_never_the_text_itself() -> None:
    history = [past("A Red Fox"), past("a  red fox", kept=1), past("a red fox in snow")]
    found = rank_suggestions(
        "a red fox in snow", None, 50, history=history, templates=[], book=BOOK, now=NOW
    )
    keys = [" ".join(s.text.lower().split()) for s in found]
    assert len(keys) == len(set(keys)) and "a red fox in snow" not in keys
    both = ranked("a red", history)
    assert both == ["a  red fox", "a red fox in snow"]  # the kept spelling wins
    assert (
        len(rank_suggestions("a", None, 3, history=history, templates=[], book=BOOK, now=NOW)) == 3
    )


def test_templates_rank_between_kept_and_plain_prompts() -> None:
    template = TemplateMatch("t1", "a fox in {{place}}", "Fox scenes", "anime", 3)
    found = rank_suggestions(
        "a fox",
        Style.ANIME,
        10,
        history=[past("a fox kept", kept=1), past("a fox plain")],
        templates=[template],
        book=BOOK,
        now=NOW,
    )
    assert [(s.source, s.text) for s in found[:3]] == [
        (SuggestionSource.HISTORY, "a fox kept"),
        (SuggestionSource.TEMPLATE, "a fox in {{place}}"),
        (SuggestionSource.HISTORY, "a fox plain"),
    ]
    assert found[1].template_id == "t1"
    # A template found by its name only.
    by_name = TemplateMatch("t2", "{{subject}} at dusk", "Dusk scenes", "", 0)
    texts = [
        s.text
        for s in rank_suggestions(
            "dusk sc", None, 5, history=[], templates=[by_name], book=BOOK, now=NOW
        )
    ]
    assert texts[0] == "{{subject}} at dusk"


def test_phrases_complete_or_continue_the_text() -> None:
    def texts(text: str, style: Style | None = None) -> list[str]:
        return [s.text for s in phrase_suggestions(text, style, BOOK)]

    assert texts("")[:3] == [
        "soft natural lighting",
        "golden hour lighting",
        "dramatic rim lighting",
    ]
    assert texts("", Style.CINEMATIC)[0] == "dramatic cinematic lighting"
    assert texts("a fox, gold") == ["a fox, golden hour lighting"]
    assert texts("a fox,  Highly")[0] == "a fox,  highly detailed"
    continued = texts("a fox ")
    assert continued[0] == "a fox, soft natural lighting"
    assert (
        texts("a fox, soft natural lighting,")[0]
        == "a fox, soft natural lighting, golden hour lighting"
    )
    # A finished part that starts no phrase is continued.
    assert texts("a fox")[0] == "a fox, soft natural lighting"
    # Nothing longer than a prompt.
    assert texts("x" * 3990 + " ") == []
    style_first = phrase_suggestions("a fox ", Style.SKETCH, BOOK)
    assert style_first[0].text == "a fox, strong directional light"
    assert style_first[0].score > style_first[-1].score


def test_the_local_enhancer_is_deterministic_and_keeps_the_prompt() -> None:
    first = enhance_locally("a red fox in snow", Style.CINEMATIC, BOOK)
    assert first == enhance_locally("a red fox in snow", Style.CINEMATIC, BOOK)
    assert first.prompt == (
        "a red fox in snow, dramatic cinematic lighting, anamorphic widescreen framing, "
        "film color grading"
    )
    assert first.negative_prompt.startswith("flat lighting, cartoon, overexposed, blurry")
    neutral = enhance_locally("  a red fox   in snow.  ", None, BOOK)
    assert neutral.prompt.startswith("a red fox in snow, soft natural lighting, ")
    # What the prompt already speaks to is left as it is, and never negated.
    own = enhance_locally("a blurry cat, golden hour, close-up, highly detailed", None, BOOK)
    assert own.prompt == "a blurry cat, golden hour, close-up, highly detailed"
    assert "blurry" not in own.negative_prompt
    # Every style gives something different from none.
    assert len({enhance_locally("a cat", s, BOOK).prompt for s in (None, *Style)}) == 14


def test_enhancements_stay_within_the_prompt_limits() -> None:
    full = "word " * 799 + "last"  # 3999 characters
    enhanced = enhance_locally(full, Style.ANIME, BOOK)
    assert enhanced.prompt.startswith(full) and len(enhanced.prompt) <= 4000
    cut = fit_to_limits("vista, " * 1000, "dull, " * 500)
    assert len(cut.prompt) <= 4000 and cut.prompt.endswith("vista")
    assert len(cut.negative_prompt) <= 1000 and cut.negative_prompt.endswith("dull")
    assert fit_text("x" * 5000, 4000) == "x" * 4000  # no boundary: cut hard
    assert fit_text(" a\x00b\x07c\n ", 10) == "abc"
    assert fit_text("a\nb\tc", 10) == "a\nb\tc"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "p", "negative_prompt": "n"}', ("p", "n")),
        ('Sure! {"prompt": "p", "negative_prompt": ["a", "b"]} Enjoy.', ("p", "a, b")),
        ('```json\n{"prompt": "p"}\n```', ("p", "")),
        ("just a better prompt", ("just a better prompt", "")),
        ('{"prompt": 3}', ('{"prompt": 3}', "")),
        ("{not json}", ("{not json}", "")),
    ],
)
def test_reading_the_chat_models_answer(content: str, expected: tuple[str, str]) -> None:
    answer = parse_answer(content)
    assert (answer.prompt, answer.negative_prompt) == expected


def test_the_chat_model_is_told_the_style_and_the_prompt() -> None:
    message = user_message("a fox\nin snow", Style.PIXEL_ART, BOOK.for_style(Style.PIXEL_ART))
    assert message.splitlines()[0] == "Style: pixel_art"
    assert message.endswith("Prompt: a fox\nin snow")
    assert "Style: none" in user_message("a fox", None, BOOK.neutral)


def test_the_enhancement_price() -> None:
    assert PriceTable.default().enhance_credits == 0
    base = '{"tiers": [{"max_pixels": 262144, "credits": 1}], "edit_credits": 2'
    assert PriceTable.from_json(base + "}").enhance_credits == 0
    assert PriceTable.from_json(base + ', "enhance_credits": 2}').enhance_credits == 2
    with pytest.raises(ValueError, match="enhance_credits"):
        PriceTable.from_json(base + ', "enhance_credits": -1}')


def test_enhancement_settings_are_their_own() -> None:
    assert Settings.from_env({}).enhance.url is None
    # OPENAI_* never turn on the enhancement model.
    openai = Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "OPENAI_API_KEY": "k"})
    assert openai.enhance.url is None and openai.enhance.api_key is None
    configured = Settings.from_env(
        {
            "IMAGEGEN_ENHANCE_URL": "http://127.0.0.1:9/v1",
            "IMAGEGEN_ENHANCE_MODEL": "m",
            "IMAGEGEN_ENHANCE_TIMEOUT": "7.5",
        }
    )
    assert configured.enhance.model == "m" and configured.enhance.timeout.total_seconds() == 7.5
    with pytest.raises(ConfigError, match="IMAGEGEN_ENHANCE_MODEL"):
        Settings.from_env({"IMAGEGEN_ENHANCE_URL": "http://127.0.0.1:9/v1"})
    with pytest.raises(ConfigError, match="IMAGEGEN_ENHANCE_TIMEOUT"):
        Settings.from_env(
            {
                "IMAGEGEN_ENHANCE_URL": "http://127.0.0.1:9/v1",
                "IMAGEGEN_ENHANCE_MODEL": "m",
                "IMAGEGEN_ENHANCE_TIMEOUT": "0",
            }
        )
