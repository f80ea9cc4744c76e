"""Image decoding shared by CLIP and the landmark step, and CLIP preprocessing as LLaVA-1.5 does it
(PIL, bicubic), returning channels-last arrays.

Every decoder turns the picture upright by its EXIF orientation, as `ImageOps.exif_transpose` does
(LLaVA's loader does not; OpenCV's `imread` does): a phone photo saved sideways with an orientation
tag is then one picture for CLIP, the face detector and the landmark model."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# The picture every mode becomes is the one OpenCV's `imread(IMREAD_COLOR)` gives the landmark
# step (opencv imgcodecs: libpng's `png_set_strip_16` and the TIFF reader keep a 16-bit sample's
# high byte; alpha is dropped, not composited; palettes are expanded; an Adobe CMYK JPEG goes
# through `icvCvt_CMYK2BGR_8u`; a transparent GIF pixel shows the background colour). Modes with
# no such picture (32-bit integer and float samples, Lab, HSV) are refused by both paths.
_AS_RGB = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_REFUSED = {"I": "32-bit integer", "F": "32-bit float", "LAB": "Lab", "HSV": "HSV"}


def mode_problem(image) -> str | None:
    """Why an opened (not yet decoded) PIL image has no 8-bit picture both paths agree on, or None."""
    mode = image.mode
    if image.format == "TIFF" and mode in _AS_RGB and max(_tiff_bits(image)) > 8:
        return (f"its {max(_tiff_bits(image))}-bit {mode} samples are rounded to 8 bits by PIL and cut by "
                "OpenCV, so CLIP and the landmark model would see different pictures; save it as 8-bit")
    if mode in _AS_RGB or mode in _SIXTEEN_BIT or (mode == "I" and image.format == "PNG"):
        return None
    if mode == "CMYK" and image.format == "JPEG":
        return None
    kind = _REFUSED.get(mode, f"{image.format or 'unknown'}-format {mode}")
    return (f"its {kind} pixels (PIL mode {mode}) have no 8-bit picture that CLIP and the landmark model "
            "would both see; save it as 8-bit RGB or grayscale")


def _tiff_bits(image) -> tuple[int, ...]:
    bits = image.tag_v2.get(258, (8,))  # BitsPerSample
    return tuple(bits) if isinstance(bits, tuple) else (int(bits),)


def to_rgb8(image) -> np.ndarray:
    """`[H, W, 3]` uint8 RGB of a loaded PIL image whose `mode_problem` is None."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":  # "I" here: a 16-bit PNG as older Pillow opens it
        gray = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "CMYK":  # Pillow undoes Adobe's inversion; OpenCV computes k' - (c' * k' >> 8) on it
        cmyk = np.asarray(image).astype(np.int32)
        white = 255 - cmyk[..., 3:]
        return (white - ((cmyk[..., :3] * white) >> 8)).astype(np.uint8)
    pixels = np.array(image.convert("RGB"))
    if mode == "P" and image.format == "GIF" and "transparency" in image.info:
        palette = np.asarray(image.getpalette("RGB") or [0, 0, 0], np.uint8).reshape(-1, 3)
        index = np.asarray(image)
        background = image.info.get("background", 0)
        if isinstance(background, int) and background < len(palette):
            pixels[index == image.info["transparency"]] = palette[background]
    return pixels


ORIENTATION_TAG = 0x0112  # EXIF Orientation
# numpy's form of the transposes `ImageOps.exif_transpose` applies for orientations 2-8
_UPRIGHT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90
}
# what could tell Pillow a PNG's orientation; without any of them Pillow would decode the whole
# picture looking for a late eXIf chunk
_PNG_ORIENTATION_SOURCES = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")


def exif_orientation(opened, data: bytes | None = None) -> int:
    """The EXIF orientation (1-8) of an opened PIL image, read where `ImageOps.exif_transpose`
    reads it (EXIF, a PNG's raw profile, XMP); 1 for none or a value it ignores. `data`, the
    file's bytes, spares a PNG without any orientation source a full decode. ValueError when the
    EXIF block cannot be read (the picture's orientation is then unknown)."""
    if (data is not None and opened.format == "PNG" and "exif" not in opened.info
            and not any(source in data for source in _PNG_ORIENTATION_SOURCES)):
        return 1
    try:
        value = opened.getexif().get(ORIENTATION_TAG, 1)
    except Exception as err:  # Pillow's EXIF parser raises struct, value and key errors alike
        raise ValueError(f"its EXIF data, which holds its orientation, could not be read ({err})") from None
    return value if value in _UPRIGHT else 1


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`[H, W, C]` pixels stored with EXIF `orientation`, turned upright as `exif_transpose` does."""
    turn = _UPRIGHT.get(orientation)
    return pixels if turn is None else np.ascontiguousarray(turn(pixels))


def too_large(err: Exception) -> str:
    """Pillow's decompression-bomb refusal (raised from the header, before any pixel is decoded) as
    a reason: the picture's pixel count and the limit, which stays Pillow's."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    pixels = f"{int(found[1]):,} pixels" if found else "more pixels than Pillow allows"
    return (f"{pixels}, over Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS:,} (twice PIL.Image.MAX_IMAGE_PIXELS) "
            "against decompression bombs; not decoded")


def decode_rgb(source) -> np.ndarray:
    """`[H, W, 3]` uint8 RGB of an image file (a path, or a file object of its bytes), upright by
    its EXIF orientation: the picture CLIP sees, and the one `landmarks.read_bgr` gives the
    landmark step. An unreadable, truncated, empty or oversized file (Pillow's decompression-bomb
    limit), or a mode with no agreed 8-bit picture, is a ValueError naming the file."""
    try:
        with Image.open(source) as opened:
            problem = mode_problem(opened)
            if problem is None:
                opened.load()
                pixels = to_rgb8(opened)
                try:
                    return upright(pixels, exif_orientation(opened))
                except ValueError as err:
                    problem = str(err)
    except Image.DecompressionBombError as err:
        raise ValueError(f"image {source}: {too_large(err)}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ValueError(f"image {source} could not be read: {err}") from err
    raise ValueError(f"image {source}: {problem}")


def load_image(path):
    """An RGB PIL image of `decode_rgb(path)` (a path or a file object)."""
    return Image.fromarray(decode_rgb(path), "RGB")


def pad_to_square(image, fill: tuple[int, ...] = tuple(int(255 * m) for m in CLIP_MEAN)):
    """LLaVA's `expand2square`: centre the image on a square of the CLIP mean colour."""
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
