"""Baking LoRAs into a base model: the saved diffusers folder, reloaded with `from_pretrained`, gives the outputs
diffusers gives with the same LoRAs loaded as adapters (`load_lora_weights` + `set_adapters` weights); so does
a single-file checkpoint written in the original layout and loaded back.

Weights other than 1, alpha != rank and a LoRA on only some modules make every part of the arithmetic count.
"""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from sd_lora.merge import main as merge_main
from sd_lora.models.bake import BAKE_RECORD, bake_model
from helpers import write_random_lora

TOLERANCE = 1e-4


def _outputs(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sdxl = isinstance(pipe, StableDiffusionXLPipeline)
    latents = torch.randn(1, 4, 8, 8, generator=g)  # (B, 4, H/8, W/8)
    states = torch.randn(1, 8, pipe.unet.config.cross_attention_dim, generator=g)  # (B, tokens, D)
    ids = torch.randint(0, 300, (1, 77), generator=g)
    extra = {}
    if sdxl:
        pooled, time_ids = torch.randn(1, 32, generator=g), torch.randn(1, 6, generator=g)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        out = {"unet": pipe.unet(latents, torch.tensor([500]), states, **extra).sample,
               "text_encoder": pipe.text_encoder(ids).last_hidden_state}
        if sdxl:
            out["text_encoder_2"] = pipe.text_encoder_2(ids).last_hidden_state
    return out


def _compare(baked, reference, base, label):
    diffs = {k: (baked[k] - reference[k]).abs().max().item() for k in reference}
    print(f"{label}: max abs diff baked vs diffusers adapters {diffs}")
    assert all(d < TOLERANCE for d in diffs.values()), diffs
    for k in reference:  # the LoRAs change every output, so the comparison has teeth
        assert (reference[k] - base[k]).abs().max() > 100 * TOLERANCE, k


@pytest.fixture(scope="module")
def sd1_loras(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bake_loras")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    a = write_random_lora(folder / "a.safetensors", pipe, rank=4, alpha=2.0, seed=1)
    b = write_random_lora(folder / "b.safetensors", pipe, rank=2, alpha=8.0, seed=2, unet_every=2)
    return folder, a, b


@pytest.fixture(scope="module")
def reference_a(tiny_model_dir, sd1_loras):
    """(base outputs, outputs with LoRA A x 0.8 loaded by diffusers as an adapter)."""
    folder, a, _ = sd1_loras
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base = _outputs(pipe)
    pipe.load_lora_weights(folder, weight_name=a.name, adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.8])
    return base, _outputs(pipe)


def test_bake_one_lora_matches_diffusers(tiny_model_dir, sd1_loras, reference_a, tmp_path, capsys):
    _, a, _ = sd1_loras
    out = tmp_path / "baked"
    assert merge_main(["--model", str(tiny_model_dir), "--lora", f"{a}:0.8", "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    baked = _outputs(StableDiffusionPipeline.from_pretrained(out))
    base, reference = reference_a
    _compare(baked, reference, base, "sd1, one LoRA x 0.8")
    record = json.loads((out / BAKE_RECORD).read_text())
    assert record["loras"][0]["weight"] == 0.8 and record["loras"][0]["modules"] == {"unet": 48, "text_encoder": 18}
    # the record travels with the model: local paths by their basename only (`fsio.public_name`)
    assert record["base_model"] == tiny_model_dir.name and record["loras"][0]["file"] == "a.safetensors"


def test_bake_single_file_checkpoint_in_and_out(tiny_model_dir, sd1_loras, reference_a, tmp_path):
    """A1111-style: a single-file base in, a single-file checkpoint (original layout) out."""
    from types import SimpleNamespace

    from sd_lora.models.single_file import load_single_file, read_safetensors_header, save_single_file

    _, a, _ = sd1_loras
    base_file = save_single_file(
        StableDiffusionPipeline.from_pretrained(tiny_model_dir).components, tmp_path / "base.safetensors", "sd1"
    )
    out = bake_model(str(base_file), [(a, 0.8)], tmp_path / "baked.safetensors", config_dir=tiny_model_dir)
    keys, metadata = read_safetensors_header(out)
    assert any(k.startswith("model.diffusion_model.") for k in keys)  # the original LDM layout
    record = json.loads(metadata["sd_lora_baked_loras"])
    assert record["loras"][0]["weight"] == 0.8
    assert record["base_model"] == "base.safetensors" and record["loras"][0]["file"] == "a.safetensors"  # no folders
    parts = load_single_file(out, config_dir=tiny_model_dir)
    baked = _outputs(SimpleNamespace(unet=parts["unet"], text_encoder=parts["text_encoder"]))
    base, reference = reference_a
    _compare(baked, reference, base, "sd1 single file, one LoRA x 0.8")


def test_bake_two_loras_matches_two_adapters(tiny_model_dir, sd1_loras, tmp_path):
    folder, a, b = sd1_loras
    out = bake_model(str(tiny_model_dir), [(a, 0.7), (b, -0.3)], tmp_path / "baked")
    baked = _outputs(StableDiffusionPipeline.from_pretrained(out))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base = _outputs(pipe)
    pipe.load_lora_weights(folder, weight_name=a.name, adapter_name="a")
    pipe.load_lora_weights(folder, weight_name=b.name, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.3])
    # U-Net only: diffusers 0.42 with transformers 5 keeps just the first text-encoder adapter (the second
    # load leaves `lora_A` = {"a"}), so its two-adapter text encoder is not a reference; the one-LoRA test
    # above covers the text encoder.
    reference = {"unet": _outputs(pipe)["unet"]}
    _compare(baked, reference, base, "sd1, two LoRAs x 0.7 / -0.3")


def test_bake_sdxl_matches_diffusers(tmp_path):
    from sd_lora.models.tiny import save_tiny_sdxl_model

    base_dir = save_tiny_sdxl_model(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    lora = write_random_lora(tmp_path / "xl.safetensors", pipe, rank=4, alpha=2.0, seed=5)
    out = bake_model(str(base_dir), [(lora, 0.8)], tmp_path / "baked")
    baked = _outputs(StableDiffusionXLPipeline.from_pretrained(out))

    base = _outputs(pipe)
    pipe.load_lora_weights(tmp_path, weight_name=lora.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.8])
    _compare(baked, _outputs(pipe), base, "sdxl, one LoRA x 0.8")


def test_save_precision_and_the_folders_permissions(tiny_model_dir, sd1_loras, tmp_path):
    _, a, _ = sd1_loras
    old_umask = os.umask(0o022)
    try:
        out = bake_model(str(tiny_model_dir), [(a, 1.0)], tmp_path / "half", save_precision="fp16")
    finally:
        os.umask(old_umask)
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    # the umask's mode, as any folder: the temporary folder it was renamed from must not keep mkdtemp's 0700
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_bake_errors(tiny_model_dir, sd1_loras, tmp_path, capsys):
    from safetensors.torch import save_file

    from sd_lora.models.tiny import build_tiny_pipeline

    folder, a, _ = sd1_loras
    sd2 = write_random_lora(tmp_path / "sd2.safetensors", build_tiny_pipeline("sd2"), rank=2, alpha=2.0, seed=3)
    xl = tmp_path / "xl.safetensors"  # SDXL's second text encoder: no such layer in an SD1 model
    name = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 48), f"{name}.lora_up.weight": torch.zeros(96, 2)}, xl)
    capsys.readouterr()
    cases = [
        ([str(sd2)], tmp_path / "x", "do not fit the base model's layers"),
        ([str(xl)], tmp_path / "x", "cannot bake this file exactly:\n.*no layer of the sd1 model"),
        ([str(a)], tiny_model_dir, "already exists"),
        ([str(a)], a, "already exists"),
        ([str(tmp_path / "none.safetensors")], tmp_path / "y", "none.safetensors: no such LoRA file"),
    ]
    for loras, output, message in cases:
        lora_args = [x for lora in loras for x in ("--lora", lora)]
        args = ["--model", str(tiny_model_dir), *lora_args, "--output", str(output)]
        assert merge_main(args) == 2
        err = capsys.readouterr().err  # diffusers' loading progress bars may come first
        assert re.search(r"^sd_lora: error:", err, re.M) and re.search(message, err), (message, err)
        assert "Traceback" not in err
        assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert merge_main(["--model", str(tmp_path / "nowhere"), "--lora", str(a), "--output", str(tmp_path / "z")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
