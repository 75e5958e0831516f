"""`--compile`: torch.compile the U-Net for the training steps; sampling and validation stay eager.

`blocks` compiles each down, mid and up block on its own (regional compilation: smaller graphs, a shorter
first step), `unet` the whole U-Net as one graph. Either is compiled in place (`nn.Module.compile`), so
parameter names, LoRA export and checkpoints are unchanged. The first step, and the first step of each new
bucket shape, pays the compile time; inference under `eager()` never triggers a compile of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch

from .errors import UserError

COMPILE_MODES = ("off", "blocks", "unet")


def check_compiler(cuda: bool) -> None:
    """torch.compile's inductor needs a C++ compiler on the CPU, and Triton with a C compiler on a CUDA GPU (one Triton
    supports: inductor raises GPUTooOldForTriton at the first compiled step otherwise): refuse clearly without."""
    if cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserError("--compile on a CUDA GPU needs Triton (pip install triton); or drop --compile") from None
        major, minor = torch.cuda.get_device_capability()
        if torch.version.hip is None and major < 7:  # Pascal (P100, GTX 10xx) and older
            raise UserError(f"--compile on a CUDA GPU needs Triton, which runs on compute capability 7.0 (Volta) and newer; this "
                            f"{torch.cuda.get_device_name()} has {major}.{minor}; drop --compile")
        # Triton builds its launchers with a C compiler at the first kernel (its build.py: $CC, else gcc or clang);
        # slim images (the pytorch/pytorch runtime ones) have none.
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            raise UserError("--compile on a CUDA GPU needs a C compiler for Triton's kernels (gcc or clang; e.g. apt install gcc, "
                            "or name one in $CC); or drop --compile")
    elif not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise UserError("--compile on the CPU needs a C++ compiler (g++ or clang++; e.g. apt install g++); or drop --compile")


def compile_unet(unet: torch.nn.Module, mode: str, batch_shapes: int = 1) -> None:
    """Compile `unet` in place: its blocks one by one (`blocks`) or as a whole (`unet`), for up to
    `batch_shapes` input shapes (bucket sizes, each with its full and its short last batch)."""
    if mode == "off":
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; known: {', '.join(COMPILE_MODES)}")
    # Static shapes: each bucket shape gets its own graph. Dynamic-shape graphs failed to compile
    # (inductor, torch 2.14, on these U-Nets) as soon as a second bucket shape arrived.
    blocks = [unet] if mode == "unet" else [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    # Dynamo keeps at most `recompile_limit` graphs per code object, then silently runs it eagerly. Blocks of
    # one class share their forward's code object, so all of them, at every shape, count against one limit.
    graphs = batch_shapes * len(blocks)
    config = torch._dynamo.config
    # torch < 2.7 names them cache_size_limit and accumulated_cache_size_limit (pytorch#143709 renamed them).
    per_code, accumulated = (("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit")
                             else ("cache_size_limit", "accumulated_cache_size_limit"))
    setattr(config, per_code, max(getattr(config, per_code), graphs))
    setattr(config, accumulated, max(getattr(config, accumulated), 2 * graphs))
    for block in blocks:
        block.compile(dynamic=False)


def eager():
    """A context in which compiled modules run eagerly: for sampling and validation, whose no-grad shapes
    would otherwise compile a second graph for a handful of calls."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
