"""Encode every training image once, so the VAE is not run (or even kept on the GPU) during training.

The data package knows nothing about the VAE: `build_latent_cache` takes an `encode` callable that maps
pixels (B, 3, H, W) in [-1, 1] to latents (B, C, h, w), scaling factor already applied. A cached image is
always the planned centre crop; with flip augmentation the mirrored crop is encoded as well.

    cache = build_latent_cache(dataset, encode, batch_size=4)                       # in memory
    cache = build_latent_cache(dataset, encode, batch_size=4, cache_dir=d, vae_id=vae_identity(...))  # on disk
    dataset.latent_cache = cache

On disk every entry is one safetensors file, `cache_dir/ab/abcdef....safetensors`, named by the sha256 of
everything that decides its latent: the image file's content, the bucket, the crop plan, the flip, the VAE's
identity and `CACHE_FORMAT`. A changed image or setting therefore never meets a stale entry: it looks up
another name, and a second run with the same inputs encodes nothing. Old entries are never deleted (delete
the folder to reclaim the space); the temporary file of an entry whose writer was killed is
(`remove_abandoned_entries`). Entries are read back lazily, one file per sample, so a disk cache keeps
the training process's memory flat however large the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from sd_lora.data import image_warnings
from sd_lora.data.dataset import ImageDataset
from sd_lora.errors import UserError
from sd_lora.fsio import atomic_write_bytes, file_sha256, readable, remove_abandoned

Encode = Callable[[torch.Tensor], torch.Tensor]
# Part of every disk key: bump it when the pixels an entry is encoded from change for the same file and
# crop plan (image decoding, resampling filter, value range), so older entries stop matching.
CACHE_FORMAT = "sd_lora-latents-v4 lanczos [-1,1]"  # v2: PNG colour-key transparency on white; v3: JPEG DCT scaling; v4: its partial last block unstretched
SHOWN_CORRUPT = 5  # corrupt entries named in the warning; the rest are counted


class LatentCache:
    """Latents keyed by (record_index, flipped): tensors in memory, or safetensors files read on `get`.

    `encoded` and `reused` count the entries this build encoded and found on disk; `warnings` holds one
    summary line per kind of problem met while building (print them, as with `ScanResult.warnings`).
    """

    def __init__(self, latents: dict[tuple[int, bool], torch.Tensor] | None = None):
        self._latents: dict[tuple[int, bool], torch.Tensor] = dict(latents or {})
        self._files: dict[tuple[int, bool], Path] = {}
        self.encoded = 0
        self.reused = 0
        self.warnings: list[str] = []

    def put(self, index: int, flipped: bool, latent: torch.Tensor) -> None:
        """Store a (C, h, w) latent; it is copied to the CPU with its own storage."""
        self._latents[(index, bool(flipped))] = latent.detach().to("cpu", copy=True)

    def put_file(self, index: int, flipped: bool, path: Path) -> None:
        """Point the entry at a safetensors file written by `write_entry` (read on every `get`)."""
        self._files[(index, bool(flipped))] = Path(path)

    def get(self, index: int, flipped: bool) -> torch.Tensor:
        key = (index, bool(flipped))
        if key in self._latents:
            return self._latents[key]
        if key in self._files:
            path = self._files[key]
            try:
                return read_entry(path)
            except (OSError, ValueError) as e:
                raise UserError(f"latent cache entry {path} became unreadable during training ({e}); delete it "
                                "and restart: the next run encodes that image again") from None
        variant = "flipped" if flipped else "unflipped"
        raise KeyError(f"no {variant} latent for record {index}; was the cache built for this dataset "
                       "(with the same flip option)?")

    def __contains__(self, key: tuple[int, bool]) -> bool:
        key = (key[0], bool(key[1]))
        return key in self._latents or key in self._files

    def __len__(self) -> int:
        return len(self._latents) + len(self._files)

    def memory_bytes(self) -> int:
        """Bytes of the latents held in memory (entries on disk count 0)."""
        return sum(t.numel() * t.element_size() for t in self._latents.values())


# --- disk entries ---------------------------------------------------------------------------------------


def vae_identity(name: str, config: Mapping, dtype: torch.dtype | str, tensors: Mapping[str, torch.Tensor] | None = None) -> str:
    """A string naming the encoder that made a latent: `name`, a hash of `config`, the dtype, and (optional,
    recommended) a hash of the encoder's weights, so a VAE replaced in place under the same name is noticed.

    Pass e.g. `model.vae.config`, `model.vae.dtype` and the state dict of `vae.encoder` + `vae.quant_conv`
    (hashing SD's 34M encoder parameters takes about a second on a CPU).
    """
    h = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    parts = [name, f"config={h.hexdigest()[:16]}", f"dtype={str(dtype).removeprefix('torch.')}"]
    if tensors is not None:
        w = hashlib.sha256()
        for key in sorted(tensors):
            t = tensors[key].detach().to("cpu").contiguous()
            w.update(f"{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
            w.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        parts.append(f"weights={w.hexdigest()[:16]}")
    return " ".join(parts)


def content_sha256(path: Path) -> str:
    """`fsio.file_sha256` of the image; a `UserError` when the file cannot be read: an image deleted, moved or
    locked since the scan."""
    try:
        return file_sha256(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read the image to key its latent cache entries ({e.strerror or e}); it was "
                        "readable when the data folder was scanned. Restore it, or restart training to rescan") from None


def entry_key(content: str, dataset: ImageDataset, index: int, flipped: bool, vae_id: str) -> str:
    """The name of record `index`'s entry: sha256 over everything that decides its latent."""
    plan = dataset.crop_plan(index)
    width, height = dataset.bucket_of[index]
    fields = [CACHE_FORMAT, content, f"bucket={width}x{height}",
              f"crop={plan.resize_width}x{plan.resize_height}+{plan.left}+{plan.top}", f"flip={int(flipped)}",
              f"vae={vae_id}"]
    return hashlib.sha256("\0".join(fields).encode()).hexdigest()


_SUBFOLDER = re.compile(r"[0-9a-f]{2}")  # entry_path's folders and names
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")


def entry_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"  # 256 sub-folders keep each folder small


def remove_abandoned_entries(cache_dir: Path, before: float) -> list[tuple[Path, int]]:
    """Delete the temporary files of entries whose writer was killed (`fsio.remove_abandoned`: those of a live
    writer, such as another run sharing the folder, stay), in the sub-folders `entry_path` makes; (path, bytes) of each."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    folders = sorted(p for p in cache_dir.iterdir() if _SUBFOLDER.fullmatch(p.name) and p.is_dir())
    return [removed for folder in folders
            for removed in remove_abandoned(folder, owns=lambda name: _ENTRY_NAME.fullmatch(name) is not None, before=before)]


def write_entry(path: Path, key: str, latent: torch.Tensor, source: Path) -> None:
    """Atomically write one (C, h, w) latent; `key` is stored too, so a renamed file is not trusted. A failed write
    is a `UserError` naming the entry and the image."""
    from safetensors.torch import save

    data = save({"latent": latent.detach().to("cpu").contiguous()}, metadata={"key": key, "image": readable(source)})
    # The file is fsync'd before its rename, so an entry is complete or absent; the folder is not (one fsync an entry
    # instead of two): an entry a power cut loses is encoded again by the next run.
    try:
        atomic_write_bytes(path, data, sync_folder=False)
    except OSError as e:  # a full disk, a folder made read-only or unmounted since the run started
        raise UserError(f"could not write latent cache entry {path} (for {source}): {e.strerror or e}; free some space "
                        f"or fix the permissions of {path.parent.parent}, or cache in another folder") from None


def read_entry(path: Path, key: str | None = None) -> torch.Tensor:
    """The latent stored at `path`; ValueError when it is not a complete, finite entry (for `key`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            latent = f.get_tensor("latent")
    except SafetensorError as e:
        raise ValueError(f"not a safetensors file ({e})") from None
    except Exception as e:  # a missing "latent" tensor, a torch decoding error ...
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if key is not None and metadata.get("key") != key:
        raise ValueError("the stored key does not match its file name")
    if latent.ndim != 3 or not torch.isfinite(latent).all():
        raise ValueError(f"latent of shape {tuple(latent.shape)} is not a finite (C, h, w) tensor")
    return latent


# --- building -------------------------------------------------------------------------------------------


def build_latent_cache(
    dataset: ImageDataset, encode: Encode, *, batch_size: int, progress: bool = True,
    cache_dir: Path | None = None, vae_id: str | None = None,
) -> LatentCache:
    """Encode every record of `dataset` (its centre crop; also mirrored when `dataset.options.flip`).

    Batches hold one bucket each, so `encode` always gets equal-sized images, as CPU float32 tensors
    (moving them to the VAE's device and dtype is the caller's job). Raises `UserError` naming the image
    whose latents are not finite. Does not attach the cache: set `dataset.latent_cache = cache`.

    With `cache_dir`, entries already there are reused and only the missing ones are encoded and written;
    `vae_id` (see `vae_identity`) is then required. An unreadable entry is encoded again and counted in
    one summary line of `cache.warnings`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dataset.options.random_crop:
        raise ValueError("a latent cache holds one centre crop per image; it cannot be used with random_crop")
    if cache_dir is not None and not vae_id:
        raise ValueError("a disk latent cache needs vae_id (see vae_identity): entries are keyed by the VAE")
    variants = (False, True) if dataset.options.flip else (False,)
    cache = LatentCache()
    # todo[index]: the variants of record `index` still to encode; keys[(index, flipped)]: its disk key.
    todo: dict[int, list[bool]] = {i: list(variants) for i in range(len(dataset))}
    keys: dict[tuple[int, bool], str] = {}
    if cache_dir is not None:
        todo, keys = _reuse_entries(dataset, cache, Path(cache_dir), vae_id, variants, progress)

    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index in todo:
        by_bucket[dataset.bucket_of[index]].append(index)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        batches.extend(indices[i:i + batch_size] for i in range(0, len(indices), batch_size))

    # Pillow's warnings about the images' metadata are dropped: the scan, which decoded every one, reported them.
    with image_warnings.collect(), tqdm(total=len(dataset) * len(variants), initial=cache.reused, desc="caching latents",
                                        unit="img", disable=not progress) as bar:
        for batch, pixels in zip(batches, _prefetched_pixels(dataset, batches)):  # pixels: (B, 3, H, W)
            for flipped in variants:
                rows = [j for j, index in enumerate(batch) if flipped in todo[index]]
                if not rows:
                    continue
                subset = pixels if len(rows) == len(batch) else pixels[rows]
                with torch.no_grad():
                    latents = encode(subset.flip(-1) if flipped else subset)  # (B, C, h, w)
                if latents.ndim != 4 or latents.shape[0] != len(rows):
                    raise ValueError(f"encode returned shape {tuple(latents.shape)} for {len(rows)} images; "
                                     "expected (B, C, h, w)")
                finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist()
                for j, latent, ok in zip(rows, latents, finite):
                    index = batch[j]
                    if not ok:
                        raise UserError(
                            f"latents for {dataset.records[index].path} contain NaN/inf; the VAE may "
                            "overflow in fp16. Encode with the VAE in float32 (or an fp16-safe VAE), or "
                            "remove the image."
                        )
                    if cache_dir is None:
                        cache.put(index, flipped, latent)
                    else:
                        path = entry_path(cache_dir, keys[(index, flipped)])
                        write_entry(path, keys[(index, flipped)], latent, dataset.records[index].path)
                        cache.put_file(index, flipped, path)
                    cache.encoded += 1
                bar.update(len(rows))
    return cache


def _reuse_entries(dataset: ImageDataset, cache: LatentCache, cache_dir: Path, vae_id: str,
                   variants: tuple[bool, ...], progress: bool) -> tuple[dict[int, list[bool]], dict]:
    """Point `cache` at every valid entry already in `cache_dir`; returns (todo, keys) for the rest."""
    paths = [r.path for r in dataset.records]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        contents = list(tqdm(pool.map(content_sha256, paths), total=len(paths), desc="hashing images",
                             unit="img", disable=not progress))
    todo: dict[int, list[bool]] = {}
    keys: dict[tuple[int, bool], str] = {}
    corrupt: list[tuple[Path, str]] = []
    for index, content in enumerate(contents):
        for flipped in variants:
            key = keys[(index, flipped)] = entry_key(content, dataset, index, flipped, vae_id)
            path = entry_path(cache_dir, key)
            if path.is_file():
                try:
                    read_entry(path, key)
                except ValueError as e:
                    corrupt.append((path, str(e)))
                else:
                    cache.put_file(index, flipped, path)
                    cache.reused += 1
                    continue
            todo.setdefault(index, []).append(flipped)
    if corrupt:
        shown = "; ".join(f"{path.name} ({problem})" for path, problem in corrupt[:SHOWN_CORRUPT])
        more = f"; and {len(corrupt) - SHOWN_CORRUPT} more" if len(corrupt) > SHOWN_CORRUPT else ""
        cache.warnings.append(f"{len(corrupt)} unreadable latent cache entries in {cache_dir} were encoded again: {shown}{more}")
    return todo, keys


def _prefetched_pixels(
    dataset: ImageDataset, batches: list[list[int]], ahead: int = 2
) -> Iterator[torch.Tensor]:
    """Pixels of each batch in order, loaded in threads up to `ahead` batches early.

    Pillow releases the GIL while decoding and resizing, so loading overlaps with `encode`; the bound keeps
    memory at a few batches however large the dataset.
    """

    def load(batch: list[int]) -> torch.Tensor:
        return torch.stack([dataset.load_pixels(i, dataset.crop_plan(i)) for i in batch])

    with ThreadPoolExecutor(max_workers=min(ahead, os.cpu_count() or 1)) as pool:
        pending: deque[Future] = deque()
        for batch in batches:
            pending.append(pool.submit(load, batch))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
