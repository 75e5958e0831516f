"""Aspect-ratio buckets: which training size each image gets, and how it is resized and cropped into it.

All sizes are in pixels as (width, height). Instead of centre-cropping every image to a square, each image
goes to the bucket whose aspect ratio is closest to its own (NovelAI's aspect-ratio bucketing, as in kohya
sd-scripts), so little of the picture is cropped away; every bucket has about the same pixel count, so the
cost per step stays even. Pure functions: nothing here opens a file.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """All bucket sizes for a training `resolution` (the side of the square with the target area).

    Kohya's construction: for every width from `min_side` to `max_side` in `step`s, the height is the
    largest multiple of `step` with width * height <= resolution**2, capped at `max_side`; both
    orientations are added, plus the square. Sorted, without duplicates.
    """
    for name, value in (("resolution", resolution), ("step", step), ("min_side", min_side),
                        ("max_side", max_side)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if min_side % step or max_side % step:
        raise ValueError(
            f"min_side ({min_side}) and max_side ({max_side}) must be multiples of step ({step})"
        )
    if not min_side <= resolution <= max_side:
        raise ValueError(f"need min_side <= resolution <= max_side, got {min_side}, {resolution}, {max_side}")
    max_area = resolution * resolution
    side = (resolution // step) * step
    buckets = {(side, side)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def square_bucket(resolution: int) -> Size:
    """The single bucket used without bucketing (`--no-buckets`): a square centre crop at `resolution`."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return (resolution, resolution)


def choose_bucket(
    width: int, height: int, buckets: list[Size], *, step: int, resolution: int, no_upscale: bool
) -> Size:
    """The bucket for an image of `width` x `height`: the one closest in log aspect ratio.

    Ties go to the larger bucket, then the smaller (width, height), so the choice is deterministic.
    With `no_upscale`, an image smaller than resolution**2 gets its own size rounded down to multiples of
    `step` instead (kohya `--bucket_no_upscale`); so does an image whose nearest bucket would not fit
    inside it (extreme aspect ratios), after scaling it down to the target area. A side shorter than
    `step` still becomes `step`: the one case where no_upscale enlarges (by less than `step` pixels).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    max_area = resolution * resolution
    if no_upscale and width * height < max_area:
        return _own_size(width, height, step)
    aspect = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1], b))
    if no_upscale and (best[0] > width or best[1] > height):
        scale = math.sqrt(max_area / (width * height))  # < 1 here: the image is larger than the target area
        return _own_size(width * scale, height * scale, step)
    return best


def _own_size(width: float, height: float, step: int) -> Size:
    """Each side rounded down to a multiple of `step`, at least `step`."""
    return (max(step, int(width) // step * step), max(step, int(height) // step * step))


@dataclass(frozen=True)
class CropPlan:
    """Resize the image to (resize_width, resize_height), then crop the bucket at (left, top)."""

    resize_width: int
    resize_height: int
    left: int
    top: int


def plan_crop(
    width: int, height: int, bucket: Size, *, random_crop: bool, rng: random.Random | None
) -> CropPlan:
    """Scale the image so it covers `bucket` (scale = max(bw/w, bh/h)), then crop the overflow.

    The resized sides are rounded up, so they are never smaller than the bucket. The crop is centred, or
    with `random_crop` placed at a random offset: draws exactly two `rng.random()` (left, then top).
    """
    bucket_width, bucket_height = bucket
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = max(bucket_width / width, bucket_height / height)
    # The tolerance keeps float noise (512 * (1024/512) = 1024.0000000001) from adding a pixel.
    resize_width = max(bucket_width, math.ceil(width * scale - 1e-6))
    resize_height = max(bucket_height, math.ceil(height * scale - 1e-6))
    spare_x, spare_y = resize_width - bucket_width, resize_height - bucket_height
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        u_left, u_top = rng.random(), rng.random()
        left, top = min(spare_x, int(u_left * (spare_x + 1))), min(spare_y, int(u_top * (spare_y + 1)))
    else:
        left, top = spare_x // 2, spare_y // 2
    return CropPlan(resize_width, resize_height, left, top)
