"""Encode every training image once, so the VAE is not run (or even kept on the GPU) during training.

The data package knows nothing about the VAE: `build_latent_cache` takes an `encode` callable that maps
pixels (B, 3, H, W) in [-1, 1] to latents (B, C, h, w), scaling factor already applied. A cached image is
always the planned centre crop; with flip augmentation the mirrored crop is encoded as well.

    cache = build_latent_cache(dataset, encode, batch_size=4)
    dataset.latent_cache = cache
"""

from __future__ import annotations

import os
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from sd_lora.data.dataset import ImageDataset
from sd_lora.errors import UserError

Encode = Callable[[torch.Tensor], torch.Tensor]


class LatentCache:
    """Latents on the CPU, keyed by (record_index, flipped)."""

    def __init__(self, latents: dict[tuple[int, bool], torch.Tensor] | None = None):
        self._latents: dict[tuple[int, bool], torch.Tensor] = dict(latents or {})

    def put(self, index: int, flipped: bool, latent: torch.Tensor) -> None:
        """Store a (C, h, w) latent; it is copied to the CPU with its own storage."""
        self._latents[(index, bool(flipped))] = latent.detach().to("cpu", copy=True)

    def get(self, index: int, flipped: bool) -> torch.Tensor:
        try:
            return self._latents[(index, bool(flipped))]
        except KeyError:
            variant = "flipped" if flipped else "unflipped"
            raise KeyError(f"no {variant} latent for record {index}; was the cache built for this dataset "
                           "(with the same flip option)?") from None

    def __contains__(self, key: tuple[int, bool]) -> bool:
        return (key[0], bool(key[1])) in self._latents

    def __len__(self) -> int:
        return len(self._latents)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._latents.values())


def build_latent_cache(
    dataset: ImageDataset, encode: Encode, *, batch_size: int, progress: bool = True
) -> LatentCache:
    """Encode every record of `dataset` (its centre crop; also mirrored when `dataset.options.flip`).

    Batches hold one bucket each, so `encode` always gets equal-sized images, as CPU float32 tensors
    (moving them to the VAE's device and dtype is the caller's job). Raises `UserError` naming the image
    whose latents are not finite. Does not attach the cache: set `dataset.latent_cache = cache`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dataset.options.random_crop:
        raise ValueError("a latent cache holds one centre crop per image; it cannot be used with random_crop")
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, bucket in enumerate(dataset.bucket_of):
        by_bucket[bucket].append(index)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        batches.extend(indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
    variants = (False, True) if dataset.options.flip else (False,)
    cache = LatentCache()

    with tqdm(total=len(dataset) * len(variants), desc="caching latents", unit="img",
              disable=not progress) as bar:
        for batch, pixels in zip(batches, _prefetched_pixels(dataset, batches)):  # pixels: (B, 3, H, W)
            for flipped in variants:
                with torch.no_grad():
                    latents = encode(pixels.flip(-1) if flipped else pixels)  # (B, C, h, w)
                if latents.ndim != 4 or latents.shape[0] != len(batch):
                    raise ValueError(f"encode returned shape {tuple(latents.shape)} for {len(batch)} images; "
                                     "expected (B, C, h, w)")
                finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist()
                for index, latent, ok in zip(batch, latents, finite):
                    if not ok:
                        raise UserError(
                            f"latents for {dataset.records[index].path} contain NaN/inf; the VAE may "
                            "overflow in fp16. Encode with the VAE in float32 (or an fp16-safe VAE), or "
                            "remove the image."
                        )
                    cache.put(index, flipped, latent)
                bar.update(len(batch))
    return cache


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
