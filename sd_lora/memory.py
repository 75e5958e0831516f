"""Memory: what a run will hold before it starts, and what it peaked at when it ends."""

from __future__ import annotations

import resource
import sys

import torch

ADAM_STATE_BYTES = 8  # two fp32 moments per trainable parameter


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(b.numel() * b.element_size() for b in module.buffers())


def estimate(frozen: list[torch.nn.Module], trainable: list[torch.nn.Parameter], cache_bytes: int) -> dict[str, int]:
    """Bytes the run holds for certain: frozen weights as placed, LoRA weights + grads + Adam state, cached
    latents. Activations come on top and grow with batch size and resolution (gradient checkpointing cuts them)."""
    lora = sum(p.numel() for p in trainable)
    return {
        "frozen weights": sum(module_bytes(m) for m in frozen),
        "LoRA weights, gradients and optimizer state": lora * (4 + 4 + ADAM_STATE_BYTES),
        "latent cache": cache_bytes,
    }


def describe_estimate(parts: dict[str, int]) -> str:
    listed = ", ".join(f"{name} {b / 2**20:.0f} MiB" for name, b in parts.items())
    return f"memory before activations: {sum(parts.values()) / 2**30:.2f} GiB ({listed})"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def describe_peak(device: torch.device) -> str:
    text = f"peak memory: {peak_rss_bytes() / 2**30:.2f} GiB RSS"
    if device.type == "cuda":
        text += f", {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA allocated"
    return text


def release_vae_encoder(vae: torch.nn.Module) -> int:
    """Drop the VAE's encoder half (and quant_conv) once every latent is cached: sampling only decodes.
    Returns the bytes of parameters let go (SD1.5/SDXL: about 130 MiB in fp32)."""
    parts = [m for m in (getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)) if m is not None]
    freed = sum(module_bytes(m) for m in parts)
    vae.encoder = None
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed
