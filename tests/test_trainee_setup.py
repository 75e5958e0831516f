"""Making the trainee ready: the batch the memory check tries."""

from __future__ import annotations

import torch

from sd_lora.trainee_setup import largest_bucket_batch


class Items:
    """Five latents in three buckets, keyed as the sampler keys them: (index, sample seed); each record
    `repeats` times per epoch (kohya N_name folders)."""

    bucket_of = [(64, 64), (96, 64), (64, 96), (64, 96), (48, 48)]

    def __init__(self, repeats: int = 1):
        self.repeats = repeats

    def bucket_counts(self):
        counts = {}
        for bucket in self.bucket_of:
            counts[bucket] = counts.get(bucket, 0) + self.repeats
        return counts

    def __getitem__(self, key):
        index, seed = key
        w, h = self.bucket_of[index]
        return {"latents": torch.full((4, h // 8, w // 8), float(index)), "original_size": (h, w), "crop_top_left": (0, 0),
                "target_size": (h, w), "caption": f"seed {seed}", "flipped": False, "index": index}


def test_the_largest_batch_the_loader_can_build():
    bucket, batch = largest_bucket_batch(Items(), batch_size=1, seed=7)
    assert bucket == (96, 64)  # 96x64 and 64x96 have the same area: the tie goes to the larger width, always
    assert batch["latents"].shape == (1, 4, 8, 12) and batch["captions"] == ["seed 7"]
    # Two 64x96 images make a batch of two; one 96x64 image never fills more than one place.
    bucket, batch = largest_bucket_batch(Items(), batch_size=3, seed=7)
    assert bucket == (64, 96) and batch["latents"].shape == (2, 4, 12, 8) and sorted(batch["index"]) == [2, 3]


def test_repeats_fill_a_batch_and_a_batch_size_beyond_every_bucket_is_capped():
    bucket, batch = largest_bucket_batch(Items(repeats=3), batch_size=3, seed=7)
    assert bucket == (96, 64) and batch["index"] == [1, 1, 1]  # one image, three repeats per epoch
    assert batch["captions"] == ["seed 7", "seed 8", "seed 9"]
    bucket, batch = largest_bucket_batch(Items(repeats=3), batch_size=4096, seed=7)
    assert bucket == (64, 96) and batch["latents"].shape[0] == 6  # not 4096 copies (the audit's --batch-size 4096)
