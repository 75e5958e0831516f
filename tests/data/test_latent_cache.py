from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd_lora.data.dataset import DataOptions, ImageDataset
from sd_lora.data.latent_cache import LatentCache, build_latent_cache, read_entry, remove_abandoned_entries, write_entry
from sd_lora.data.scan import scan_dataset
from sd_lora.errors import UserError

from .conftest import write_halves

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


# --- disk cache -----------------------------------------------------------------------------------------

VAE = "tiny-vae config=0123 dtype=float32"


def counting_encode():
    calls = []
    encode = fake_encode(calls)
    encode.images = lambda: sum(shape[0] for shape in calls)
    return encode


def disk_build(ds, cache_dir, vae_id=VAE, batch_size=2):
    encode = counting_encode()
    cache = build_latent_cache(ds, encode, batch_size=batch_size, progress=False, cache_dir=cache_dir, vae_id=vae_id)
    return cache, encode.images()


def entries(cache_dir):
    return sorted(cache_dir.rglob("*.safetensors"))


def test_second_disk_build_encodes_nothing(mixed_folder, tmp_path):
    ds = dataset(mixed_folder, flip=True)
    first, encoded = disk_build(ds, tmp_path / "cache")
    assert encoded == 6 and first.encoded == 6 and first.reused == 0
    assert len(entries(tmp_path / "cache")) == 6  # flipped variants are entries of their own
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave no temporary files
    second, encoded = disk_build(dataset(mixed_folder, flip=True), tmp_path / "cache")
    assert encoded == 0 and second.reused == 6 and not second.warnings
    memory = build_latent_cache(ds, fake_encode([]), batch_size=2, progress=False)
    for i in range(3):
        for flipped in (False, True):
            assert torch.equal(second.get(i, flipped), memory.get(i, flipped))
    assert second.memory_bytes() == 0 and len(second) == 6 and (0, True) in second


def test_disk_entries_are_synced_but_not_their_folders(mixed_folder, tmp_path, monkeypatch):
    """Each entry is fsync'd before its rename (complete or absent after a crash); its folder is not: a lost entry is
    encoded again, and the second fsync per entry doubled the writes' time."""
    from sd_lora import fsio

    files, folders, fsync = [], [], os.fsync
    monkeypatch.setattr(fsio.os, "fsync", lambda fd: files.append(fd) or fsync(fd))
    monkeypatch.setattr(fsio, "_fsync_dir", folders.append)
    disk_build(dataset(mixed_folder, flip=True), tmp_path / "cache")
    assert len(files) == 6 and folders == []


def test_a_killed_writers_entry_temporaries_are_removed_and_nothing_else(mixed_folder, tmp_path):
    """An entry's temporary (.<key>.safetensors.XXXXXXXX.tmp in its sub-folder) outlives a writer killed by kill -9;
    the next run deletes it. Entries, other names and other folders stay."""
    cache = tmp_path / "cache"
    disk_build(dataset(mixed_folder), cache)
    entries = sorted(cache.rglob("*.safetensors"))
    key = "cd" * 32
    leftover = cache / "cd" / f".{key}.safetensors.a1b2c3d4.tmp"
    others = [cache / "cd" / f".{key}.txt.a1b2c3d4.tmp", cache / "cd" / ".short.safetensors.a1b2c3d4.tmp",
              cache / "other" / f".{key}.safetensors.a1b2c3d4.tmp", cache / f".{key}.safetensors.a1b2c3d4.tmp"]
    for path in [leftover, *others]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert remove_abandoned_entries(cache, before=2_000_000_000) == [(leftover, 4)]
    assert all(p.exists() for p in [*entries, *others]) and not leftover.exists()
    assert remove_abandoned_entries(tmp_path / "none", before=2_000_000_000) == []


def test_disk_cache_feeds_samples(mixed_folder, tmp_path):
    ds = dataset(mixed_folder, flip=True)
    ds.latent_cache, _ = disk_build(ds, tmp_path / "cache")
    for seed in range(4):
        sample = ds[(1, seed)]
        assert torch.equal(sample["latents"], ds.latent_cache.get(1, sample["flipped"]))


def test_changed_image_is_encoded_again(mixed_folder, tmp_path):
    disk_build(dataset(mixed_folder), tmp_path / "cache")
    write_halves(mixed_folder / "2_zk" / "square.png", (64, 64))  # same bytes: still reused
    assert disk_build(dataset(mixed_folder), tmp_path / "cache")[1] == 0
    image = mixed_folder / "2_zk" / "square.png"
    Image.new("RGB", (64, 64), (0, 255, 0)).save(image)  # same size and name, new content
    cache, encoded = disk_build(dataset(mixed_folder), tmp_path / "cache")
    assert encoded == 1 and cache.reused == 2
    index = [r.path.name for r in dataset(mixed_folder).records].index("square.png")
    assert cache.get(index, False)[1].mean() > 0.9  # green, not the stale red/blue halves


def test_image_gone_since_the_scan_names_the_file(mixed_folder, tmp_path):
    # Hashing it for the disk key raised a bare FileNotFoundError with a traceback; in memory the load names it.
    ds = dataset(mixed_folder)
    gone = ds.records[1].path
    gone.unlink()
    with pytest.raises(UserError, match=re.escape(
            f"{gone}: cannot read the image to key its latent cache entries (No such file or directory); it was "
            "readable when the data folder was scanned. Restore it, or restart training to rescan")):
        disk_build(ds, tmp_path / "cache")
    with pytest.raises(UserError, match=re.escape(f"{gone}: cannot read file (No such file or directory)")):
        build_latent_cache(ds, fake_encode([]), batch_size=2, progress=False)


