"""Optimizer and learning-rate schedule for the LoRA parameters."""

from __future__ import annotations

import torch

from .errors import UserError


def build_optimizer(name: str, param_groups: list[dict], *, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, foreach elsewhere) or bitsandbytes' 8-bit AdamW.

    `param_groups` are torch-style dicts with "params" and "lr"; empty groups are dropped.
    """
    groups = [g for g in param_groups if g["params"]]
    if name == "adamw":
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, weight_decay=weight_decay, **fast)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes: pip install 'sd_lora[bitsandbytes]' (CUDA GPUs only), or use --optimizer adamw") from None
        if device.type != "cuda":
            raise UserError("--optimizer adamw8bit runs on CUDA GPUs only; on this device use --optimizer adamw")
        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int):
    """diffusers' schedules (the same ones kohya and the diffusers examples use), stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
