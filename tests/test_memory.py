import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_lora import memory


def test_estimate_counts_weights_lora_state_and_cache():
    frozen = torch.nn.Linear(10, 10)  # 110 fp32 values
    lora = [torch.nn.Parameter(torch.zeros(4, 10)), torch.nn.Parameter(torch.zeros(10, 4))]  # 80 values
    parts = memory.estimate([frozen], lora, cache_bytes=1000)
    assert parts["frozen weights"] == 110 * 4
    assert parts["LoRA weights, gradients and optimizer state"] == 80 * 16 + 2 * 4  # + AdamW's two step counts
    assert parts["latent cache"] == 1000
    assert "GiB" in memory.describe_estimate(parts)
    prodigy = memory.estimate([frozen], lora, cache_bytes=0, optimizer="prodigy")
    assert prodigy["LoRA weights, gradients and optimizer state"] == 80 * (4 + 4 + 16)
    # cached text-encoder outputs sit on the device too (SDXL: about 0.3 MiB a caption); the estimate left them out
    assert memory.estimate([frozen], lora, cache_bytes=0, text_cache_bytes=5000)["text-encoder output cache"] == 5000


def test_estimate_counts_lora_weights_inside_the_frozen_modules_once():
    # PEFT puts the LoRA factors inside the base modules: module_bytes of the U-Net includes them.
    model = torch.nn.Sequential(torch.nn.Linear(10, 10).requires_grad_(False), torch.nn.Linear(10, 4, bias=False))
    lora = list(model[1].parameters())  # 40 trainable fp32 values
    parts = memory.estimate([model], lora, cache_bytes=0)
    assert parts["frozen weights"] == 110 * 4
    assert parts["LoRA weights, gradients and optimizer state"] == 40 * 16 + 4


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy"])
def test_optimizer_state_bytes_match_what_the_optimizer_allocates(name):
    from sd_lora.optim import build_optimizer

    # LoRA factors as PEFT shapes them: linear down/up, 1x1-conv down/up, at rank 4 on a 320-wide layer
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(4, 320), (320, 4), (4, 320, 1, 1), (320, 4, 1, 1)]]
    optimizer = build_optimizer(name, [{"params": params, "lr": 1.0}], weight_decay=0.01, device=torch.device("cpu"))
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    allocated = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                    if torch.is_tensor(t))
    assert sum(memory.optimizer_state_bytes(name, p.shape) for p in params) == allocated


def test_8_bit_adamw_state_is_a_quarter_of_adamw_only_for_large_tensors():
    small, large = torch.Size((4, 320)), torch.Size((16, 320))  # 1280 and 5120 values, around bitsandbytes' 4096
    assert memory.optimizer_state_bytes("adamw8bit", small) == 1280 * 8  # fp32 moments below the threshold
    assert memory.optimizer_state_bytes("adamw8bit", large) == 5120 * 2 + 2 * 20 * 4  # int8 moments, 20 blocks' scales
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        memory.optimizer_state_bytes("sgd", small)


def test_peak_rss_is_plausible():
    block = bytearray(64 * 2**20)  # touch 64 MiB so the peak is at least that
    assert memory.peak_rss_bytes() >= len(block)
    assert memory.describe_peak(torch.device("cpu")).startswith("peak memory:")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux's")
def test_peak_rss_is_the_process_own_not_its_parents():
    # A parent touches 2 GiB, lets it go, then starts a process that reports its peak: getrusage's ru_maxrss
    # would hand the child the parent's 2 GiB (it carries over exec); the child's own peak is its imports.
    child = "from sd_lora import memory; print(memory.peak_rss_bytes())"
    parent = ("import subprocess, sys\n"
              "block = bytearray(2048 * 2**20)\n"
              "block[::4096] = b'\\x01' * len(block[::4096])\n"
              "del block\n"
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)\n")
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    child_peak = int(done.stdout.split()[0])
    assert 32 * 2**20 < child_peak < 1536 * 2**20  # imports torch (about 0.7 GiB with its libraries), not the parent's 2 GiB


def test_releasing_the_vae_encoder_keeps_decoding_exact():
    import torch

    from sd_lora.memory import module_bytes, release_vae_encoder
    from sd_lora.models.tiny import tiny_vae

    vae = tiny_vae()
    encoder_bytes = module_bytes(vae.encoder) + module_bytes(vae.quant_conv)
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = vae.decode(latents).sample
    assert release_vae_encoder(vae) == encoder_bytes > 0
    assert vae.encoder is None and not any(k.startswith(("encoder.", "quant_conv.")) for k in vae.state_dict())
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, before)


def test_out_of_memory_is_recognised_on_gpus_and_the_cpu():
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes."))
    assert not memory.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not memory.is_out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))


