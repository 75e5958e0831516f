from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from sd_lora.data.dataset import BucketBatchSampler, DataOptions, ImageDataset, collate
from sd_lora.data.latent_cache import LatentCache
from sd_lora.data.scan import scan_dataset
from sd_lora.errors import UserError

from .conftest import photo, write_halves

TINY = dict(resolution=64, step=16, min_bucket_side=32, max_bucket_side=128)


def dataset(root, **kw) -> ImageDataset:
    return ImageDataset(scan_dataset(root).records, DataOptions(**TINY, **kw))


def names(ds):
    return [r.path.name for r in ds.records]


def test_buckets_per_image(mixed_folder):
    ds = dataset(mixed_folder)
    assert names(ds) == ["tall.png", "square.png", "wide.png"]
    assert ds.bucket_of == [(48, 80), (64, 64), (80, 48)]
    assert ds.bucket_counts() == {(48, 80): 1, (64, 64): 2, (80, 48): 2}
    assert len(ds) == 3


def test_bucket_info_is_kohyas_ss_bucket_info(mixed_folder):
    info = dataset(mixed_folder).bucket_info()
    assert info["buckets"] == {"0": {"resolution": [48, 80], "count": 1}, "1": {"resolution": [64, 64], "count": 2},
                               "2": {"resolution": [80, 48], "count": 2}}
    # tall 48x96 in 48x80: |0.6 - 0.5|; square: 0; wide 96x48 in 80x48: |5/3 - 2|
    assert info["mean_img_ar_error"] == pytest.approx((0.1 + 0 + 1 / 3) / 3)


def test_no_buckets_gives_squares(mixed_folder):
    ds = dataset(mixed_folder, buckets=False)
    assert ds.bucket_of == [(64, 64)] * 3


def test_sample_shape_range_and_sizes(mixed_folder):
    ds = dataset(mixed_folder)
    sample = ds[(2, 123)]  # wide.png 96x48 -> bucket 80x48: resized to 96x48, cropped 8 px each side
    assert sample["pixels"].shape == (3, 48, 80) and sample["pixels"].dtype == torch.float32
    assert sample["pixels"].min() >= -1 and sample["pixels"].max() <= 1
    assert sample["original_size"] == (48, 96)
    assert sample["crop_top_left"] == (0, 8)
    assert sample["target_size"] == (48, 80)
    assert (sample["flipped"], sample["index"], sample["caption"]) == (False, 2, "zk, red, blue, wide")
    # Left half red, right half blue: exact colours away from the seam survive the resize.
    assert sample["pixels"][:, 10, 2].tolist() == [1.0, -1.0, -1.0]
    assert sample["pixels"][:, 10, 77].tolist() == [-1.0, -1.0, 1.0]


def test_flip_is_deterministic_per_key(mixed_folder):
    ds = dataset(mixed_folder, flip=True)
    samples = {seed: ds[(1, seed)] for seed in range(20)}
    flips = [s["flipped"] for s in samples.values()]
    assert 0 < sum(flips) < 20
    for seed, sample in samples.items():
        again = ds[(1, seed)]
        assert again["flipped"] == sample["flipped"] and torch.equal(again["pixels"], sample["pixels"])
        red_side = 2 if not sample["flipped"] else 61
        assert sample["pixels"][:, 5, red_side].tolist() == [1.0, -1.0, -1.0]
    unflipped = dataset(mixed_folder)[(1, 0)]["pixels"]
    flipped_seed = flips.index(True)
    assert torch.equal(samples[flipped_seed]["pixels"], unflipped.flip(-1))


def test_flip_option_does_not_change_caption_or_crop(mixed_folder):
    plain = dataset(mixed_folder, shuffle_tags=True, random_crop=True)
    flipping = dataset(mixed_folder, shuffle_tags=True, random_crop=True, flip=True)
    flips = 0
    for seed in range(10):
        a, b = plain[(2, seed)], flipping[(2, seed)]
        assert a["caption"] == b["caption"]
        top, left = a["crop_top_left"]  # 96x48 resized, 80x48 cut out of it: 16 px of margin in all
        # SDXL's crop condition describes the image the model sees: a mirrored crop starts at the right margin.
        assert b["crop_top_left"] == ((top, 16 - left) if b["flipped"] else (top, left))
        if b["flipped"]:
            assert torch.equal(b["pixels"], a["pixels"].flip(-1))
            flips += 1
    assert 0 < flips < 10


