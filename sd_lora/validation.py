"""A deterministic validation loss: the same noise and timestep for each held-out image at every evaluation.

With the randomness fixed, changes in this loss come only from the weights, so it can pick the best step.
Each image gets its own noise (seeded by the run seed and the image's position) and a timestep spread
evenly over [0, T) across the set, so the average covers every noise level.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from . import diffusion
from .errors import UserError
from .lora.inject import autocast_casts_lora_inputs


@dataclass
class ValidationItem:
    latents: torch.Tensor  # (C, h, w), CPU
    caption: str
    noise: torch.Tensor  # (C, h, w)
    timestep: int
    sizes: dict  # "original_size", "crop_top_left", "target_size": (2,) long tensors (SDXL size conditioning)


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the images (at least one, never all) is held out."""
    if not fraction:
        return list(records), []
    if len(records) < 2:
        raise UserError(f"--validation-split {fraction:g} holds images out of the training set, which has {len(records)}; "
                        "add images, or pass --validation-data DIR with images of their own")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, math.ceil(fraction * len(records))))
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def build_validation_set(latents: list[torch.Tensor], captions: list[str], sizes: list[dict], *, seed: int,
                         num_train_timesteps: int) -> list[ValidationItem]:
    items = []
    n = len(latents)
    for i, (lat, caption, size) in enumerate(zip(latents, captions, sizes)):
        # modulo 2**64, what manual_seed takes: --seed goes up to 2**63-1 (unchanged for the usual seeds)
        g = torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**64)
        timestep = int((i + 0.5) * num_train_timesteps / n)
        items.append(ValidationItem(lat, caption, torch.randn(lat.shape, generator=g), timestep, size))
    return items


def shard(items: list[ValidationItem], rank: int, world_size: int) -> dict[tuple, list[ValidationItem]]:
    """Process `rank`'s share of `items`, grouped by latent shape (one batch never mixes bucket sizes): every
    `world_size`-th item of the items ordered by shape, so the ranks' item counts differ by at most one and
    each gets about its share of every bucket. Fixed by the items' order, the same on every rank."""
    ordered = [item for group in _by_shape(items).values() for item in group]
    return _by_shape(ordered[rank::world_size])


def _by_shape(items: list[ValidationItem]) -> dict[tuple, list[ValidationItem]]:
    """{latent shape: its items, in order}, the shapes in the order they first occur."""
    groups: dict[tuple, list[ValidationItem]] = {}
    for item in items:
        groups.setdefault(tuple(item.latents.shape), []).append(item)
    return groups


def validation_loss(trainee, objective, items: list[ValidationItem], batch_size: int) -> float:
    """Mean (unweighted) noise-prediction MSE over `items`, in eval mode, with gradients off.

    With several processes each computes its share of the items (`shard`) and the sums are added up across
    them: every process returns the same mean, which differs from one process's only in the order of the
    float sums (each item's noise and timestep are its own, whichever process runs it). Every process must
    call this at the same point, as for any collective."""
    acc = trainee.accelerator
    total, count = loss_sum(trainee, objective, shard(items, acc.process_index, acc.num_processes), batch_size)
    if acc.num_processes > 1:
        sums = acc.reduce(torch.tensor([total, count], dtype=torch.float64, device=acc.device), reduction="sum")
        total, count = sums.tolist()
    return total / count


def loss_sum(trainee, objective, by_shape: dict[tuple, list[ValidationItem]], batch_size: int) -> tuple[float, int]:
    """(sum of the items' losses, number of items), `batch_size` items of one shape at a time.

    The modules run unwrapped (`unwrap_model`): a DDP wrapper's forward may broadcast the module's buffers (the
    first one after a training step; the text encoders have position ids), a collective that a process with
    fewer or no items would not join: the run would hang, or its collectives would pair up wrongly. No
    gradients flow here, so there is nothing for DDP to synchronise."""
    acc = trainee.accelerator
    device = acc.device
    unet = acc.unwrap_model(trainee.unet)
    text_encoders = [acc.unwrap_model(m) for m in trainee.text_encoders]
    conditioner = trainee.conditioner.with_encoders(text_encoders)
    modules = [unet, *text_encoders]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), acc.autocast(), autocast_casts_lora_inputs(modules, device.type):
            for group in by_shape.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start:start + batch_size]
                    latents = torch.stack([c.latents for c in chunk]).to(device, trainee.weight_dtype)
                    noise = torch.stack([c.noise for c in chunk]).to(device, trainee.weight_dtype)
                    timesteps = torch.tensor([c.timestep for c in chunk], device=device)
                    sizes = {k: torch.stack([c.sizes[k] for c in chunk]) for k in chunk[0].sizes}
                    cond = conditioner([c.caption for c in chunk], sizes, device, trainee.weight_dtype)
                    noisy = diffusion.add_noise(latents, noise, timesteps, objective.alphas_cumprod)
                    prediction = unet(noisy, timesteps, **cond).sample
                    target = diffusion.training_target(objective.prediction_type, latents, noise, timesteps, objective.alphas_cumprod)
                    total += diffusion.diffusion_loss(prediction, target).item() * len(chunk)
                    count += len(chunk)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return total, count
