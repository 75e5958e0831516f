"""Open training images as RGB and check that a file really is a usable image.

Every image is opened by `open_image` or `open_image_resized`, so whatever the file holds (alpha, palette, CMYK, 16-bit grey, an
EXIF rotation) the model sees the picture a viewer shows: upright, RGB, transparent areas white.
`check_image` runs once per file at scan time and decodes all of its data, so a truncated download fails
before training starts rather than an hour into it.

A JPEG that will be shrunk is decoded at 1/2, 1/4 or 1/8 of its size where that still leaves twice the target
size (libjpeg's DCT scaling through Pillow's `draft`, with the margin Pillow's own `thumbnail` keeps), and the
final LANCZOS resize does the filtering: 12-megapixel phone photos bound for a 512 px bucket decode and resize
about 1.9 times faster (half of them progressive), 0.3 of a pixel value on average from the full decode
(benchmarks/image_decode.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sd_lora.data.image_warnings import decoding
from sd_lora.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".gif")
"""Lower-case suffixes of the files a scan picks up (matched case-insensitively). `.jfif` is what browsers on Windows
save JPEGs as; an animated GIF or WebP trains its first frame."""

MIN_IMAGE_SIDE = 16
"""Images with a side shorter than this (after EXIF rotation) are refused: too little survives resizing."""

_WHITE = (255, 255, 255)
Box = tuple[float, float, float, float]  # (left, top, right, bottom), as `Image.resize(box=...)` takes it
_ORIENTATION = 0x0112  # the EXIF tag `ImageOps.exif_transpose` applies
_QUARTER_TURNS = (5, 6, 7, 8)  # orientations that swap width and height
REDUCING_GAP = 2
"""A JPEG to shrink is decoded at a scale that leaves at least this many times the target size (as Pillow's
`Image.thumbnail`): the DCT scaling alone filters like a box, so the final resize keeps LANCZOS's quality."""


