"""Any image Pillow decodes, as 8-bit RGB or RGBA: one reader for the tools, the data module and the checks.

The scale of a high-bit-depth image comes from the file's bit depth, never from its values: a 16-bit PNG whose values
stay at or below 255 is a nearly black image, not an 8-bit one (read as 8-bit it would be about 257 times too
bright).
"""
from __future__ import annotations

import numpy as np

__all__ = ["bit_depth", "normalise_mode", "has_alpha"]


def bit_depth(image) -> int | None:
    """Bits per sample of an integer grayscale image ("I;16*" or "I"): 16 for 16-bit modes and PNGs (Pillow reads a
    16-bit grayscale PNG as "I;16", older versions as "I"), a TIFF's BitsPerSample, None when the file does not say."""
    mode = image.mode
    if mode.startswith("I;16"):
        return 16
    if mode != "I":
        return None
    if image.format == "PNG":
        return 16  # PNG stores at most 16 bits per sample; 8-bit grayscale opens as "L"
    bits = getattr(image, "tag_v2", {}).get(258) if image.format == "TIFF" else None  # 258: BitsPerSample
    if isinstance(bits, (tuple, list)):
        bits = bits[0] if bits else None
    return int(bits) if bits else None


def normalise_mode(image):
    """Any PIL mode -> "RGB" or "RGBA" (8 bits per channel), keeping transparency.

    16-bit and 32-bit grayscale ("I;16", "I") are scaled from their bit depth (:func:`bit_depth`; from the values only
    when the file does not say: above 255 read as 16-bit); float ("F") is read as [0, 1] when its maximum is at most
    1, else [0, 255]; palette and grayscale images keep their transparency.
    """
    from PIL import Image

    mode = image.mode
    if mode in ("RGB", "RGBA"):
        return image
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0.0)
        if mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            bits = bit_depth(image) or (16 if top > 255 else 8)
            scale = 255.0 / (2.0**bits - 1.0)
        gray = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
        if "transparency" in image.info:
            return Image.fromarray(np.dstack([np.asarray(gray.convert("RGB")),
                                              np.where(values == image.info["transparency"], 0, 255).astype(np.uint8)]),
                                   "RGBA")
        return gray.convert("RGB")
    if mode in ("LA", "La", "PA", "RGBa") or (mode in ("P", "L", "RGB", "1") and "transparency" in image.info):
        return image.convert("RGBA")
    return image.convert("RGB")  # "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"


def has_alpha(image) -> bool:
    """Whether ``image`` carries transparency: an alpha band, or a palette / grayscale transparency entry."""
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
