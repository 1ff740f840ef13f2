"""The one documented template that folds a negative prompt and a style into the
prompt, for providers that take neither natively:

    {prompt}, {style words}. Avoid: {negative prompt}

Either part is left out when empty.
"""

from __future__ import annotations

from imagegen.domain.models import Style

STYLE_WORDS: dict[Style, str] = {
    Style.PHOTOGRAPHIC: "photographic style, natural light, fine detail",
    Style.ARTISTIC: "painterly artistic style, expressive brushwork",
    Style.ANIME: "anime style, clean line art, cel shading",
    Style.DIGITAL_ART: "digital art style, crisp illustration",
    Style.WATERCOLOR: "watercolor style, soft washes on paper",
    Style.SKETCH: "pencil sketch style, graphite lines",
    Style.PIXEL_ART: "pixel art style, low resolution, limited palette",
    Style.CINEMATIC: "cinematic style, dramatic lighting, film color grading",
    Style.CARTOON: "cartoon style, bold outlines, flat saturated colors",
    Style.ABSTRACT: "abstract art, bold shapes, color and texture over subject",
    Style.MINIMALIST: "minimalist style, few elements, generous empty space, restrained palette",
    Style.VINTAGE: "vintage photo style, faded warm film tones, grain",
    Style.MODERN: "modern design style, clean geometry, crisp contrast",
}


def fold_prompt(prompt: str, negative_prompt: str = "", style: Style | None = None) -> str:
    """The prompt with style words and the negative prompt folded in."""
    text = prompt.strip()
    if style is not None:
        text = f"{text}, {STYLE_WORDS[style]}"
    if negative_prompt.strip():
        text = f"{text}. Avoid: {negative_prompt.strip()}"
    return text
