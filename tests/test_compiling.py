"""--compile: what is compiled, and how many graphs dynamo may keep (compiling itself is tested end to end
in tests/test_train.py)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from sd_lora.compiling import check_compiler, compile_unet
from sd_lora.errors import UserError
from sd_lora.models.tiny import build_tiny_pipeline


@pytest.mark.parametrize("mode", ["blocks", "unet"])
def test_recompile_limit_holds_every_bucket_shape_of_every_block(mode):
    """Blocks of one class share their forward's code object, and dynamo keeps 8 graphs per code object by
    default, then silently runs eagerly: 3 cross-attention blocks used it up by the third bucket shape."""
    config = torch._dynamo.config
    with config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        unet = build_tiny_pipeline("sd1").unet
        compile_unet(unet, mode, batch_shapes=20)
        compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        blocks = len(unet.down_blocks) + 1 + len(unet.up_blocks) if mode == "blocks" else 1
        assert len(compiled) == blocks
        assert config.recompile_limit == 20 * blocks and config.accumulated_recompile_limit == max(256, 40 * blocks)
    assert config.recompile_limit == 8


def test_off_compiles_nothing_and_unknown_modes_are_refused():
    unet = build_tiny_pipeline("sd1").unet
    compile_unet(unet, "off", batch_shapes=20)
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in unet.modules())
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        compile_unet(unet, "fast")


def a_cuda_machine_with_triton(monkeypatch, capability: tuple[int, int]) -> None:
    """What check_compiler sees of a CUDA (not ROCm) machine whose GPU has `capability`, Triton installed."""
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("capability, refused", [((6, 0), True), ((7, 0), False), ((9, 0), False)])
def test_a_gpu_too_old_for_triton_is_refused(monkeypatch, capability, refused):
    """Triton needs compute capability 7.0: on a P100 (6.0) inductor raised GPUTooOldForTriton at the first compiled
    step, in a traceback after the model had loaded and the latents were cached."""
    a_cuda_machine_with_triton(monkeypatch, capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setenv("CC", "gcc")  # (a C compiler: test_compile_on_a_gpu_without_a_c_compiler_is_refused)
    if refused:
        with pytest.raises(UserError, match=r"--compile on a CUDA GPU needs Triton, which runs on compute capability 7.0 \(Volta\) "
                                            r"and newer; this Tesla P100-PCIE-16GB has 6.0; drop --compile"):
            check_compiler(cuda=True)
    else:
        check_compiler(cuda=True)


def test_the_recompile_limits_are_raised_under_their_old_names_on_older_torch(monkeypatch):
    """torch 2.4 to 2.6 (pyproject allows them) call the limits cache_size_limit and accumulated_cache_size_limit:
    --compile ended in an AttributeError on `recompile_limit` there."""
    old = types.SimpleNamespace(cache_size_limit=8, accumulated_cache_size_limit=256)
    monkeypatch.setattr(torch._dynamo, "config", old)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: None)  # (torch.compile reads the real config)
    unet = build_tiny_pipeline("sd1").unet
    compile_unet(unet, "blocks", batch_shapes=20)
    blocks = len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert (old.cache_size_limit, old.accumulated_cache_size_limit) == (20 * blocks, max(256, 40 * blocks))
    assert vars(old).keys() == {"cache_size_limit", "accumulated_cache_size_limit"}


@pytest.mark.parametrize("cc, compilers, refused", [(None, {}, True), (None, {"gcc": "/usr/bin/gcc"}, False),
                                                    (None, {"clang": "/usr/bin/clang"}, False), ("/opt/cc", {}, False)])
def test_compile_on_a_gpu_without_a_c_compiler_is_refused(monkeypatch, cc, compilers, refused):
    """Triton builds its kernel launchers with $CC, gcc or clang: without one (a slim Docker image) the first compiled
    step ended in "RuntimeError: Failed to find C compiler", after the model had loaded and the latents were cached."""
    a_cuda_machine_with_triton(monkeypatch, (8, 0))
    monkeypatch.setattr("shutil.which", lambda name: compilers.get(name))
    if cc is None:
        monkeypatch.delenv("CC", raising=False)
    else:
        monkeypatch.setenv("CC", cc)
    if refused:
        with pytest.raises(UserError, match=r"--compile on a CUDA GPU needs a C compiler for Triton's kernels \(gcc or clang; "
                                            r"e.g. apt install gcc, or name one in \$CC\); or drop --compile"):
            check_compiler(cuda=True)
    else:
        check_compiler(cuda=True)
