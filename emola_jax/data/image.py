"""CLIP image preprocessing as LLaVA-1.5 does it (PIL, bicubic), returning channels-last arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | Path):
    """An RGB PIL image; an unreadable, truncated or empty file is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ValueError(f"image {path} could not be read: {err}") from err


def pad_to_square(image, fill: tuple[int, ...] = tuple(int(255 * m) for m in CLIP_MEAN)):
    """LLaVA's `expand2square`: centre the image on a square of the CLIP mean colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def clip_preprocess(image, size: int = 336, *, pad: bool = False) -> np.ndarray:
    """Resize the short side to `size` (bicubic), centre-crop, scale to [0, 1], normalise.

    Returns `[size, size, 3]` float32. `pad=True` pads to a square first (LLaVA's training
    recipe; the official evaluation does not pad).
    """
    from PIL import Image

    if pad:
        image = pad_to_square(image)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    image = image.resize(new_size, resample=Image.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
