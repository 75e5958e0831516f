"""The training loop: the noise-prediction objective, step by step.

Everything is built before we get here (`train.py`); this module only runs the algorithm and calls
`Hooks` for the side effects (progress, metrics, samples, saves) at the end of each optimizer step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import diffusion
from .models.text import encode_tokens, tokenize


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs started
    truncated_captions: int = 0


@dataclass
class Objective:
    """Fixed facts of the denoising objective for this model and run."""

    alphas_cumprod: torch.Tensor  # (T,)
    num_train_timesteps: int
    prediction_type: str  # "epsilon" | "v_prediction"
    vae_scaling_factor: float
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    clip_skip: int = 1


@dataclass
class Trainee:
    """The modules, data and optimisation objects of one run (already placed and prepared)."""

    accelerator: object
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module | None  # None when every latent is cached
    tokenizer: object
    dataloader: object
    batch_sampler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    trainable: list[torch.nn.Parameter]
    train_text_encoder: bool
    weight_dtype: torch.dtype
    max_grad_norm: float
    generator: torch.Generator = field(repr=False, default=None)


class Hooks(Protocol):
    def on_step_end(self, state: TrainState, loss: float, lr: float, seconds: float) -> None: ...


def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, scaling_factor: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), sampled from the VAE posterior."""
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        return dist.sample(generator=generator) * scaling_factor


def compute_loss(t: Trainee, obj: Objective, batch: dict, state: TrainState) -> torch.Tensor:
    device = t.accelerator.device
    # 1. Latents of the images: from the cache, or encoded now from fresh pixels.
    if "latents" in batch:
        latents = batch["latents"].to(device, dtype=t.weight_dtype)
    else:
        pixels = batch["pixels"].to(device, dtype=t.weight_dtype)
        latents = encode_pixels(t.vae, pixels, obj.vae_scaling_factor, t.generator)
    # 2. Caption conditioning; gradients flow into the text encoder only when its LoRA trains.
    input_ids, truncated = tokenize(t.tokenizer, batch["captions"])
    state.truncated_captions += truncated
    with torch.set_grad_enabled(t.train_text_encoder):
        cond = encode_tokens(t.text_encoder, input_ids.to(device), obj.clip_skip)  # (B, 77, D)
    # 3. Noise and uniform timesteps, then the forward process x_t = sqrt(a) x_0 + sqrt(1 - a) eps.
    noise = diffusion.sample_noise(latents, t.generator, obj.noise_offset)
    timesteps = diffusion.sample_timesteps(latents.shape[0], obj.num_train_timesteps, t.generator, device)
    noisy = diffusion.add_noise(latents, noise, timesteps, obj.alphas_cumprod)
    # 4. Predict eps (or v) and regress onto the true target; Min-SNR re-weights per timestep.
    prediction = t.unet(noisy, timesteps, cond).sample
    target = diffusion.training_target(obj.prediction_type, latents, noise, timesteps, obj.alphas_cumprod)
    weights = None
    if obj.min_snr_gamma:
        weights = diffusion.min_snr_weights(timesteps, obj.alphas_cumprod, obj.min_snr_gamma, obj.prediction_type)
    return diffusion.diffusion_loss(prediction, target, weights)


def train(t: Trainee, obj: Objective, state: TrainState, *, max_steps: int, hooks: Hooks) -> TrainState:
    """Run optimizer steps until `state.step == max_steps`; returns the final state."""
    acc = t.accelerator
    accumulated, micro_steps, started = 0.0, 0, time.perf_counter()
    while state.step < max_steps:
        t.batch_sampler.set_epoch(state.epoch)
        for batch in t.dataloader:
            with acc.accumulate(t.unet, t.text_encoder) if t.train_text_encoder else acc.accumulate(t.unet):
                with acc.autocast():
                    loss = compute_loss(t, obj, batch, state)
                acc.backward(loss)
                if acc.sync_gradients and t.max_grad_norm > 0:
                    acc.clip_grad_norm_(t.trainable, t.max_grad_norm)
                t.optimizer.step()  # a no-op on accumulation micro-steps (accelerate holds it back)
                t.optimizer.zero_grad(set_to_none=True)
            accumulated += loss.detach().item()
            micro_steps += 1
            if not acc.sync_gradients:
                continue
            # One optimizer step is complete.
            lr = t.lr_scheduler.get_last_lr()[0]
            t.lr_scheduler.step()
            state.step += 1
            hooks.on_step_end(state, accumulated / micro_steps, lr, time.perf_counter() - started)
            accumulated, micro_steps, started = 0.0, 0, time.perf_counter()
            if state.step >= max_steps:
                break
        state.epoch += 1
    return state


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one pass over the data (a trailing partial accumulation still steps)."""
    return max(1, math.ceil(num_batches / gradient_accumulation_steps))

