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
from .memory import to_device
from .models.conditioning import Conditioner
from .precision import call_vae


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    nan_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient


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


@dataclass
class StepRecord:
    """One optimizer step's numbers as the host sees them (loss and gradient norm arrive last)."""

    step: int
    epoch: int
    lr: float  # the rate this step used
    seconds: float  # host time since the previous step ended
    loss: float = math.nan  # mean over the step's micro-batches
    grad_norm: float = math.nan  # before clipping
    text_encoder_lr: float | None = None  # the text encoders' rate, when they train (their own optimizer group)
    d_lr: float | None = None  # Prodigy: its learned step size d times lr, the rate it applies (kohya's lr/d*lr)

    def finite(self, check_gradients: bool) -> bool:
        return math.isfinite(self.loss) and (not check_gradients or math.isfinite(self.grad_norm))


class Hooks(Protocol):
    def on_step_end(self, state: TrainState) -> None:
        """The weights now hold step `state.step`'s update: validate, sample, save."""

    def on_step_logged(self, record: StepRecord) -> None:
        """A finite step's numbers reached the host (with `skip_on_device`, one step after `on_step_end`)."""

    def on_skipped_step(self, record: StepRecord, nan_steps: int) -> None:
        """A step's loss or gradient was not finite; its update was skipped. `nan_steps` counts them so far."""

    def should_stop(self) -> bool: ...

    def records_numbers_at(self, step: int) -> bool:
        """Whether `on_step_end` of `step` records the numbers the hooks were handed (a training state holds the
        moving loss average and the skipped-step count): with `skip_on_device` the loop hands `step`'s over first."""


class Readout:
    """Scalars on their way to the host: a step's loss and gradient norm, a stop vote.

    The copy is queued without waiting; `values()` waits for this copy only (a CUDA event), not for the work
    queued after it. Reading step N's values once step N+1 is queued therefore never leaves the GPU idle,
    where `.item()` would drain its queue. On other devices the values are copied at once.
    """

    def __init__(self, *scalars: torch.Tensor):
        packed = torch.stack([s.reshape(()).float() for s in scalars])
        self._event = None
        if packed.is_cuda:
            self._host = packed.to("cpu", non_blocking=True)  # into pinned memory
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed.cpu()

    def values(self) -> tuple[float, ...]:
        if self._event is not None:
            self._event.synchronize()
        return tuple(self._host.tolist())


