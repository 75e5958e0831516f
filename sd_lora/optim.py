"""Optimizer and learning-rate schedule for the LoRA parameters.

| name        | what                                              | needs                               |
|-------------|---------------------------------------------------|-------------------------------------|
| `adamw`     | torch AdamW, fused on CUDA, foreach elsewhere     | -                                   |
| `adamw8bit` | bitsandbytes' 8-bit AdamW (optimizer state in int8)| `sd_lora[bitsandbytes]`, a CUDA GPU |
| `adafactor` | transformers' Adafactor with a fixed, scheduled lr | - (transformers is a dependency)    |
| `prodigy`   | Prodigy (Mishchenko & Defazio 2023): learns the step size; lr is a multiplier, ~1.0 | `sd_lora[prodigy]` |
"""

from __future__ import annotations

import contextlib
import io

import torch

from .errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
# Prodigy estimates the step size d itself and multiplies it by lr, so lr is a dimensionless factor:
# 1.0 is the recommended value, and a typical AdamW rate (1e-4) would make training ~10^4 times slower.
PRODIGY_MIN_LR = 0.1
# Each optimizer's class as kohya's ss_optimizer names it (module.Class), and the arguments it is built with here
# beyond the learning rates and the weight decay (kohya writes those a user gives it as "(k=v,...)").
KOHYA_CLASSES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                 "adafactor": "transformers.optimization.Adafactor", "prodigy": "prodigyopt.prodigy.Prodigy"}
# Fixed-step Adafactor (kohya's recommended LoRA setting): relative_step and scale_parameter off, so the step is
# each group's lr times the RMS-clipped update, and the lr schedule applies as with AdamW. Prodigy: the prodigyopt
# README's settings for diffusion models, bias correction on, and safeguard_warmup so that an lr warm-up does not
# inflate the step-size estimate.
FIXED_ARGS = {"adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False},
              "prodigy": {"use_bias_correction": True, "safeguard_warmup": True}}
# Where diffusers' polynomial schedule ends (its lr_end default, which kohya and the diffusers examples keep).
POLYNOMIAL_LR_END = 1e-7


def build_optimizer(name: str, param_groups: list[dict], *, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `param_groups`.

    `param_groups` are torch-style dicts with "params" and "lr"; empty groups are dropped. Every optimizer
    honours each group's lr and is stepped by the schedules of `build_lr_scheduler` (Prodigy: the schedule
    scales its learned step size). A missing optional package or an unsupported device is a UserError
    that names the install command or the alternative (`check_available`).
    """
    check_available(name, device)
    groups = [g for g in param_groups if g["params"]]
    # The first group's rate is also the optimizer's default lr, which diffusers' polynomial schedule reads as the
    # rate it decays from to POLYNOMIAL_LR_END (torch's own default, 1e-3, would move that end point).
    lr = {"lr": groups[0]["lr"]} if groups else {}
    if name == "adamw":
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, weight_decay=weight_decay, **lr, **fast)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay, **lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=groups[0]["lr"] if groups else None, weight_decay=weight_decay, **FIXED_ARGS[name])
    if name == "prodigy":
        return _prodigy(groups, weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def kohya_description(name: str, weight_decay: float) -> str:
    """`ss_optimizer` as kohya writes it, "module.Class(k=v,...)": the class path, then the arguments given beyond
    the learning rate ("torch.optim.adamw.AdamW(weight_decay=0.01)"). Pure."""
    args = {"weight_decay": weight_decay, **FIXED_ARGS.get(name, {})}
    return KOHYA_CLASSES[name] + "(" + ",".join(f"{key}={value}" for key, value in args.items()) + ")"


def check_available(name: str, device: torch.device) -> None:
    """Whether optimizer `name` can run here: a UserError naming the install command or the alternative when its
    optional package is missing or (adamw8bit) `device` is not a CUDA GPU. It needs no model, so a run checks it
    before the model loads (a Hub download, minutes of latent caching), not when the optimizer is built."""
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes: pip install 'sd_lora[bitsandbytes]' (CUDA GPUs only), or use --optimizer adamw") from None
        if device.type != "cuda":
            raise UserError("--optimizer adamw8bit runs on CUDA GPUs only; on this device use --optimizer adamw")
    if name == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise UserError("--optimizer prodigy needs the prodigyopt package: pip install 'sd_lora[prodigy]' "
                            "(and train with --learning-rate 1.0), or use --optimizer adamw") from None


def _prodigy(groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    rates = sorted({float(g["lr"]) for g in groups})
    if len(rates) > 1:  # first: a low rate of the two is --text-encoder-lr's, not --learning-rate's
        # Prodigy shares one learned step size across groups and refuses groups with different lr values.
        raise UserError(f"--optimizer prodigy uses one learning rate for the U-Net and the text encoder, got "
                        f"{', '.join(f'{r:g}' for r in rates)}; drop --text-encoder-lr")
    if rates and rates[0] < PRODIGY_MIN_LR:
        raise UserError(f"--optimizer prodigy learns its own step size and expects --learning-rate of about 1.0 "
                        f"(a multiplier on that step), got {rates[0]:g}; pass --learning-rate 1.0")
    with contextlib.redirect_stdout(io.StringIO()):  # hack: its constructor prints "Using decoupled weight decay"
        return Prodigy(groups, lr=rates[0] if rates else 1.0, weight_decay=weight_decay, **FIXED_ARGS["prodigy"])


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0):
    """diffusers' schedules (the same ones kohya and the diffusers examples use), stepped once per optimizer step.
    `num_cycles`: cosine_with_restarts's cycles; `power`: polynomial's exponent (both as kohya passes them)."""
    from diffusers.optimization import get_scheduler

    if name == "polynomial" and optimizer.defaults["lr"] <= POLYNOMIAL_LR_END:
        raise UserError(f"--lr-scheduler polynomial decays the learning rate to {POLYNOMIAL_LR_END:g}, but --learning-rate is "
                        f"{optimizer.defaults['lr']:g}; raise --learning-rate above it, or use --lr-scheduler linear")
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)


def restore_lr_scheduler(lr_scheduler, saved: dict) -> None:
    """Continue `lr_scheduler` (built from this run's options) from a saved run's `state_dict()`, after the optimizer's
    own state was loaded.

    The loaded optimizer holds the saved run's learning rates, those of the schedule it had. A resume may change the
    schedule (another --lr-scheduler or --lr-warmup-steps, a longer run), so every group's rate is recomputed from
    this schedule at the restored step; else the first resumed step trains, and logs, the old schedule's rate.
    """
    lr_scheduler.load_state_dict(saved)
    # A hack: one step back and step() again sets the groups' rates (and get_last_lr) through the public API.
    lr_scheduler.last_epoch -= 1
    lr_scheduler.step()
