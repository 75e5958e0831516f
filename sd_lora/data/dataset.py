"""The torch side of the data: a Dataset of bucketed samples, a batch sampler keeping buckets apart, collate.

A sample is addressed by `(record_index, sample_seed)`: the sampler picks both, the dataset turns them into
the same tensors every time (crop, flip and caption all come from `random.Random(sample_seed)`), so a run
is reproducible whatever the number of DataLoader workers.

    dataset = ImageDataset(scan.records, options)
    sampler = BucketBatchSampler(dataset.bucket_of, [r.repeats for r in scan.records], batch_size, seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    for epoch in ...: sampler.set_epoch(epoch); for batch in loader: ...
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from PIL import Image

from sd_lora.data.buckets import CropPlan, Size, choose_bucket, make_buckets, plan_crop, square_bucket
from sd_lora.data.captions import process_caption
from sd_lora.data.images import ImageProblem, open_image_resized
from sd_lora.data.scan import ImageRecord
from sd_lora.errors import UserError

if TYPE_CHECKING:
    from sd_lora.data.latent_cache import LatentCache

Key = tuple[int, int]  # (record_index, sample_seed)


@dataclass(frozen=True)
class DataOptions:
    resolution: int
    """Side of the square whose area every bucket matches, in pixels."""
    step: int
    """Bucket sides are multiples of this (64 is safe for SD UNets)."""
    min_bucket_side: int
    max_bucket_side: int
    buckets: bool = True
    """False: every image is centre-cropped to a resolution x resolution square."""
    no_upscale: bool = False
    """Images smaller than the target area keep their size (rounded down to `step`), never enlarged."""
    random_crop: bool = False
    """Crop at a random offset instead of the centre (not possible with a latent cache)."""
    flip: bool = False
    """Mirror each sample horizontally with probability 0.5."""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    """With `shuffle_tags`: how many leading tags stay in place."""
    caption_dropout: float = 0.0
    """Probability that a sample trains with an empty caption."""
    tag_dropout: float = 0.0
    """Probability that each tag after the first `keep_tokens` is left out of a sample's caption."""
    seed: int = 0

    def __post_init__(self):
        if self.resolution <= 0 or self.step <= 0:
            raise ValueError(f"resolution and step must be positive, got {self.resolution}, {self.step}")
        if self.no_upscale and not self.buckets:
            raise ValueError("no_upscale needs buckets (without buckets every image is a resolution square)")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")


