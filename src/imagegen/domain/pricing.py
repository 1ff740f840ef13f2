"""Credit prices. The table is configuration (a JSON file); this module only applies it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from imagegen.domain.models import Size


@dataclass(frozen=True)
class PriceTier:
    """Images of at most `max_pixels` pixels cost `credits` each."""

    max_pixels: int
    credits: int


@dataclass(frozen=True)
class PriceTable:
    """Credits per image by pixel count, the flat price of an edit, and of a prompt
    enhancement."""

    tiers: tuple[PriceTier, ...]
    edit_credits: int
    #: what one delivered image costs us at each provider, in cents (absent: unknown)
    provider_cents: dict[str, int] = field(default_factory=dict)
    #: what one prompt enhancement (EnhancePrompt) costs
    enhance_credits: int = 0

    @classmethod
    def default(cls) -> PriceTable:
        # The table in docs/plans-and-prices.md (tests/unit/test_docs.py keeps them equal).
        return cls(
            tiers=(
                PriceTier(512 * 512, 1),
                PriceTier(1024 * 1024, 2),
                PriceTier(1536 * 1536, 3),
            ),
            edit_credits=2,
            enhance_credits=0,
        )

    @classmethod
    def from_json(cls, text: str) -> PriceTable:
        data = json.loads(text)
        tiers = tuple(
            PriceTier(int(t["max_pixels"]), int(t["credits"]))
            for t in sorted(data["tiers"], key=lambda t: int(t["max_pixels"]))
        )
        if not tiers:
            raise ValueError("the price table needs at least one tier")
        enhance_credits = int(data.get("enhance_credits", 0))
        if enhance_credits < 0:
            raise ValueError("enhance_credits must not be negative")
        return cls(
            tiers=tiers,
            edit_credits=int(data["edit_credits"]),
            enhance_credits=enhance_credits,
            provider_cents={
                str(k): int(v) for k, v in (data.get("provider_cents_per_image") or {}).items()
            },
        )

    @classmethod
    def load(cls, path: Path | None) -> PriceTable:
        return cls.default() if path is None else cls.from_json(path.read_text())

    def cost_cents(self, provider: str, images: int) -> int | None:
        """Our cost of `images` delivered images, where the provider's price is configured."""
        per_image = self.provider_cents.get(provider)
        return None if per_image is None else per_image * images

    def image_credits(self, size: Size) -> int:
        for tier in self.tiers:
            if size.pixels <= tier.max_pixels:
                return tier.credits
        # Bigger than every tier: charge the top tier per started block of its pixels.
        top = self.tiers[-1]
        blocks = -(-size.pixels // top.max_pixels)
        return top.credits * blocks

    def generation_credits(self, size: Size, count: int, *, edit: bool = False) -> int:
        """The price of a request: each image of a batch at its size; an edit flat."""
        per_image = (
            max(self.edit_credits, self.image_credits(size)) if edit else (self.image_credits(size))
        )
        return per_image * count
