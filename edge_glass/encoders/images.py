"""Bring images as real datasets ship them (grey, RGBA, palette, CMYK, 16-bit) to RGB."""

from __future__ import annotations

from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image; transparency is composited onto white.

    `Image.convert("RGB")` alone drops the alpha channel and shows whatever colour the
    transparent pixels happen to hold (often black), which turns charts and logos on
    transparent backgrounds into black rectangles.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale into 8 bits instead of clipping everything to white.
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() or 1.0
        return Image.fromarray((arr / hi * 255).astype("uint8"), "L").convert("RGB")
    return image.convert("RGB")