class ImageDataset(torch.utils.data.Dataset):
    """Samples of `records`, each resized and cropped to its bucket.

    `__getitem__((index, sample_seed))` draws from `random.Random(sample_seed)` in this fixed order, each
    draw made whether or not its option is on (so turning one option on does not change the others):
      1. one `random()` for the flip (flipped when < 0.5 and `options.flip`);
      2. 64 bits seeding the crop rng (two `random()`s when `options.random_crop`);
      3. 64 bits seeding the caption rng (see `process_caption`).
    With a latent cache attached (`dataset.latent_cache = cache`) a sample holds "latents" instead of
    "pixels" and no image file is opened.
    """

    def __init__(self, records: list[ImageRecord], options: DataOptions):
        self.records = list(records)
        self.options = options
        self._latent_cache: LatentCache | None = None
        if options.buckets:
            buckets = make_buckets(options.resolution, options.step, options.min_bucket_side,
                                   options.max_bucket_side)
            self.bucket_of: list[Size] = [
                choose_bucket(r.width, r.height, buckets, step=options.step, resolution=options.resolution,
                              no_upscale=options.no_upscale)
                for r in self.records
            ]
        else:
            self.bucket_of = [square_bucket(options.resolution)] * len(self.records)

    @property
    def latent_cache(self) -> LatentCache | None:
        return self._latent_cache

    @latent_cache.setter
    def latent_cache(self, cache: LatentCache | None) -> None:
        if cache is not None and self.options.random_crop:
            raise ValueError(
                "a latent cache holds one centre crop per image; it cannot be used with random_crop"
            )
        self._latent_cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def bucket_counts(self) -> dict[Size, int]:
        """Samples per bucket per epoch (repeats counted), sorted by bucket."""
        counts: dict[Size, int] = defaultdict(int)
        for record, bucket in zip(self.records, self.bucket_of):
            counts[bucket] += record.repeats
        return dict(sorted(counts.items()))

    def bucket_info(self) -> dict:
        """kohya's `ss_bucket_info`: {"buckets": {"0": {"resolution": [w, h], "count": samples per epoch}, ...},
        "mean_img_ar_error": the mean |bucket aspect - image aspect| (width / height)}. A1111's LoRA metadata view
        lists the file's resolutions from it."""
        buckets = {str(i): {"resolution": list(size), "count": n} for i, (size, n) in enumerate(self.bucket_counts().items())}
        errors = [abs(w / h - r.width / r.height) for r, (w, h) in zip(self.records, self.bucket_of)]
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}

    def crop_plan(self, index: int, rng: random.Random | None = None) -> CropPlan:
        """How record `index` is resized and cropped into its bucket; random only with options.random_crop."""
        record = self.records[index]
        return plan_crop(record.width, record.height, self.bucket_of[index],
                         random_crop=self.options.random_crop, rng=rng)

    def load_pixels(self, index: int, plan: CropPlan, *, flip: bool = False) -> torch.Tensor:
        """Record `index` resized and cropped per `plan`, as float32 (3, H, W) in [-1, 1]."""
        record = self.records[index]
        try:
            image, size = open_image_resized(record.path, (plan.resize_width, plan.resize_height))
        except ImageProblem as e:
            # Re-raised as a plain UserError: DataLoader workers rebuild exceptions from one message
            # argument, and would turn an ImageProblem(path, problem) into a RuntimeError.
            raise UserError(str(e)) from e
        if size != (record.width, record.height):
            raise UserError(
                f"{record.path}: image changed since the data folder was scanned (was {record.width}x"
                f"{record.height}, now {size[0]}x{size[1]}); restart training to rescan it"
            )
        bucket_width, bucket_height = self.bucket_of[index]
        image = image.crop((plan.left, plan.top, plan.left + bucket_width, plan.top + bucket_height))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
        return pixels.float().div_(127.5).sub_(1.0)

    def __getitem__(self, key: Key) -> dict:
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(f"ImageDataset keys are (record_index, sample_seed) tuples (from "
                            f"BucketBatchSampler), got {key!r}")
        index, sample_seed = key
        options = self.options
        rng = random.Random(sample_seed)
        flipped = rng.random() < 0.5 and options.flip
        crop_rng = random.Random(rng.getrandbits(64))
        caption_rng = random.Random(rng.getrandbits(64))

        record = self.records[index]
        plan = self.crop_plan(index, crop_rng)
        bucket_width, bucket_height = self.bucket_of[index]
        sample = {}
        if self._latent_cache is not None:
            sample["latents"] = self._latent_cache.get(index, flipped)
        else:
            sample["pixels"] = self.load_pixels(index, plan, flip=flipped)
        sample["caption"] = process_caption(
            record.caption, caption_rng, shuffle_tags=options.shuffle_tags, keep_tokens=options.keep_tokens,
            dropout=options.caption_dropout, tag_dropout=options.tag_dropout,
        )
        sample["original_size"] = (record.height, record.width)
        # SDXL's crop condition: pixels cut from the top and left of the resized image, as the model sees it,
        # so a mirrored sample's left edge is the right-hand margin of the unflipped crop.
        left = plan.resize_width - plan.left - bucket_width if flipped else plan.left
        sample["crop_top_left"] = (plan.top, left)
        sample["target_size"] = (bucket_height, bucket_width)
        sample["flipped"] = flipped
        sample["index"] = index
        sample["prior"] = record.prior
        return sample