def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, scaling_factor: float, generator: torch.Generator,
                  *, replicas: int = 1, rank: int = 0) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), sampled from the VAE posterior (the VAE in
    its own dtype, outside autocast: `precision.call_vae`). The posterior's noise is this rank's slice of a
    global-batch draw (`replicas`, `rank`), like the diffusion noise."""
    with torch.no_grad():
        dist = call_vae(vae.encode, pixels).latent_dist
    return diffusion.sample_posterior(dist.mean, dist.std, generator, replicas=replicas, rank=rank) * scaling_factor


def compute_loss(t: Trainee, obj: Objective, batch: dict, state: TrainState) -> torch.Tensor:
    device = t.accelerator.device
    # Every rank draws from the same generator and keeps its own slice (diffusion.py): ranks differ, stay in step.
    shard = {"replicas": t.accelerator.num_processes, "rank": t.accelerator.process_index}
    # 1. Latents of the images: from the cache, or encoded now from fresh pixels.
    if "latents" in batch:
        latents = to_device(batch["latents"], device, t.weight_dtype)
    else:
        pixels = to_device(batch["pixels"], device, t.vae.dtype)
        latents = encode_pixels(t.vae, pixels, obj.vae_scaling_factor, t.generator, **shard).to(t.weight_dtype)
    # 2. Caption conditioning (SDXL: plus size conditioning); gradients reach the text encoders only when
    #    their LoRA trains.
    with torch.set_grad_enabled(t.train_text_encoder):
        cond = t.conditioner(batch["captions"], batch, device, t.weight_dtype)
    # 3. Noise and uniform timesteps, then the forward process x_t = sqrt(a) x_0 + sqrt(1 - a) eps.
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
        prior = diffusion.prior_weights(to_device(batch["prior"], device), obj.prior_loss_weight)
        weights = prior if weights is None else weights * prior
    return diffusion.diffusion_loss(prediction, target, weights)


def forward_backward(t: Trainee, obj: Objective, batch: dict, state: TrainState, divide_by: int = 1, sync: bool = True) -> torch.Tensor:
    """One micro-batch: its loss (returned) and the gradients of loss / `divide_by`, added to the trainable
    parameters' `.grad`. Without `sync`, DDP leaves the gradients unreduced (a group's earlier micro-batches)."""
    acc = t.accelerator
    modules = [t.unet, *t.text_encoders] if t.train_text_encoder else [t.unet]
    with contextlib.ExitStack() as stack:
        if not sync:
            for m in modules:
                stack.enter_context(acc.no_sync(m))
        with acc.autocast(), autocast_casts_lora_inputs(modules, acc.device.type):
            loss = compute_loss(t, obj, batch, state)
        acc.backward(loss / divide_by)
    return loss


class NonFiniteLoss(Exception):
    """A step produced a NaN/inf loss or gradient and no --nan-skip budget is left. The weights hold step
    `weights_step`'s values, which no non-finite step has touched."""

    def __init__(self, step: int, loss: float, grad_norm: float, weights_step: int):
        self.step, self.loss, self.grad_norm, self.weights_step = step, loss, grad_norm, weights_step
        super().__init__(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}")


