"""The training loop: the noise-prediction objective, step by step.

Everything is built before we get here (`train.py`); this module only runs the algorithm and calls
`Hooks` for the side effects (progress, metrics, samples, saves) at the end of each optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import diffusion
from .lora.inject import autocast_casts_lora_inputs
from .models.conditioning import Conditioner


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    nan_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
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
    prior_loss_weight: float = 1.0  # of regularisation images (batch["prior"])


@dataclass
class Trainee:
    """The modules, data and optimisation objects of one run (already placed and prepared)."""

    accelerator: object
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]  # one (SD1/SD2) or two (SDXL)
    conditioner: Conditioner  # captions (+ sizes) -> U-Net keyword arguments, through `text_encoders`
    vae: torch.nn.Module | None  # None when every latent is cached
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
    def on_step_end(self, state: TrainState, loss: float, lr: float, seconds: float, grad_norm: float) -> None: ...

    def on_skipped_step(self, state: TrainState, loss: float, grad_norm: float) -> None: ...

    def should_stop(self) -> bool: ...


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
        pixels = batch["pixels"].to(device, dtype=t.vae.dtype)
        latents = encode_pixels(t.vae, pixels, obj.vae_scaling_factor, t.generator).to(t.weight_dtype)
    # 2. Caption conditioning (SDXL: plus size conditioning); gradients reach the text encoders only when
    #    their LoRA trains.
    with torch.set_grad_enabled(t.train_text_encoder):
        cond, truncated = t.conditioner(batch["captions"], batch, device, t.weight_dtype)
    state.truncated_captions += truncated
    # 3. Noise and uniform timesteps, then the forward process x_t = sqrt(a) x_0 + sqrt(1 - a) eps.
    shard = {"replicas": t.accelerator.num_processes, "rank": t.accelerator.process_index}
    noise = diffusion.sample_noise(latents, t.generator, obj.noise_offset, **shard)
    timesteps = diffusion.sample_timesteps(latents.shape[0], obj.num_train_timesteps, t.generator, device, **shard)
    noisy = diffusion.add_noise(latents, noise, timesteps, obj.alphas_cumprod)
    # 4. Predict eps (or v) and regress onto the true target; Min-SNR re-weights per timestep.
    prediction = t.unet(noisy, timesteps, **cond).sample
    target = diffusion.training_target(obj.prediction_type, latents, noise, timesteps, obj.alphas_cumprod)
    weights = None
    if obj.min_snr_gamma:
        weights = diffusion.min_snr_weights(timesteps, obj.alphas_cumprod, obj.min_snr_gamma, obj.prediction_type)
    if "prior" in batch and obj.prior_loss_weight != 1.0:  # regularisation images weigh prior_loss_weight
        prior = diffusion.prior_weights(batch["prior"].to(device), obj.prior_loss_weight)
        weights = prior if weights is None else weights * prior
    return diffusion.diffusion_loss(prediction, target, weights)


class NonFiniteLoss(Exception):
    """A step produced a NaN/inf loss or gradient and no --nan-skip budget is left."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}")


def gradient_norm(t: Trainee) -> torch.Tensor:
    """Total L2 norm of the trainable gradients, clipped to max_grad_norm when that is > 0."""
    if t.max_grad_norm > 0:
        return t.accelerator.clip_grad_norm_(t.trainable, t.max_grad_norm)
    grads = [p.grad for p in t.trainable if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def train(t: Trainee, obj: Objective, state: TrainState, *, max_steps: int, hooks: Hooks,
          gradient_accumulation_steps: int = 1, nan_skip: int = 0, check_gradients: bool = True) -> TrainState:
    """Run optimizer steps until `state.step == max_steps` or `hooks.should_stop()`; returns the state.

    Resumable: starts at `state.epoch`, skipping the `state.batch_in_epoch` batches already consumed.
    A step whose loss or gradient is not finite is skipped (weights untouched) while `nan_skip` allows,
    otherwise NonFiniteLoss is raised with the weights still at their last good values.
    """
    acc = t.accelerator
    modules = [t.unet, *t.text_encoders] if t.train_text_encoder else [t.unet]
    while state.step < max_steps:
        t.batch_sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        per_epoch = len(t.batch_sampler)
        accumulated, started, consumed = 0.0, time.perf_counter(), 0
        for batch in t.dataloader:
            consumed += 1
            # Micro-batches accumulate into groups of `gradient_accumulation_steps`; an epoch's last group
            # may be shorter. Each loss is divided by its group's size so the step sees the group mean.
            i = state.batch_in_epoch
            state.batch_in_epoch += 1
            group_start = i - i % gradient_accumulation_steps
            group_size = min(gradient_accumulation_steps, per_epoch - group_start)
            last = i - group_start + 1 == group_size
            with contextlib.ExitStack() as stack:
                if not last:  # DDP: all-reduce gradients only once per group
                    for m in modules:
                        stack.enter_context(acc.no_sync(m))
                with acc.autocast(), autocast_casts_lora_inputs(modules, acc.device.type):
                    loss = compute_loss(t, obj, batch, state)
                acc.backward(loss / group_size)
            accumulated = accumulated + loss.detach() / group_size  # stays on the device: no sync per micro-batch
            if not last:
                continue
            # One optimizer step: check, clip, step, schedule.
            if acc.num_processes > 1:  # every rank must take the same skip/stop decision: use the global mean
                accumulated = acc.reduce(accumulated, reduction="mean")
            norm = gradient_norm(t)
            # The one host sync per step: logging and the NaN check need the loss and the gradient norm.
            accumulated, grad_norm = torch.stack([torch.as_tensor(accumulated, dtype=torch.float32, device=norm.device),
                                                  norm.float()]).tolist()
            finite = math.isfinite(accumulated) and (not check_gradients or math.isfinite(grad_norm))
            lr = t.lr_scheduler.get_last_lr()[0]  # the rate this step uses
            if finite:
                t.optimizer.step()
                t.lr_scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
            if not finite:
                state.nan_steps += 1
                if state.nan_steps > nan_skip:
                    raise NonFiniteLoss(state.step + 1, accumulated, grad_norm)
                hooks.on_skipped_step(state, accumulated, grad_norm)
            else:
                state.step += 1
                hooks.on_step_end(state, accumulated, lr, time.perf_counter() - started, grad_norm)
            accumulated, started = 0.0, time.perf_counter()
            if state.batch_in_epoch == per_epoch:  # the epoch is complete: the position moves to the next one
                state.epoch += 1
                state.batch_in_epoch = 0
            if state.step >= max_steps or hooks.should_stop():
                return state
        if not consumed:
            raise RuntimeError(f"the data loader yielded no batch for epoch {state.epoch} from batch {state.batch_in_epoch}")
    return state


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one pass over the data (a trailing partial accumulation still steps)."""
    return max(1, math.ceil(num_batches / gradient_accumulation_steps))

