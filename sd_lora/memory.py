"""Memory: what a run will hold before it starts, what it peaked at when it ends, and moving tensors and
modules between host and device."""

from __future__ import annotations

import math
import resource
import sys

import torch

# bitsandbytes' 8-bit optimizers keep tensors below this many elements in 32-bit state, and quantize the others
# in blocks of this many values with one fp32 scale (absmax) per block and moment.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(b.numel() * b.element_size() for b in module.buffers())


def optimizer_state_bytes(optimizer: str, shape: torch.Size, element_size: int = 4) -> int:
    """Bytes of state `optimizer` (an `optim.OPTIMIZERS` name) keeps for one parameter of `shape`, as it allocates
    them on its first step (scalars such as step counts included where they are tensors).

    adamw: two moments and a step count. adafactor (no first moment, as built): the second moment factored into
    row and column means over the last two dimensions, and an RMS scalar. prodigy: two moments, the step-size
    estimate's `s` and the initial weights `p0`. adamw8bit: two 8-bit moments with their block scales, or two
    fp32 moments for tensors under `BNB_MIN_8BIT_SIZE` elements (most LoRA factors of rank 8 or less).
    """
    n = math.prod(shape)
    if optimizer == "adamw":
        return 2 * n * element_size + 4
    if optimizer == "adafactor":
        if len(shape) < 2:
            return (n + 1) * element_size
        rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
        return (rows + cols + 1) * element_size
    if optimizer == "prodigy":
        return 4 * n * element_size
    if optimizer == "adamw8bit":
        if n < BNB_MIN_8BIT_SIZE:
            return 2 * n * 4
        return 2 * (n + math.ceil(n / BNB_BLOCK) * 4)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def estimate(frozen: list[torch.nn.Module], trainable: list[torch.nn.Parameter], cache_bytes: int,
             optimizer: str = "adamw", text_cache_bytes: int = 0) -> dict[str, int]:
    """Bytes the run holds for certain: frozen weights as placed, LoRA weights + grads + `optimizer`'s state, cached
    latents, cached text-encoder outputs (`text_cache_bytes`, in host memory as the latents). Activations come on top
    and grow with batch size and resolution (gradient checkpointing cuts them).
    The LoRA layers sit inside the `frozen` modules: their weights are counted once, as LoRA weights."""
    lora = sum(2 * p.numel() * p.element_size() + optimizer_state_bytes(optimizer, p.shape, p.element_size())
               for p in trainable)
    trains = {id(p) for p in trainable}
    inside = sum(p.numel() * p.element_size() for m in frozen for p in m.parameters() if id(p) in trains)
    return {
        "frozen weights": sum(module_bytes(m) for m in frozen) - inside,
        "LoRA weights, gradients and optimizer state": lora,
        "latent cache": cache_bytes,
        "text-encoder output cache": text_cache_bytes,
    }


def describe_estimate(parts: dict[str, int]) -> str:
    listed = ", ".join(f"{name} {b / 2**20:.0f} MiB" for name, b in parts.items())
    return f"memory before activations: {sum(parts.values()) / 2**30:.2f} GiB ({listed})"


def peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux the high-water mark of its own address space (VmHWM):
    getrusage's ru_maxrss carries over exec, so a process started by a bigger one (a launcher, a test runner, a
    benchmark that has just written a model) would report its parent's peak as its own. Elsewhere ru_maxrss
    (macOS reports bytes, others KiB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def describe_peak(device: torch.device) -> str:
    text = f"peak memory: {peak_rss_bytes() / 2**30:.2f} GiB RSS"
    if device.type == "cuda":
        text += f", {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA allocated"
    return text


def reset_peak(device: torch.device) -> None:
    """Count `describe_peak`'s CUDA peak from now on: a run reports its own, not an earlier run's in the same process
    (a notebook that trains twice). The RSS peak is the process's high-water mark and is not reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A batch tensor from the host on `device`, without making the host wait for the device: copied as it is
    (from the DataLoader's pinned memory the copy is asynchronous), then converted there. Converting first
    would copy from a fresh pageable tensor, which the CUDA driver may only do after the queued work ends; a
    pageable tensor (a step's token ids, from the tokenizer) is pinned first for the same reason."""
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    tensor = tensor.to(device, non_blocking=True)
    return tensor if dtype is None else tensor.to(dtype)


def move_modules(modules: list[torch.nn.Module], device: torch.device | str) -> None:
    """Move `modules` to `device`; GPU memory they leave behind goes back to the device at once (PyTorch's caching
    allocator would otherwise keep it for this process)."""
    leaves_gpu = torch.device(device).type != "cuda" and any(next(m.parameters()).is_cuda for m in modules)
    for module in modules:
        module.to(device)
    if leaves_gpu:
        torch.cuda.empty_cache()


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


def release_modules(modules: list[torch.nn.Module]) -> int:
    """Let go of `modules`' weights: their parameters and buffers move to the meta device, so the modules keep their
    structure, config and dtype while running them fails. Returns the bytes let go."""
    freed = sum(module_bytes(m) for m in modules)
    leaves_gpu = any(t.is_cuda for m in modules for t in (*m.parameters(), *m.buffers()))
    for module in modules:
        module.to("meta")
    if leaves_gpu:
        torch.cuda.empty_cache()
    return freed


_CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: torch.OutOfMemoryError (CUDA, MPS, XPU) or the CPU allocator's RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in _CPU_OUT_OF_MEMORY))


def ways_to_fit(*, batch_size: int, gradient_accumulation_steps: int, gradient_checkpointing: bool, mixed_precision: str,
                optimizer: str, train_text_encoder: bool, resolution: int, device_type: str) -> list[str]:
    """What would lower this run's memory, most effective first, as flags to change (pure)."""
    ways = []
    if batch_size > 1:  # the largest smaller batch that divides it, so the accumulation makes up the rest exactly
        smaller = max(d for d in range(1, batch_size) if batch_size % d == 0)
        ways.append(f"--batch-size {smaller} --gradient-accumulation-steps {gradient_accumulation_steps * batch_size // smaller} "
                    "(the same images per optimizer step)")
    if not gradient_checkpointing:
        ways.append("--gradient-checkpointing (recomputes activations: about a third slower)")
    if mixed_precision == "no":
        ways.append("--mixed-precision bf16 (fp16 on GPUs without bf16)" if device_type != "cpu" else "--mixed-precision bf16")
    if optimizer == "adamw" and device_type == "cuda":
        ways.append("--optimizer adamw8bit (pip install 'sd_lora[bitsandbytes]')")
    if train_text_encoder:
        ways.append("training the U-Net only (drop --train-text-encoder)")
    if resolution > 256:
        ways.append(f"--resolution {resolution * 3 // 4 // 64 * 64} (fewer pixels per image)")
    return ways