def gradient_norm(t: Trainee) -> torch.Tensor:
    """Total L2 norm of the trainable gradients, clipped to max_grad_norm when that is > 0."""
    if t.max_grad_norm > 0:
        return t.accelerator.clip_grad_norm_(t.trainable, t.max_grad_norm)
    t.accelerator.unscale_gradients()  # under fp16's loss scaler: the real gradients' norm (otherwise a no-op)
    grads = [p.grad for p in t.trainable if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def supports_skip_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` can skip an update on a flag that stays on the device: torch's fused
    Adam/AdamW/SGD read `found_inf` (the attribute GradScaler sets) and then leave weights, moments and step
    counts untouched. Under fp16's loss scaler the scaler sets that flag itself (`step_unless`)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return bool(getattr(inner, "_step_supports_amp_scaling", False))


def skip_step(optimizer) -> None:
    """Leave out a step the host found non-finite. Under fp16's loss scaler (accelerate's optimizer wrapper holds
    it) `gradient_norm` has unscaled the gradients, and the scaler refuses to unscale again before its update():
    the skipped step ends the scaler's iteration as a step it skipped itself would (an overflow lowers the scale)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None:
        scaler.update()


def step_unless(optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), skipped on the device where `skip` (a float32 scalar tensor, 0 or 1) is 1. Under fp16's
    loss scaler (accelerate's optimizer wrapper holds it) the scaler hands the optimizer its own flag, set where the
    unscaled gradients are not finite, and lowers the scale: `skip` adds nothing, as a non-finite loss has
    non-finite gradients."""
    if getattr(optimizer, "scaler", None) is not None:
        optimizer.step()
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = skip
    try:
        optimizer.step()
    finally:
        del inner.found_inf


def train(t: Trainee, obj: Objective, state: TrainState, *, max_steps: int, hooks: Hooks,
          gradient_accumulation_steps: int = 1, nan_skip: int = 0, check_gradients: bool = True,
          skip_on_device: bool = False) -> TrainState:
    """Run optimizer steps until `state.step == max_steps` or `hooks.should_stop()`; returns the state.

    Resumable: starts at `state.epoch`, skipping the `state.batch_in_epoch` batches already consumed.
    A step whose loss or gradient is not finite is skipped (weights untouched) while `nan_skip` allows,
    otherwise NonFiniteLoss is raised with the weights still at their last good values.

    By default the host reads each step's loss and gradient norm before it steps: a wait for the device.
    With `skip_on_device` (for optimizers where `supports_skip_on_device` holds) nothing in a step waits:
    the optimizer skips a non-finite update on the device, the skipped step keeps its place in the step
    count and the schedule, and the host reads the numbers one step later, when that costs the device nothing.
    """
    acc = t.accelerator
    pending: tuple[StepRecord, Readout] | None = None  # skip_on_device: the step whose numbers are on their way

    def report(record: StepRecord) -> None:
        """Hand a step's numbers to the hooks; a non-finite step counts against --nan-skip."""
        if record.finite(check_gradients):
            hooks.on_step_logged(record)
            return
        state.nan_steps += 1
        if state.nan_steps > nan_skip:
            raise NonFiniteLoss(record.step, record.loss, record.grad_norm, weights_step=state.step)
        hooks.on_skipped_step(record, state.nan_steps)

    def settle(record: StepRecord, readout: Readout) -> None:
        record.loss, record.grad_norm = readout.values()
        report(record)

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
            loss = forward_backward(t, obj, batch, state, group_size, sync=last)  # DDP: all-reduce once per group
            accumulated = accumulated + loss.detach() / group_size  # stays on the device: no sync per micro-batch
            if not last:
                continue
            # One optimizer step: check, clip, step, schedule.
            if acc.num_processes > 1:  # every rank must take the same skip/stop decision: use the global mean
                accumulated = acc.reduce(accumulated, reduction="mean")
            norm = gradient_norm(t)
            readout = Readout(accumulated, norm)
            lrs = t.lr_scheduler.get_last_lr()  # per optimizer group: the U-Net's, then the text encoders'
            d = t.optimizer.param_groups[0].get("d")  # Prodigy's, as this step will use it (a float it keeps on the host)
            record = StepRecord(state.step + 1, state.epoch, lrs[0], time.perf_counter() - started,
                                text_encoder_lr=lrs[1] if len(lrs) > 1 else None, d_lr=None if d is None else float(d) * lrs[0])
            if skip_on_device:
                step_unless(t.optimizer, non_finite(accumulated, norm if check_gradients else None))
                t.lr_scheduler.step()
                state.step += 1
                if pending is not None:  # the previous step's numbers: the device has long computed them
                    settle(*pending)
                pending = (record, readout)
            else:
                record.loss, record.grad_norm = readout.values()
                if record.finite(check_gradients):
                    t.optimizer.step()
                    t.lr_scheduler.step()
                    state.step += 1
                else:
                    skip_step(t.optimizer)
                report(record)
            t.optimizer.zero_grad(set_to_none=True)
            accumulated, started = 0.0, time.perf_counter()
            if state.batch_in_epoch == per_epoch:  # the epoch is complete: the position moves to the next one
                state.epoch += 1
                state.batch_in_epoch = 0
            if state.step == record.step:  # taken, not skipped before stepping
                if pending is not None and hooks.records_numbers_at(state.step):  # a wait, only where a state is saved
                    settle(*pending)
                    pending = None
                hooks.on_step_end(state)
            if state.step >= max_steps or hooks.should_stop():
                if pending is not None:
                    settle(*pending)
                return state
        if not consumed:
            raise RuntimeError(f"the data loader yielded no batch for epoch {state.epoch} from batch {state.batch_in_epoch}")
    return state


def non_finite(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """1.0 where the loss (or, when given, the gradient norm) is NaN/inf, else 0.0: a float32 scalar on the
    device, computed without reading anything back."""
    bad = ~torch.isfinite(loss.float())
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm.float())
    return bad.float().reshape(())


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one pass over the data (a trailing partial accumulation still steps)."""
    return max(1, math.ceil(num_batches / gradient_accumulation_steps))

