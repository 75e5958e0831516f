from __future__ import annotations

import math
import random

import pytest

from sd_lora.data.buckets import CropPlan, choose_bucket, make_buckets, plan_crop, square_bucket

SD15 = dict(resolution=512, step=64, min_side=256, max_side=1024)


def test_make_buckets_kohya_list():
    assert make_buckets(**SD15) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
        (1024, 256),
    ]


@pytest.mark.parametrize("resolution,step,min_side,max_side", [
    (512, 64, 256, 1024), (768, 64, 256, 1536), (1024, 32, 512, 2048), (64, 16, 32, 128),
    (520, 64, 256, 1024),
])
def test_bucket_invariants(resolution, step, min_side, max_side):
    buckets = make_buckets(resolution, step, min_side, max_side)
    assert buckets == sorted(set(buckets))
    side = resolution // step * step
    assert (side, side) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert min_side <= w <= max_side and min_side <= h <= max_side
        assert w * h <= resolution * resolution
        assert (h, w) in buckets
        # as large as possible for its aspect, in one orientation or the other: one more step on the
        # shorter-computed side would exceed the area or the max side
        def maximal(a, b):
            return a * (b + step) > resolution * resolution or b + step > max_side
        assert maximal(w, h) or maximal(h, w) or (w, h) == (side, side)


@pytest.mark.parametrize("args", [(512, 64, 250, 1024), (512, 0, 256, 1024), (512, 64, 576, 1024),
                                  (512, 64, 256, 448), (-512, 64, 256, 1024)])
def test_make_buckets_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        make_buckets(*args)


def choose(width, height, no_upscale=False):
    return choose_bucket(width, height, make_buckets(**SD15), step=64, resolution=512, no_upscale=no_upscale)


def test_choose_bucket_nearest_log_aspect():
    assert choose(1000, 1000) == (512, 512)
    assert choose(1000, 500) == (704, 320)   # 2.2 is nearer 2 in log space than 1.67
    assert choose(500, 1000) == (320, 704)
    assert choose(4000, 100) == (1024, 256)  # the most extreme bucket
    assert choose(300, 200) == (640, 384)    # upscaled when allowed; 1.67 is nearer 1.5 than 1.29


def test_choose_bucket_minimises_log_aspect_error():
    buckets = make_buckets(**SD15)
    for width, height in [(123, 456), (640, 480), (1920, 1080), (1000, 1001)]:
        best = choose(width, height)
        error = lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height))  # noqa: E731
        assert error(best) == min(error(b) for b in buckets)


def test_no_upscale_keeps_small_images_small():
    assert choose(300, 200, no_upscale=True) == (256, 192)
    assert choose(40, 500, no_upscale=True) == (64, 448)  # a side under one step becomes one step
    assert choose(2000, 1000, no_upscale=True) == (704, 320)  # large enough: the normal bucket
    for width, height in [(300, 200), (511, 511), (100, 900), (3000, 100), (700, 300)]:
        w, h = choose(width, height, no_upscale=True)
        assert w <= max(width, 64) and h <= max(height, 64)
        assert w % 64 == 0 and h % 64 == 0


def test_no_upscale_extreme_aspect_scales_to_the_area():
    # 3000x100 is above 512^2 in area, but its nearest bucket (1024x256) is taller than the image.
    assert choose(3000, 100, no_upscale=True) == (2752, 64)


def test_square_bucket():
    assert square_bucket(768) == (768, 768)


def test_plan_crop_centre():
    assert plan_crop(1000, 500, (704, 320), random_crop=False, rng=None) == CropPlan(704, 352, 0, 16)
    assert plan_crop(500, 1000, (320, 704), random_crop=False, rng=None) == CropPlan(352, 704, 16, 0)
    assert plan_crop(512, 512, (512, 512), random_crop=False, rng=None) == CropPlan(512, 512, 0, 0)
    assert plan_crop(256, 256, (512, 512), random_crop=False, rng=None) == CropPlan(512, 512, 0, 0)


@pytest.mark.parametrize("size", [(1000, 500), (333, 777), (640, 481), (97, 3001), (1024, 1024)])
def test_plan_crop_covers_bucket(size):
    width, height = size
    rng = random.Random(0)
    for bucket in make_buckets(**SD15):
        for random_crop in (False, True):
            plan = plan_crop(width, height, bucket, random_crop=random_crop, rng=rng)
            assert plan.resize_width >= bucket[0] and plan.resize_height >= bucket[1]
            assert 0 <= plan.left <= plan.resize_width - bucket[0]
            assert 0 <= plan.top <= plan.resize_height - bucket[1]
            # aspect kept to within the one pixel of rounding up
            scale = max(bucket[0] / width, bucket[1] / height)
            assert plan.resize_width - 1 < width * scale + 1 and plan.resize_height - 1 < height * scale + 1


def test_random_crop_spans_the_range_and_is_seeded():
    plans = [plan_crop(1000, 500, (704, 320), random_crop=True, rng=random.Random(s)) for s in range(300)]
    tops = {p.top for p in plans}
    assert min(tops) == 0 and max(tops) == 32 and {p.left for p in plans} == {0}
    assert plan_crop(1000, 500, (704, 320), random_crop=True, rng=random.Random(5)) == plans[5]
    with pytest.raises(ValueError):
        plan_crop(1000, 500, (704, 320), random_crop=True, rng=None)