def test_caption_processing_and_random_crop(mixed_folder):
    ds = dataset(mixed_folder, shuffle_tags=True, keep_tokens=1, random_crop=True)
    captions = {ds[(2, s)]["caption"] for s in range(30)}
    assert len(captions) > 1 and all(c.startswith("zk, ") for c in captions)
    crops = {ds[(2, s)]["crop_top_left"] for s in range(60)}  # 96x48 into 80x48: left in 0..16, top 0
    assert len(crops) > 5 and {top for top, _ in crops} == {0} and all(0 <= left <= 16 for _, left in crops)
    assert ds[(2, 11)]["crop_top_left"] == ds[(2, 11)]["crop_top_left"]


def test_keys_must_be_tuples(mixed_folder):
    with pytest.raises(TypeError, match=r"\(record_index, sample_seed\)"):
        dataset(mixed_folder)[0]


def test_latent_cache_excludes_random_crop(mixed_folder):
    ds = dataset(mixed_folder, random_crop=True)
    with pytest.raises(ValueError, match="random_crop"):
        ds.latent_cache = LatentCache()


def test_latent_samples_skip_the_image(mixed_folder):
    ds = dataset(mixed_folder, flip=True)
    cache = LatentCache()
    for i in range(3):
        for flipped in (False, True):
            cache.put(i, flipped, torch.full((4, 2, 2), float(i + 10 * flipped)))
    ds.latent_cache = cache
    for record in ds.records:
        record.path.unlink()
    for seed in range(6):
        sample = ds[(1, seed)]
        assert "pixels" not in sample
        assert sample["latents"][0, 0, 0].item() == 1 + 10 * sample["flipped"]


@pytest.mark.parametrize("kw", [dict(no_upscale=True, buckets=False), dict(caption_dropout=2.0),
                                dict(keep_tokens=-1), dict(step=0)])
def test_options_validated(kw):
    with pytest.raises(ValueError):
        DataOptions(**(TINY | kw))


# --- sampler ---

BUCKETS = [(64, 64), (48, 80), (64, 64), (80, 48), (64, 64), (48, 80), (64, 64)]
REPEATS = [1, 3, 2, 1, 1, 2, 5]


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_groups_buckets_and_repeats():
    sampler = BucketBatchSampler(BUCKETS, REPEATS, batch_size=3, seed=1)
    batches = epoch_batches(sampler, 0)
    # buckets: (64,64) holds 1+2+1+5 = 9 -> 3 batches, (48,80) 3+2 = 5 -> 2, (80,48) 1 -> 1
    assert len(sampler) == len(batches) == 6
    assert sorted(len(b) for b in batches) == [1, 2, 3, 3, 3, 3]
    for batch in batches:
        assert len({BUCKETS[i] for i, _ in batch}) == 1
    counts = Counter(i for batch in batches for i, _ in batch)
    assert [counts[i] for i in range(len(BUCKETS))] == REPEATS
    seeds = [s for batch in batches for _, s in batch]
    assert len(set(seeds)) == len(seeds) == sum(REPEATS)


def test_sampler_is_deterministic_and_varies_by_epoch():
    a = BucketBatchSampler(BUCKETS, REPEATS, batch_size=2, seed=7)
    b = BucketBatchSampler(BUCKETS, REPEATS, batch_size=2, seed=7)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 3) != epoch_batches(a, 4)
    other_seed = BucketBatchSampler(BUCKETS, REPEATS, batch_size=2, seed=8)
    assert epoch_batches(other_seed, 3) != epoch_batches(a, 3)


