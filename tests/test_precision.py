"""--mixed-precision auto: bf16 where the hardware runs it natively and the model is large enough, else fp32."""

from __future__ import annotations

import pytest
import torch

from sd_lora import precision
from sd_lora.precision import FULL_SIZE_PARAMETERS, Hardware, choose_mixed_precision

CPU = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False)
CPU_BF16 = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=True)  # AVX512-BF16 (AMD Zen 4) or AMX (Intel Xeon)
AMPERE = Hardware(cuda=True, cuda_bf16=True, cpu_bf16=False)
TURING = Hardware(cuda=True, cuda_bf16=False, cpu_bf16=False)
SD15_UNET, DEMO_UNET = 859_520_964, 3_300_000


@pytest.mark.parametrize("hardware, parameters, expected", [
    (AMPERE, DEMO_UNET, "bf16"),
    (AMPERE, SD15_UNET, "bf16"),
    (TURING, SD15_UNET, "fp16"),
    (CPU_BF16, SD15_UNET, "bf16"),
    (CPU_BF16, FULL_SIZE_PARAMETERS, "bf16"),
    (CPU_BF16, FULL_SIZE_PARAMETERS - 1, "no"),  # small ops: autocast's casts cost more than bf16 saves
    (CPU_BF16, DEMO_UNET, "no"),
    (CPU, SD15_UNET, "no"),
])
def test_auto_picks_by_hardware_and_model_size(hardware, parameters, expected):
    assert choose_mixed_precision("auto", hardware, parameters) == expected


@pytest.mark.parametrize("requested", ["no", "fp16", "bf16"])
def test_an_explicit_choice_is_kept(requested):
    for hardware in (CPU, CPU_BF16, AMPERE, TURING):
        assert choose_mixed_precision(requested, hardware, SD15_UNET) == requested


def test_probe_matches_torch():
    hardware = precision.probe_hardware()
    assert hardware.cuda == torch.cuda.is_available()
    assert hardware.cuda_bf16 is False or hardware.cuda


def test_probe_counts_emulated_bf16_as_unsupported(monkeypatch):
    """A T4 or V100 "supports" bf16 by emulation only; auto must pick fp16 (tensor cores) there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    hardware = precision.probe_hardware()
    assert hardware.cuda and not hardware.cuda_bf16
    assert choose_mixed_precision("auto", hardware, SD15_UNET) == "fp16"


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "no"), (True, False, "bf16"), (False, True, "bf16")])
def test_cpu_bf16_follows_torchs_instruction_probes(monkeypatch, avx512_bf16, amx, expected):
    """Either instruction set multiplies bf16 natively: auto trains a full-size model in bf16 on both."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision.cpu_has_bf16() is (expected == "bf16")
    hardware = precision.probe_hardware()
    assert hardware.cpu_bf16 is (expected == "bf16")
    assert choose_mixed_precision("auto", hardware, SD15_UNET) == expected


def test_cpu_bf16_probes_absent_from_a_build_mean_no(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name)
    assert precision.cpu_has_bf16() is False


@pytest.mark.parametrize("native, requested, warned", [(False, "bf16", True), (True, "bf16", False), (False, "no", False),
                                                       (False, "auto", False)])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(monkeypatch, capsys, tmp_path, native, requested, warned):
    from sd_lora import preflight
    from sd_lora.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(preflight, "cpu_has_bf16", lambda: native)
    preflight.check_precision(load_config(["--data", str(tmp_path), "--mixed-precision", requested]))
    err = capsys.readouterr().err
    assert ("warning: --mixed-precision bf16 on a CPU without bf16 instructions" in err) is warned
    assert ("--mixed-precision auto or no trains in fp32" in err) is warned


@pytest.mark.parametrize("native, requested, warned", [(False, "bf16", True), (True, "bf16", False), (False, "fp16", False)])
def test_bf16_on_a_gpu_before_ampere_is_warned_about(monkeypatch, capsys, tmp_path, native, requested, warned):
    from sd_lora import preflight
    from sd_lora.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    preflight.check_precision(load_config(["--data", str(tmp_path), "--mixed-precision", requested]))
    err = capsys.readouterr().err
    assert ("warning: --mixed-precision bf16 on a Tesla T4, which has no bf16 arithmetic" in err) is warned
    assert ("--mixed-precision auto picks fp16" in err) is warned
