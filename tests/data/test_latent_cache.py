from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd_lora.data.dataset import DataOptions, ImageDataset
from sd_lora.data.latent_cache import LatentCache, build_latent_cache
from sd_lora.data.scan import scan_dataset
from sd_lora.errors import UserError

TINY = dict(resolution=64, step=16, min_bucket_side=32, max_bucket_side=128)


def fake_encode(calls):
    """A stand-in VAE: 4x average pooling, the three colours plus their mean as 4 channels."""

    def encode(pixels):  # (B, 3, H, W) -> (B, 4, H/4, W/4)
        calls.append(tuple(pixels.shape))
        assert pixels.min() >= -1 and pixels.max() <= 1
        pooled = F.avg_pool2d(pixels, 4)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    return encode


def dataset(root, **kw):
    return ImageDataset(scan_dataset(root).records, DataOptions(**TINY, **kw))


def test_cache_keys_shapes_and_batches(mixed_folder):
    ds = dataset(mixed_folder)
    calls = []
    cache = build_latent_cache(ds, fake_encode(calls), batch_size=4, progress=False)
    assert len(cache) == 3
    assert [tuple(cache.get(i, False).shape) for i in range(3)] == [(4, 20, 12), (4, 16, 16), (4, 12, 20)]
    # one call per bucket: every batch holds equal-sized images
    assert sorted(calls) == [(1, 3, 48, 80), (1, 3, 64, 64), (1, 3, 80, 48)]
    assert cache.memory_bytes() == 4 * 4 * (20 * 12 + 16 * 16 + 12 * 20)
    assert (0, True) not in cache
    with pytest.raises(KeyError, match="no flipped latent for record 0"):
        cache.get(0, True)
    # the cached latent is the encoded centre crop the pixel path produces
    pixels = ds.load_pixels(2, ds.crop_plan(2))
    assert torch.allclose(cache.get(2, False), fake_encode([])(pixels[None])[0])


def test_flip_adds_mirrored_latents(mixed_folder):
    ds = dataset(mixed_folder, flip=True)
    calls = []
    cache = build_latent_cache(ds, fake_encode(calls), batch_size=1, progress=False)
    assert len(cache) == 6 and len(calls) == 6
    for i in range(3):
        # avg-pooling commutes with a mirror when the width is a multiple of 4
        assert torch.allclose(cache.get(i, True), cache.get(i, False).flip(-1))
        assert not torch.equal(cache.get(i, True), cache.get(i, False))


def test_attached_cache_feeds_samples(mixed_folder):
    ds = dataset(mixed_folder, flip=True)
    ds.latent_cache = build_latent_cache(ds, fake_encode([]), batch_size=2, progress=False)
    for seed in range(8):
        sample = ds[(0, seed)]
        assert torch.equal(sample["latents"], ds.latent_cache.get(0, sample["flipped"]))


def test_non_finite_latents_name_the_file(mixed_folder):
    ds = dataset(mixed_folder)

    def encode(pixels):
        latents = fake_encode([])(pixels)
        if pixels.shape[-1] == 64:  # only square.png
            latents[0, 1, 2, 3] = float("nan")
        return latents

    expected = r"latents for .*square\.png contain NaN/inf; the VAE may overflow in fp16"
    with pytest.raises(UserError, match=expected):
        build_latent_cache(ds, encode, batch_size=2, progress=False)


def test_random_crop_is_refused(mixed_folder):
    with pytest.raises(ValueError, match="random_crop"):
        build_latent_cache(dataset(mixed_folder, random_crop=True), fake_encode([]), batch_size=2,
                           progress=False)


def test_wrong_encode_output_shape(mixed_folder):
    with pytest.raises(ValueError, match="expected \\(B, C, h, w\\)"):
        build_latent_cache(dataset(mixed_folder), lambda x: x.mean((1, 2, 3)), batch_size=2, progress=False)


def test_put_copies_to_its_own_storage():
    cache = LatentCache()
    batch = torch.zeros(2, 4, 8, 8)
    cache.put(0, False, batch[0])
    batch[0] += 1
    assert cache.get(0, False).sum() == 0 and cache.memory_bytes() == 4 * 8 * 8 * 4
    assert cache.get(0, False).untyped_storage().nbytes() == 4 * 8 * 8 * 4  # not the whole batch