def test_sampler_shuffles_batch_order_across_buckets():
    sampler = BucketBatchSampler(BUCKETS, REPEATS, batch_size=2, seed=0)
    orders = {tuple(BUCKETS[batch[0][0]] for batch in epoch_batches(sampler, e)) for e in range(10)}
    assert len(orders) > 1
    assert any(list(order) != sorted(order) for order in orders)  # buckets interleave, not one after another


def test_sampler_without_shuffle():
    sampler = BucketBatchSampler(BUCKETS, REPEATS, batch_size=4, seed=0, shuffle=False)
    indices = [[i for i, _ in batch] for batch in sampler]
    assert indices == [[1, 1, 1, 5], [5], [0, 2, 2, 4], [6, 6, 6, 6], [6], [3]]


@pytest.mark.parametrize("args", [(BUCKETS, REPEATS[:-1], 2, 0), (BUCKETS, REPEATS, 0, 0),
                                  (BUCKETS, [0] * len(BUCKETS), 2, 0)])
def test_sampler_validates(args):
    with pytest.raises(ValueError):
        BucketBatchSampler(*args)


# --- collate / DataLoader ---

def test_collate_through_a_dataloader(mixed_folder):
    ds = dataset(mixed_folder, flip=True)
    sampler = BucketBatchSampler(ds.bucket_of, [r.repeats for r in ds.records], batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(sampler) == 3
    shapes = sorted(tuple(b["pixels"].shape) for b in batches)
    assert shapes == [(1, 3, 80, 48), (2, 3, 48, 80), (2, 3, 64, 64)]
    for batch in batches:
        n = batch["pixels"].shape[0]
        h, w = batch["pixels"].shape[-2:]
        assert batch["target_size"].dtype == torch.long and batch["target_size"].tolist() == [[h, w]] * n
        assert batch["original_size"].shape == batch["crop_top_left"].shape == (n, 2)
        assert len(batch["captions"]) == len(batch["flipped"]) == len(batch["index"]) == n


def test_collate_latents_and_refuses_mixtures():
    sample = dict(latents=torch.zeros(4, 8, 6), caption="a", original_size=(48, 64), crop_top_left=(0, 1),
                  target_size=(64, 48), flipped=False, index=0)
    batch = collate([sample, sample | {"index": 1}])
    assert batch["latents"].shape == (2, 4, 8, 6) and batch["index"] == [0, 1]
    assert batch["captions"] == ["a", "a"] and batch["flipped"] == [False, False]
    assert batch["crop_top_left"].tolist() == [[0, 1], [0, 1]]
    pixel_sample = {k: v for k, v in sample.items() if k != "latents"} | {"pixels": torch.zeros(3, 64, 48)}
    with pytest.raises(ValueError, match="mixes"):
        collate([sample, pixel_sample])


def test_workers_give_the_same_batches(mixed_folder):
    ds = dataset(mixed_folder, flip=True, shuffle_tags=True, random_crop=True)
    sampler = BucketBatchSampler(ds.bucket_of, [r.repeats for r in ds.records], batch_size=2, seed=3)
    sampler.set_epoch(1)

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=workers)
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and a["captions"] == b["captions"]
        assert a["flipped"] == b["flipped"] and torch.equal(a["crop_top_left"], b["crop_top_left"])


def test_image_broken_after_scan_is_a_user_error(mixed_folder):
    ds = dataset(mixed_folder)
    ds.records[0].path.write_bytes(b"")
    with pytest.raises(UserError, match=r"tall\.png: image is empty \(0 bytes\)") as caught:
        ds[(0, 0)]
    # DataLoader workers re-raise `type(error)(message)`; a one-argument UserError survives that intact
    # (running real workers here would cost torch's 5 s shutdown timeout after a worker error).
    assert type(caught.value) is UserError
    assert type(caught.value)(str(caught.value)).args == caught.value.args


def test_image_resized_after_scan_is_refused(mixed_folder):
    ds = dataset(mixed_folder)
    write_halves(ds.records[1].path, (80, 64))
    with pytest.raises(UserError, match=r"square\.png: image changed since the data folder was scanned "
                                        r"\(was 64x64, now 80x64\)"):
        ds[(1, 0)]


