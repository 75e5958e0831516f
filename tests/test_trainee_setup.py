"""Making the trainee ready: the batch the memory check tries."""

from __future__ import annotations

import torch

from sd_lora.trainee_setup import largest_bucket_batch


class Items:
    """Five latents in three buckets, keyed as the sampler keys them: (index, sample seed)."""

    bucket_of = [(64, 64), (96, 64), (64, 96), (64, 96), (48, 48)]

    def __getitem__(self, key):
        index, seed = key
        w, h = self.bucket_of[index]
        return {"latents": torch.full((4, h // 8, w // 8), float(index)), "original_size": (h, w), "crop_top_left": (0, 0),
                "target_size": (h, w), "caption": f"seed {seed}", "flipped": False, "index": index}


def test_the_largest_bucket_fills_a_whole_batch():
    bucket, batch = largest_bucket_batch(Items(), batch_size=3, seed=7)
    assert bucket == (96, 64)  # 96x64 and 64x96 have the same area: the tie goes to the larger width, always
    assert batch["latents"].shape == (3, 4, 8, 12) and batch["index"] == [1, 1, 1]  # one image, repeated
    assert batch["captions"] == ["seed 7", "seed 8", "seed 9"]
