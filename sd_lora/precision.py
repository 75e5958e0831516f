"""`--mixed-precision auto`: which compute precision a run gets when the user does not choose one.

bf16 autocast with the frozen base stored in bf16 and the LoRA parameters kept in fp32 is how SD LoRAs are
trained on GPUs. On a CPU it pays only where the hardware multiplies bf16 natively (AVX512-BF16 or AMX) and the
model's operations are large enough to amortise autocast's casts: measured with `benchmarks/train_speed.py`, the
full-size SD1.5 U-Net step runs 1.5x (256 px) to 1.9x (512 px) faster in bf16 on an Intel Xeon with AMX, 1.6x
(512 px) on an AMD EPYC with AVX512-BF16 (Zen 4) and 1.9x on a Zen 5, while training the 0.8M-parameter test
U-Net runs at 0.75x the fp32 speed on the Xeon and 1.17x on the Zen 5: a small, machine-dependent gain at best,
so small models stay in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# U-Nets from this size up count as full-size (SD1.5 has 860M parameters, SDXL 2.6B; the demo base 3.3M).
FULL_SIZE_PARAMETERS = 100_000_000


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    cuda_bf16: bool  # the GPU computes in bf16 (Ampere and later)
    cpu_bf16: bool  # the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)


def probe_hardware() -> Hardware:
    cuda = torch.cuda.is_available()
    # Without including_emulation=False every CUDA GPU "supports" bf16: pre-Ampere ones (T4, V100) emulate it,
    # far slower than their fp16 tensor cores.
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    return Hardware(cuda=cuda, cuda_bf16=cuda_bf16, cpu_bf16=cpu_has_bf16())


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without, PyTorch computes bf16 in a slow
    fallback: on an AVX2-only CPU (AMD EPYC, Zen 3) a 3x3 convolution at SD1.5's first level ran at 0.6 GFLOP/s in bf16
    against 84 in fp32, and the test U-Net's training step 2.7x slower. With AVX512-BF16 (AMD Zen 4) a 2048^2 `mm`
    ran at 373 GFLOP/s in bf16 against 94 in fp32. The probes are private: absent in some builds."""
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def choose_mixed_precision(requested: str, hardware: Hardware, unet_parameters: int) -> str:
    """The concrete precision ("no", "fp16" or "bf16") for `requested`; only "auto" is decided here."""
    if requested != "auto":
        return requested
    if hardware.cuda:
        return "bf16" if hardware.cuda_bf16 else "fp16"  # fp16 runs with a loss scaler on older GPUs
    if hardware.cpu_bf16 and unet_parameters >= FULL_SIZE_PARAMETERS:
        return "bf16"
    return "no"


def vae_dtype(family: str, weight_dtype: torch.dtype, fp16_safe: bool = False) -> torch.dtype:
    """The dtype the VAE is kept in when the frozen base is in `weight_dtype`: SDXL's own VAE overflows in fp16
    (NaN latents), so it stays fp32 unless `fp16_safe` (a --vae whose config says `force_upcast: false`, as
    madebyollin/sdxl-vae-fp16-fix's does; stabilityai/sdxl-vae and single-file VAEs say true)."""
    if family == "sdxl" and weight_dtype == torch.float16 and not fp16_safe:
        return torch.float32
    return weight_dtype


def call_vae(method, x: torch.Tensor, *args, **kwargs):
    """`method(x, ...)`, a VAE's `encode` or `decode`, in the VAE's own dtype and outside any autocast: SDXL's
    VAE is kept in fp32 under fp16 (`vae_dtype`) because fp16 overflows it (NaN latents, black samples), and an
    fp16 autocast around it would compute its convolutions in fp16 all the same."""
    with torch.autocast(x.device.type, enabled=False):
        return method(x.to(method.__self__.dtype), *args, **kwargs)
