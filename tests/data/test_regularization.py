"""Regularisation images: balanced against the training images, marked, weighted, batched."""

from pathlib import Path

import torch

from sd_lora.data import DataOptions, ImageDataset, ImageRecord, collate, regularization_records
from sd_lora.diffusion import diffusion_loss, prior_weights


def _records(n: int, repeats: int = 3) -> list[ImageRecord]:
    return [ImageRecord(Path(f"/r/{i}.png"), f"caption {i}", "sidecar", repeats, "3_reg", 64, 64) for i in range(n)]


def test_each_epoch_sees_as_many_prior_samples_as_training_samples():
    out = regularization_records(_records(3), 10)
    assert [r.repeats for r in out] == [4, 3, 3]  # folder repeats (3) are ignored: the balance decides
    assert all(r.prior for r in out) and not any(r.prior for r in _records(3))


def test_more_prior_images_than_samples_leaves_the_last_ones_out():
    out = regularization_records(_records(5), 2)
    assert [(r.path.name, r.repeats) for r in out] == [("0.png", 1), ("1.png", 1)]
    assert regularization_records([], 10) == [] and regularization_records(_records(2), 0) == []


def test_prior_weights_weigh_only_prior_samples():
    w = prior_weights(torch.tensor([True, False, True]), 0.25)
    assert w.tolist() == [0.25, 1.0, 0.25]
    prediction, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    assert diffusion_loss(prediction, target, w).item() == (0.25 + 1 + 0.25) / 3


def test_samples_and_batches_carry_the_prior_flag(tmp_path):
    from PIL import Image

    records = []
    for i, prior in enumerate((False, True)):
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
        records.append(ImageRecord(tmp_path / f"{i}.png", "c", "sidecar", 1, ".", 32, 32, prior=prior))
    dataset = ImageDataset(records, DataOptions(resolution=32, step=8, min_bucket_side=16, max_bucket_side=64, buckets=False))
    batch = collate([dataset[(0, 1)], dataset[(1, 2)]])
    assert batch["prior"].dtype == torch.bool and batch["prior"].tolist() == [False, True]
