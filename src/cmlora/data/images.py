"""Opening training images as RGB, whatever the file holds.

Instruction-tuning sets collect images from many sources: grayscale scans, PNGs with transparency, palette GIFs,
16-bit medical or satellite images, CMYK print JPEGs, phone photos stored sideways with an EXIF orientation tag.
A vision tower wants RGB pixels the right way up; a plain `convert("RGB")` gets several of these wrong (alpha
becomes black, 16-bit values clip to white), so each family is converted on purpose here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .records import DataError

# Transparent pixels are shown over white, as an image viewer does, rather than over black.
BACKGROUND = (255, 255, 255)


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` as an RGB PIL image, EXIF orientation applied; DataError naming the file if unreadable."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is a bad file, not a warning
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not later inside a batch
                upright = ImageOps.exif_transpose(image)
                return to_rgb(upright)
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read image ({type(error).__name__}: {error}). Replace the file or remove "
                        "the record (or pass skip_bad_records=True and call dataset.validate()).",
                        "corrupt image") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: alpha composited over white, 16/32-bit integer data scaled (not clipped) to 0..255."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(image)
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, LAB: Pillow's conversions are right for these


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale with more than 8 bits: "I;16*" spans 0..65535; "I" is read as 16-bit when any value exceeds 255
    (Pillow opens some 16-bit PNGs as "I"), else as 8-bit; "F" is read as 0..1 when its maximum is at most 1."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return gray.convert("RGB")
