"""Encode settings are IMAGEGEN_* settings with the formats' usual defaults and bounds."""

from __future__ import annotations

import pytest

from imagegen.config import ConfigError, Settings
from imagegen.imaging import EncodeSettings


def test_defaults_are_what_the_formats_use() -> None:
    settings = Settings.from_env({})
    defaults = EncodeSettings()
    assert (
        settings.png_compress_level,
        settings.jpeg_quality,
        settings.webp_quality,
        settings.webp_effort,
    ) == (
        defaults.png_compress_level,
        defaults.jpeg_quality,
        defaults.webp_quality,
        defaults.webp_effort,
    ) == (6, 90, 90, 4)


@pytest.mark.parametrize(
    ("name", "lowest", "highest"),
    [
        ("IMAGEGEN_PNG_COMPRESS_LEVEL", 0, 9),
        ("IMAGEGEN_JPEG_QUALITY", 1, 100),
        ("IMAGEGEN_WEBP_QUALITY", 1, 100),
        ("IMAGEGEN_WEBP_EFFORT", 0, 6),
    ],
)
def test_each_setting_at_and_past_its_bounds(name: str, lowest: int, highest: int) -> None:
    field = name.removeprefix("IMAGEGEN_").lower()
    assert getattr(Settings.from_env({name: str(lowest)}), field) == lowest
    assert getattr(Settings.from_env({name: str(highest)}), field) == highest
    for bad in (str(lowest - 1), str(highest + 1), "high"):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: bad})