class ImageProblem(UserError):
    """One image file that cannot be used. `problem` is the short text without the path."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}. Fix or remove the file.")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name ends in one of `IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _decode_upright(path: Path, cover: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int], Box]:
    """Decode `path` and apply its EXIF orientation; raises ImageProblem for anything that fails.

    Returns the image, the picture's full upright (width, height) and the box of the image that holds the picture
    (for `Image.resize(box=...)`). With `cover` (an upright width, height), a JPEG is decoded at the smallest of 1/1,
    1/2, 1/4 and 1/8 of its size that is at least `cover` on both sides, so the image can be smaller than the
    picture; other formats (and lossless JPEGs) decode whole, and their box is the whole image. Pillow's warnings
    meanwhile (a damaged EXIF block) are this file's, for `image_warnings.collect` to count.
    """
    with decoding(path):
        return _decode(path, cover)


def _decode(path: Path, cover: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int], Box]:
    try:
        if os.path.getsize(path) == 0:
            raise ImageProblem(path, "image is empty (0 bytes)")
    except OSError as e:
        raise ImageProblem(path, f"cannot read file ({e.strerror or e})") from e
    try:
        img = Image.open(path)
    except UnidentifiedImageError as e:
        raise ImageProblem(path, "not an image file (Pillow cannot identify it)") from e
    except Image.DecompressionBombError as e:
        sizes = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))  # Pillow's message has both
        raise ImageProblem(path, _bomb(*map(int, sizes.groups())) if sizes else f"decompression bomb: {e}") from e
    except Exception as e:  # OSError with an errno is the file system; anything else is the image data
        raise ImageProblem(path, _describe(e)) from e
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a warning would scroll by unnoticed, so
    # the check is done here explicitly (and without touching the process-wide warnings filter).
    limit = Image.MAX_IMAGE_PIXELS
    pixels = img.width * img.height
    if limit is not None and pixels > limit:
        img.close()
        raise ImageProblem(path, _bomb(pixels, limit))
    try:
        with img:
            orientation = img.getexif().get(_ORIENTATION)
            turned = orientation in _QUARTER_TURNS
            stored = img.size  # before draft shrinks it
            # draft is a no-op (None) for every format but JPEG; it takes the stored orientation's sides. A lossless
            # JPEG (SOF3: no quantization tables) has no DCT to scale: libjpeg returns it whole, into Pillow's reduced
            # buffer, and the decode fails ("broken data stream"), so it is decoded whole.
            scalable = cover is not None and bool(getattr(img, "quantization", None))
            drafted = img.draft(img.mode, (cover[1], cover[0]) if turned else cover) if scalable else None
            img.load()
            upright = ImageOps.exif_transpose(img)
            if upright is img:  # no orientation tag: detach from the file before it closes
                upright = img.copy()
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... for bad data
        raise ImageProblem(path, _describe(e)) from e
    if not drafted:  # the decoded image itself: a TIFF is turned upright by Pillow as it loads, not by exif_transpose
        return upright, upright.size, (0, 0, *upright.size)
    return upright, (stored[1], stored[0]) if turned else stored, _upright_box(drafted[1], img.size, orientation)


def _upright_box(box: Box, decoded: tuple[int, int], orientation: int | None) -> Box:
    """Where the picture lies in a JPEG decoded at reduced scale, once it is turned upright.

    libjpeg rounds each reduced side up, so when a side is not a multiple of the scale the last column (row) holds
    only its last few pixels: the picture spans `box` = (0, 0, width / scale, height / scale) of the `decoded`
    (width, height). Resized without that box, the picture is stretched by up to a reduced pixel (Pillow's
    `thumbnail` passes it too). Turning the image upright moves that column (row) to the other side when the
    orientation reverses the stored x (y) axis, and to the other axis for a quarter turn.
    """
    spill_x, spill_y = decoded[0] - box[2], decoded[1] - box[3]  # of the stored image's last column and row
    left = spill_x if orientation in (2, 3, 7, 8) else 0  # stored x reversed (shown right to left, or bottom to top)
    top = spill_y if orientation in (3, 4, 6, 7) else 0  # stored y reversed
    if orientation in _QUARTER_TURNS:  # stored x is shown vertically, stored y horizontally
        return (top, left, top + box[3], left + box[2])
    return (left, top, left + box[2], top + box[3])


def _bomb(pixels: int, limit: int) -> str:
    return (f"decompression bomb: {pixels} pixels exceeds the limit of {limit} "
            "(Pillow's guard against huge or malicious files); downscale the image")


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return f"cannot read file ({error.strerror or error})"
    detail = str(error) or type(error).__name__
    if "truncated" in detail.lower():
        detail = "truncated file"
    return f"cannot decode image ({detail})"


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """Decode all of the file's data and return its (width, height) after EXIF orientation.

    A JPEG is decoded at 1/8 scale: libjpeg still reads every coded block, so a truncated or corrupt file fails
    all the same, in about half the time of a full decode.

    Raises `ImageProblem` (a `UserError`) with a short `problem` text for empty, unreadable, truncated or
    non-image files, decompression bombs, and images smaller than `MIN_IMAGE_SIDE` on a side.
    """
    path = Path(path)
    _, (width, height), _ = _decode_upright(path, cover=(1, 1))
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise ImageProblem(
            path, f"image too small: {width}x{height} px (the minimum is {MIN_IMAGE_SIDE} px per side)"
        )
    return width, height


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` upright (EXIF orientation applied) in mode "RGB".

    Transparency (RGBA, LA, PA, and P, RGB, L or 16-bit grey with a transparent colour key) is composited on
    white. 16-bit and 32-bit grey modes are scaled so the format's full range maps to 0..255 (65535 -> 255), not
    clipped.
    Raises `ImageProblem` for files that cannot be decoded.
    """
    path = Path(path)
    return to_rgb(_decode_upright(path)[0], path)


def open_image_resized(path: str | os.PathLike, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """`open_image(path).resize(size, LANCZOS)` (`size` an upright width, height), and the picture's full upright size.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale where the result is still `REDUCING_GAP` times `size`: within a
    pixel value or so of the full decode, not equal to it.
    """
    path = Path(path)
    image, full_size, box = _decode_upright(path, (size[0] * REDUCING_GAP, size[1] * REDUCING_GAP))
    return to_rgb(image, path).resize(size, Image.Resampling.LANCZOS, box=box), full_size


def to_rgb(img: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """Convert any Pillow mode to RGB as described in `open_image`; `path` only names the file in errors."""
    mode = img.mode
    if mode in ("P", "RGB", "L") and "transparency" in img.info:  # a PNG colour key (tRNS): that colour is transparent
        mode, img = "RGBA", img.convert("RGBA")
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV ...
    except ValueError as e:
        raise ImageProblem(path, f"unsupported colour mode {mode!r}; re-save the image as RGB") from e


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale a one-channel integer/float image to 8 bits.

    Integer modes ("I;16*", "I") are read as 16-bit: 0..65535 -> 0..255 (Pillow opens 16-bit PNG/TIFF grey
    this way; `convert("RGB")` would clip everything above 255 to white); pixels equal to a PNG colour key are
    white. "F" has no fixed range: values are taken as 0..1 if they all fit, else 0..255 if they fit, else
    0..65535.
    """
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max(initial=0.0))
        full_scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    else:
        full_scale = 65535.0
    grey = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    key = img.info.get("transparency")
    if isinstance(key, int) and img.mode != "F":  # a 16-bit grey PNG's colour key (tRNS): that value is transparent
        grey[np.asarray(img) == key] = _WHITE[0]
    return Image.fromarray(grey).convert("RGB")