def test_changed_bucket_flip_or_vae_is_encoded_again(mixed_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    disk_build(dataset(mixed_folder), cache_dir)
    # flip turned on: only the mirrored variants are new
    cache, encoded = disk_build(dataset(mixed_folder, flip=True), cache_dir)
    assert (encoded, cache.reused) == (3, 3)
    # another resolution: other buckets and crops for every image
    other = ImageDataset(dataset(mixed_folder).records, DataOptions(resolution=48, step=16, min_bucket_side=32, max_bucket_side=96))
    assert disk_build(other, cache_dir)[1] == 3
    # another VAE (or dtype): nothing matches
    assert disk_build(dataset(mixed_folder), cache_dir, vae_id=VAE.replace("float32", "bfloat16"))[1] == 3
    assert len(entries(cache_dir)) == 12


def test_changed_crop_plan_changes_the_key(mixed_folder):
    from dataclasses import replace

    from sd_lora.data.latent_cache import entry_key

    ds = dataset(mixed_folder)
    key = entry_key("abc", ds, 0, False, VAE)
    assert entry_key("abc", ds, 0, False, VAE) == key
    assert entry_key("abd", ds, 0, False, VAE) != key
    assert entry_key("abc", ds, 0, True, VAE) != key
    plan = ds.crop_plan(0)
    ds.crop_plan = lambda index, rng=None: replace(plan, left=plan.left + 1)
    assert entry_key("abc", ds, 0, False, VAE) != key


def test_corrupt_entries_are_encoded_again_with_one_warning(mixed_folder, tmp_path):
    import shutil

    cache_dir = tmp_path / "cache"
    disk_build(dataset(mixed_folder), cache_dir)
    files = entries(cache_dir)
    files[0].write_bytes(files[0].read_bytes()[:40])  # truncated
    shutil.copyfile(files[2], files[1])  # a valid file under another entry's name
    cache, encoded = disk_build(dataset(mixed_folder), cache_dir)
    assert encoded == 2 and cache.reused == 1
    assert len(cache.warnings) == 1
    assert cache.warnings[0].startswith(f"2 unreadable latent cache entries in {cache_dir} were encoded again: ")
    assert "stored key does not match" in cache.warnings[0]
    again, encoded = disk_build(dataset(mixed_folder), cache_dir)  # repaired
    assert encoded == 0 and not again.warnings


def test_entry_unreadable_during_training_names_the_file(mixed_folder, tmp_path):
    cache, _ = disk_build(dataset(mixed_folder), tmp_path / "cache")
    for path in entries(tmp_path / "cache"):
        path.write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"latent cache entry .*\.safetensors became unreadable .* delete it"):
        cache.get(0, False)


def test_full_disk_while_caching_names_the_entry_and_the_fix(mixed_folder, tmp_path, monkeypatch):
    # An OSError from the write (ENOSPC, EROFS) ended the run with a traceback an hour into caching.
    import errno

    from sd_lora.data import latent_cache

    def full(path, data, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(latent_cache, "atomic_write_bytes", full)
    ds = dataset(mixed_folder)
    with pytest.raises(UserError, match=re.escape(
            "): No space left on device; free some space or fix the permissions of "
            f"{tmp_path / 'cache'}, or cache in another folder")) as caught:
        disk_build(ds, tmp_path / "cache")
    assert str(caught.value).startswith(f"could not write latent cache entry {tmp_path / 'cache'}/")
    assert any(f".safetensors (for {r.path}): " in str(caught.value) for r in ds.records)


def test_disk_cache_needs_a_vae_id(mixed_folder, tmp_path):
    with pytest.raises(ValueError, match="needs vae_id"):
        build_latent_cache(dataset(mixed_folder), fake_encode([]), batch_size=2, progress=False, cache_dir=tmp_path)


def test_vae_identity_tracks_name_config_dtype_and_weights():
    from sd_lora.data.latent_cache import vae_identity

    weights = {"conv.weight": torch.ones(2, 2)}
    base = vae_identity("vae", {"scaling_factor": 0.18215}, torch.float32, weights)
    assert base == vae_identity("vae", {"scaling_factor": 0.18215}, torch.float32, {"conv.weight": torch.ones(2, 2)})
    assert base.startswith("vae config=") and "dtype=float32" in base
    changed = [
        vae_identity("other", {"scaling_factor": 0.18215}, torch.float32, weights),
        vae_identity("vae", {"scaling_factor": 0.13025}, torch.float32, weights),
        vae_identity("vae", {"scaling_factor": 0.18215}, torch.bfloat16, weights),
        vae_identity("vae", {"scaling_factor": 0.18215}, torch.float32, {"conv.weight": torch.ones(2, 2) * 1.001}),
    ]
    assert len({base, *changed}) == 5


def test_entry_of_an_image_whose_name_is_not_utf8(tmp_path):
    from safetensors import safe_open

    path, latent = tmp_path / "ab" / "abc.safetensors", torch.randn(4, 8, 8)
    write_entry(path, "abc", latent, tmp_path / os.fsdecode(b"caf\xe9.png"))  # Latin-1 bytes in the file name
    assert torch.equal(read_entry(path, "abc"), latent)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["image"] == f"{tmp_path}/caf\ufffd.png"
