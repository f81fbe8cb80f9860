"""The brand colour, made readable: WCAG 2 contrast for text on it and for links beside it."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_BRAND = "#1d4e89"
WHITE = "#ffffff"
INK = "#1a1a1a"  # body text; 17:1 on white
AA_NORMAL_TEXT = 4.5  # WCAG 2.x SC 1.4.3
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


def _luminance(colour: str) -> float:
    channels = []
    for i in (1, 3, 5):
        value = int(colour[i : i + 2], 16) / 255
        channels.append(value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4)
    red, green, blue = channels
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def contrast(first: str, second: str) -> float:
    """The WCAG contrast ratio of two #rrggbb colours, from 1 to 21."""
    light, dark = sorted((_luminance(first), _luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@dataclass(frozen=True)
class Palette:
    brand: str  # backgrounds: the header bar and buttons
    on_brand: str  # text on the brand colour
    link: str  # links and outlines on white

    @classmethod
    def from_brand(cls, colour: str) -> Palette:
        brand = colour.lower() if _HEX.fullmatch(colour or "") else DEFAULT_BRAND
        on_brand = WHITE if contrast(brand, WHITE) >= AA_NORMAL_TEXT else INK
        link = brand if contrast(brand, WHITE) >= AA_NORMAL_TEXT else INK
        return cls(brand, on_brand, link)