def test_a_large_jpeg_loads_as_the_full_decode_would(tmp_path):
    # 640x480 -> bucket 80x48 (resized to 80x60): the JPEG is decoded at 1/4 scale, 160x120, then resized.
    from PIL import Image

    path = photo(tmp_path / "data" / "a.jpg", (640, 480))
    ds = dataset(tmp_path / "data", flip=False)
    plan = ds.crop_plan(0)
    assert ds.bucket_of == [(80, 48)] and (plan.resize_width, plan.resize_height) == (80, 60)
    full = Image.open(path).convert("RGB").resize((80, 60), Image.Resampling.LANCZOS).crop(
        (plan.left, plan.top, plan.left + 80, plan.top + 48))
    expected = torch.tensor(np.asarray(full), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
    difference = (ds.load_pixels(0, plan) - expected).abs() * 127.5
    assert difference.mean() < 1.0 and difference.max() <= 8
    path.write_bytes(photo(tmp_path / "b.jpg", (480, 640)).read_bytes())
    with pytest.raises(UserError, match=r"a\.jpg: image changed since the data folder was scanned \(was 640x480, now 480x640\)"):
        ds.load_pixels(0, plan)


@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_a_jpeg_whose_sides_are_no_multiple_of_the_decode_scale_loads_as_the_full_decode_would(tmp_path, orientation):
    # 1001x667 for a bucket 80x48 decodes at 1/4 scale to 251x167: libjpeg rounds up, so the last column and row
    # hold a quarter and three quarters of a reduced pixel. Resized whole, the picture was stretched by up to a
    # reduced pixel (3.3 levels of 255 off on average); EXIF orientations put that column and row on other sides.
    from PIL import Image, ImageOps

    path = photo(tmp_path / "data" / "a.jpg", (1001, 667), orientation)
    ds = dataset(tmp_path / "data", flip=False)
    plan = ds.crop_plan(0)
    width, height = ds.bucket_of[0]
    full = ImageOps.exif_transpose(Image.open(path)).convert("RGB").resize(
        (plan.resize_width, plan.resize_height), Image.Resampling.LANCZOS).crop(
        (plan.left, plan.top, plan.left + width, plan.top + height))
    expected = torch.tensor(np.asarray(full), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
    difference = (ds.load_pixels(0, plan) - expected).abs() * 127.5
    assert difference.mean() < 1.0 and difference.max() <= 16


def test_sampler_resumes_mid_epoch_with_the_same_keys():
    from sd_lora.data.dataset import BucketBatchSampler

    buckets = [(64, 64)] * 5 + [(48, 80)] * 4
    sampler = BucketBatchSampler(buckets, [2] * 9, batch_size=2, seed=3)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, start_batch=4)
    assert list(sampler) == full[4:]
    assert len(sampler) == len(full)  # len is the whole epoch


def test_sampler_shards_global_batches_across_ranks():
    from sd_lora.data.dataset import BucketBatchSampler

    buckets = [(64, 64)] * 5 + [(48, 80)] * 3
    repeats = [1, 2, 1, 1, 3, 1, 1, 2]
    single = BucketBatchSampler(buckets, repeats, batch_size=4, seed=9)
    ranks = [BucketBatchSampler(buckets, repeats, batch_size=2, seed=9, num_replicas=2, rank=r) for r in (0, 1)]
    for s in (single, *ranks):
        s.set_epoch(2)
    global_batches, rank0, rank1 = list(single), list(ranks[0]), list(ranks[1])
    assert len(ranks[0]) == len(ranks[1]) == len(single) == len(global_batches) == len(rank0) == len(rank1)
    for g, a, b in zip(global_batches, rank0, rank1):
        assert len(a) == len(b)  # equal work per rank, padded if needed
        assert {buckets[i] for i, _ in a + b} == {buckets[g[0][0]]}  # one bucket across ranks
        if len(g) % 2 == 0:
            assert a + b == g  # the same global batch as one process with twice the batch size
        else:
            assert (a + b)[: len(g)] == g and (a + b)[len(g):] == g[: len(a + b) - len(g)]
