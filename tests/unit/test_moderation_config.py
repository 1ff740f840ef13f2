"""Moderation settings: the chain, and the openai moderator's endpoint, which falls back
to the OpenAI image settings only as a pair and only when the chain asks for openai, so
neither feature ever turns the other on."""

from __future__ import annotations

from datetime import timedelta

import pytest

from imagegen.config import ConfigError, Settings

OPENAI = {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "OPENAI_API_KEY": "sk-images"}


def test_default_is_the_rules_moderator_alone_and_hash_only() -> None:
    moderation = Settings.from_env({}).moderation
    assert moderation.chain == ("rules",)
    assert moderation.url is None and moderation.api_key is None
    assert moderation.store_text is False
    assert moderation.timeout == timedelta(seconds=5)


def test_openai_image_settings_do_not_turn_moderation_on() -> None:
    moderation = Settings.from_env(OPENAI).moderation
    assert moderation.chain == ("rules",) and moderation.url is None


def test_moderation_settings_do_not_turn_the_openai_provider_on() -> None:
    settings = Settings.from_env(
        {
            "IMAGEGEN_MODERATION_CHAIN": "rules,openai",
            "IMAGEGEN_MODERATION_URL": "http://127.0.0.1:2/v1",
            "IMAGEGEN_MODERATION_API_KEY": "sk-mod",
        }
    )
    assert settings.moderation.chain == ("rules", "openai")
    assert (settings.moderation.url, settings.moderation.api_key) == (
        "http://127.0.0.1:2/v1",
        "sk-mod",
    )
    assert settings.openai_base_url is None and settings.openai_api_key is None


def test_the_chain_falls_back_to_the_openai_settings_as_a_pair() -> None:
    moderation = Settings.from_env({**OPENAI, "IMAGEGEN_MODERATION_CHAIN": "openai"}).moderation
    assert (moderation.url, moderation.api_key) == ("http://127.0.0.1:1/v1", "sk-images")
    # Its own URL without a key never borrows the image provider's key.
    own_url = Settings.from_env(
        {
            **OPENAI,
            "IMAGEGEN_MODERATION_CHAIN": "openai",
            "IMAGEGEN_MODERATION_URL": "http://127.0.0.1:3/v1",
        }
    ).moderation
    assert (own_url.url, own_url.api_key) == ("http://127.0.0.1:3/v1", None)


@pytest.mark.parametrize(
    "env",
    [
        {"IMAGEGEN_MODERATION_CHAIN": "openai"},
        {"IMAGEGEN_MODERATION_CHAIN": "openai", "IMAGEGEN_MODERATION_API_KEY": "k", **OPENAI},
        {"IMAGEGEN_MODERATION_CHAIN": "rules,perspective"},
        {"IMAGEGEN_MODERATION_CHAIN": "rules,rules"},
        {"IMAGEGEN_MODERATION_STORE_TEXT": "sometimes"},
        {"IMAGEGEN_MODERATION_TIMEOUT": "0"},
    ],
    ids=["openai-no-url", "own-key-no-own-url", "unknown", "twice", "bad-bool", "zero-timeout"],
)
def test_bad_moderation_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_none_turns_moderation_off_and_store_text_turns_on() -> None:
    moderation = Settings.from_env(
        {"IMAGEGEN_MODERATION_CHAIN": "none", "IMAGEGEN_MODERATION_STORE_TEXT": "true"}
    ).moderation
    assert moderation.chain == () and moderation.store_text is True