def test_ways_to_fit_name_only_the_flags_that_would_change_something():
    base = dict(batch_size=4, gradient_accumulation_steps=1, gradient_checkpointing=False, mixed_precision="no",
                optimizer="adamw", train_text_encoder=True, resolution=1024, device_type="cuda")
    ways = memory.ways_to_fit(**base)
    assert ways[0].startswith("--batch-size 2 --gradient-accumulation-steps 2 ")  # keeps 4 images per step
    # An odd batch too: 3 x 2 images per step were advised as 1 x 4.
    for batch, accumulation, advice in ((3, 2, "--batch-size 1 --gradient-accumulation-steps 6 "),
                                        (6, 1, "--batch-size 3 --gradient-accumulation-steps 2 ")):
        assert memory.ways_to_fit(**dict(base, batch_size=batch, gradient_accumulation_steps=accumulation))[0].startswith(advice)
    assert [w.split(" (")[0] for w in ways[1:]] == [
        "--gradient-checkpointing", "--mixed-precision bf16", "--optimizer adamw8bit",
        "training the U-Net only", "--resolution 768"]
    lean = dict(base, batch_size=1, gradient_checkpointing=True, mixed_precision="bf16", optimizer="adamw8bit",
                train_text_encoder=False, resolution=256)
    assert memory.ways_to_fit(**lean) == []
    assert not any("adamw8bit" in w for w in memory.ways_to_fit(**dict(base, device_type="cpu")))  # CUDA only


def test_move_modules_moves_every_module_and_frees_gpu_cache_only_when_leaving_a_gpu(monkeypatch):
    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))
    modules = [torch.nn.Linear(2, 2), torch.nn.Linear(3, 1)]
    memory.move_modules(modules, "meta")
    assert all(p.is_meta for m in modules for p in m.parameters())
    memory.move_modules([], "cpu")
    assert freed == []  # nothing was on a GPU (the CUDA branch needs a GPU to run)


def test_to_device_copies_the_tensor_as_it_is_then_converts_it(monkeypatch):
    """The copy must leave from the DataLoader's pinned tensor itself (asynchronous on CUDA); a conversion on
    the host first would hand the driver a fresh pageable tensor."""
    calls, original = [], torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    y = memory.to_device(x, "cpu", torch.bfloat16)
    assert calls == [(("cpu",), {"non_blocking": True}), ((torch.bfloat16,), {})]
    assert y.dtype == torch.bfloat16 and torch.equal(y.float(), x)
    assert memory.to_device(x, "cpu") is x  # same device, no dtype: nothing to do


def test_to_device_pins_a_pageable_tensor_for_a_gpu(monkeypatch):
    """A pageable host tensor (a step's token ids) is pinned before its copy to a GPU, so that the copy need not wait
    for the queued work; a pinned one (the DataLoader's) is copied as it is, and nothing is pinned for the CPU.
    Simulated: the CUDA copy returns the tensor itself."""
    calls, original, pinned = [], torch.Tensor.to, []

    def pin(self):
        calls.append("pin")
        pinned.append(self.clone())
        return pinned[-1]

    def to(self, *args, **kwargs):
        if args and args[0] == "cuda":
            calls.append(("cuda", kwargs, any(self is p for p in pinned)))
            return self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: any(self is p for p in pinned))
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    ids = torch.ones(2, 77, dtype=torch.long)
    memory.to_device(ids, "cuda")
    assert calls == ["pin", ("cuda", {"non_blocking": True}, True)]
    calls.clear()
    memory.to_device(pinned[-1], "cuda")  # already pinned
    memory.to_device(ids, "cpu")
    assert calls == [("cuda", {"non_blocking": True}, True)]


def test_reset_peak_restarts_the_cuda_peak_on_a_gpu_only(monkeypatch):
    """Simulated allocator statistics: after a reset the peak is what is allocated now."""
    stats = {"peak": 5 * 2**30, "now": 2**30}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: stats["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: stats.update(peak=stats["now"]))
    gpu = torch.device("cuda", 0)
    assert "5.00 GiB CUDA allocated" in memory.describe_peak(gpu)
    memory.reset_peak(torch.device("cpu"))
    assert stats["peak"] == 5 * 2**30
    memory.reset_peak(gpu)
    assert "1.00 GiB CUDA allocated" in memory.describe_peak(gpu)


def test_release_modules_lets_the_weights_go_and_keeps_the_modules():
    modules = [torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)]  # parameters and buffers
    expected = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
    assert memory.release_modules(modules) == expected == (8 * 4 + 4 + 4 + 4) * 4 + (4 + 4) * 4 + 8
    assert {t.device.type for m in modules for t in (*m.parameters(), *m.buffers())} == {"meta"}
    assert modules[0].weight.shape == (4, 8) and modules[0].weight.dtype == torch.float32