class BucketBatchSampler(torch.utils.data.Sampler[list[Key]]):
    """Batches of (record_index, sample_seed) keys; all keys in a batch share one bucket.

    Per epoch every record appears `repeats[i]` times. Occurrences are grouped by bucket, shuffled within
    the bucket, cut into *global* batches of `batch_size * num_replicas` (each bucket's last batch may be
    short), and the batch order is shuffled. Everything, the sample seeds included, follows from
    (seed, epoch): call `set_epoch` before each epoch.

    With several processes (`num_replicas > 1`) every rank iterates the same global batches and takes its
    own slice, so all ranks train on one bucket at a time and the global batch equals what one process
    with `batch_size * num_replicas` would see. A short global batch is padded (cycling its own keys) to a
    multiple of `num_replicas` so every rank gets the same number of samples.
    """

    def __init__(self, bucket_of: list[Size], repeats: list[int], batch_size: int, seed: int,
                 shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        if len(bucket_of) != len(repeats):
            raise ValueError(f"bucket_of has {len(bucket_of)} entries but repeats has {len(repeats)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if any(r < 1 for r in repeats):
            raise ValueError("every repeat count must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.bucket_of = list(bucket_of)
        self.repeats = list(repeats)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; `start_batch` skips that many batches (to resume in the middle of an epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _bucket_sizes(self) -> dict[Size, int]:
        sizes: dict[Size, int] = defaultdict(int)
        for bucket, repeats in zip(self.bucket_of, self.repeats):
            sizes[bucket] += repeats
        return sizes

    def __len__(self) -> int:
        """Batches in a whole epoch (`start_batch` does not change it)."""
        global_size = self.batch_size * self.num_replicas
        return sum(math.ceil(n / global_size) for n in self._bucket_sizes().values())

    def __iter__(self) -> Iterator[list[Key]]:
        # SeedSequence mixes (seed, epoch) without the collisions of seed * K + epoch.
        state = np.random.SeedSequence([self.seed % 2**64, self.epoch % 2**64]).generate_state(2, np.uint64)
        rng = random.Random(int(state[0]) << 64 | int(state[1]))
        by_bucket: dict[Size, list[int]] = defaultdict(list)
        for index, (bucket, repeats) in enumerate(zip(self.bucket_of, self.repeats)):
            by_bucket[bucket].extend([index] * repeats)
        global_size = self.batch_size * self.num_replicas
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            batches.extend(indices[i:i + global_size] for i in range(0, len(indices), global_size))
        if self.shuffle:
            rng.shuffle(batches)
        # Seeds are drawn after the order is fixed: one 63-bit seed per position in the epoch, for every
        # batch (skipped ones too), so a resumed epoch continues with exactly the same seeds.
        for position, batch in enumerate(batches):
            keys = [(index, rng.getrandbits(63)) for index in batch]
            if position < self.start_batch:
                continue
            if self.num_replicas > 1:
                per_rank = math.ceil(len(keys) / self.num_replicas)
                keys = [keys[i % len(keys)] for i in range(per_rank * self.num_replicas)]  # pad by cycling
                keys = keys[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield keys


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch. Keys as in a sample, except "caption" becomes "captions".

    "pixels" (B, 3, H, W) or "latents" (B, C, h, w); "original_size", "crop_top_left", "target_size" as
    (B, 2) int64 tensors of (height, width) / (top, left); "prior" (B,) bool (regularisation images);
    "captions", "flipped", "index" as lists.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    tensor_key = "latents" if "latents" in samples[0] else "pixels"
    if any(tensor_key not in s for s in samples):
        raise ValueError("a batch mixes pixel and latent samples")
    batch = {tensor_key: torch.stack([s[tensor_key] for s in samples])}
    for key in ("original_size", "crop_top_left", "target_size"):
        batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
    batch["captions"] = [s["caption"] for s in samples]
    batch["prior"] = torch.tensor([s.get("prior", False) for s in samples], dtype=torch.bool)
    for key in ("flipped", "index"):
        batch[key] = [s[key] for s in samples]
    return batch
