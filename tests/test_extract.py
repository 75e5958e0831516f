"""`python -m sd_lora.extract`: extract(base, base + LoRA) at full rank gives back the LoRA's weight change.

The tuned model is made by baking a random LoRA into the tiny base (`models.bake`), so the difference is known
exactly; the LoRA covers every second U-Net module, so the others must be skipped as unchanged.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sd_lora.extract import main
from sd_lora.formats.kohya import read_lora_file
from sd_lora.lora.maths import delta
from sd_lora.merge import read_lora_modules
from sd_lora.models.bake import bake_model
from helpers import write_random_lora


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory):
    """(folder, LoRA file, tuned model dir): base + 1.0 x a rank-4 LoRA on half the U-Net and all the TE."""
    folder = tmp_path_factory.mktemp("extract")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    lora = write_random_lora(folder / "lora.safetensors", pipe, rank=4, alpha=2.0, seed=11, unet_every=2)
    return folder, lora, bake_model(str(tiny_model_dir), [(lora, 1.0)], folder / "tuned")


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_full_rank_extract_recovers_the_lora(tiny_model_dir, tuned, capsys):
    folder, lora, tuned_dir = tuned
    out = folder / "extracted.safetensors"
    capsys.readouterr()
    assert main([str(out), "--base", str(tiny_model_dir), "--tuned", str(tuned_dir), "--rank", "64",
                 "--text-encoder"]) == 0
    printed = capsys.readouterr().out
    source, extracted = read_lora_modules(lora).modules, read_lora_modules(out).modules
    assert extracted.keys() == source.keys()  # 24 U-Net + 18 text-encoder modules; the unchanged 24 skipped
    assert "skipped 24 whose difference is ~0" in printed
    errors = {n: _rel(delta(extracted[n], torch.float64), delta(source[n], torch.float64)) for n in source}
    worst = max(errors.values())
    print(f"extract at full rank: max relative error vs the LoRA's delta {worst:.2e}")
    assert worst < 1e-5
    _, meta = read_lora_file(out)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_network_args"]) == {"targets": "attn-mlp", "train_text_encoder": True}
    recorded = json.loads(meta["sd_lora_extract"])
    assert recorded["skipped_modules"] == 24
    # Shared files record local paths by their basenames, as training does (no user or folder names).
    assert (meta["ss_sd_model_name"], recorded["base"], recorded["tuned"]) == (tiny_model_dir.name, tiny_model_dir.name, "tuned")
    assert str(folder) not in json.dumps(meta) and str(tiny_model_dir.parent) not in json.dumps(meta)


def test_an_output_name_that_is_not_utf8_is_written_with_readable_metadata(tiny_model_dir, tuned, tmp_path):
    """A Latin-1 file name (a Windows zip unpacked on Linux) is a valid path, but safetensors metadata is UTF-8."""
    import os

    _, _, tuned_dir = tuned
    out = tmp_path / os.fsdecode(b"caf\xe9.safetensors")
    assert main([str(out), "--base", str(tiny_model_dir), "--tuned", str(tuned_dir), "--rank", "2"]) == 0
    _, meta = read_lora_file(out)
    assert meta["ss_output_name"] == meta["modelspec.title"] == "caf\ufffd"


def test_low_rank_extract_reports_energy_and_honest_errors(tiny_model_dir, tuned, capsys):
    folder, lora, tuned_dir = tuned
    out = folder / "rank2.safetensors"
    capsys.readouterr()
    assert main([str(out), "--base", str(tiny_model_dir), "--tuned", str(tuned_dir), "--rank", "2", "-v"]) == 0
    printed = capsys.readouterr().out
    lines = re.findall(r"^  (lora_\w+): energy (\S+), relative error (\S+)$", printed, re.M)
    source, extracted = read_lora_modules(lora).modules, read_lora_modules(out).modules
    assert {name for name, _, _ in lines} == extracted.keys()
    assert all(name.startswith("lora_unet_") for name in extracted)  # no --text-encoder
    assert "pass --text-encoder" in printed  # ... but it is told that the text encoders differ
    for name, energy, reported in lines:
        s = torch.linalg.svdvals(delta(source[name], torch.float64).flatten(1))
        assert float(energy) == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), abs=1e-4)
        actual = _rel(delta(extracted[name], torch.float64), delta(source[name], torch.float64))
        assert 1e-3 < actual <= float(reported) * (1 + 5e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "positive integer"),
        (["--rank", "4", "--energy", "1.2"], r"\(0, 1\]"),
        ([], "give --rank"),
        (["--rank", "4", "--targets", "everything"], "invalid choice"),
    ],
)
def test_bad_arguments(tiny_model_dir, tuned, tmp_path, capsys, args, message):
    _, _, tuned_dir = tuned
    assert main([str(tmp_path / "o.safetensors"), "--base", str(tiny_model_dir), "--tuned", str(tuned_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd_lora: error:") and re.search(message, err) and "Traceback" not in err


def test_model_problems(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    assert main([out, "--base", str(tmp_path / "missing"), "--tuned", str(tiny_model_dir), "--rank", "4"]) == 2
    assert "--base " in capsys.readouterr().err
    assert main([out, "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir), "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "do not differ in any targeted layer" in err.strip().splitlines()[-1] or "do not differ" in err


def test_sdxl_extract_uses_sgm_names(tmp_path, capsys):
    from sd_lora.formats.architecture import architecture_of_pipeline
    from sd_lora.formats.readers import read_any_lora
    from sd_lora.models.tiny import save_tiny_sdxl_model

    base_dir = save_tiny_sdxl_model(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    lora = write_random_lora(tmp_path / "xl.safetensors", pipe, rank=4, alpha=4.0, seed=12)
    tuned_dir = bake_model(str(base_dir), [(lora, 1.0)], tmp_path / "tuned")
    out = tmp_path / "extracted.safetensors"
    assert main([str(out), "--base", str(base_dir), "--tuned", str(tuned_dir), "--rank", "4", "--text-encoder"]) == 0
    state, meta = read_lora_file(out)
    assert set(state) == set(read_lora_file(lora)[0])  # the same kohya names: SGM for the U-Net, lora_te1/te2_
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    # resolved against the tiny model itself (the full-size SDXL architecture is slow to build)
    architecture = architecture_of_pipeline(pipe)
    source = read_any_lora(lora, architecture=architecture).components
    extracted = read_any_lora(out, architecture=architecture).components
    worst = max(
        _rel(delta(extracted[c][p], torch.float64), delta(w, torch.float64))
        for c, modules in source.items() for p, w in modules.items()
    )
    assert worst < 1e-5  # rank 4 = the LoRA's rank: exact


def test_single_file_models_of_another_size_take_their_config_folders(tiny_model_dir, tuned, tmp_path, capsys):
    """The loader asks for the diffusers folder describing a non-standard single file: --base-config /
    --tuned-config are those flags, and the message names them (not train's --model-config)."""
    from sd_lora.models.single_file import save_single_file

    folder, lora, tuned_dir = tuned
    base_file = save_single_file(StableDiffusionPipeline.from_pretrained(tiny_model_dir).components,
                                 tmp_path / "base.safetensors", "sd1")  # fmt: skip
    tuned_file = save_single_file(StableDiffusionPipeline.from_pretrained(tuned_dir).components,
                                  tmp_path / "tuned.safetensors", "sd1")  # fmt: skip
    out = tmp_path / "o.safetensors"
    capsys.readouterr()
    assert main([str(out), "--base", str(tiny_model_dir), "--tuned", str(tuned_file), "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "tuned.safetensors: cannot load as sd1" in err and "pass --tuned-config with a diffusers folder" in err
    assert main([str(out), "--base", str(base_file), "--tuned", str(tuned_dir), "--rank", "4"]) == 2
    assert "pass --base-config with a diffusers folder" in capsys.readouterr().err

    assert main([str(out), "--base", str(base_file), "--base-config", str(tiny_model_dir),
                 "--tuned", str(tuned_file), "--tuned-config", str(tiny_model_dir), "--rank", "4"]) == 0  # fmt: skip
    source = {n: w for n, w in read_lora_modules(lora).modules.items() if n.startswith("lora_unet_")}
    extracted = read_lora_modules(out).modules
    assert extracted.keys() == source.keys()  # the 24 U-Net modules of the LoRA; no --text-encoder
    worst = max(_rel(delta(extracted[n], torch.float64), delta(w, torch.float64)) for n, w in source.items())
    assert worst < 1e-5  # rank 4 = the LoRA's rank: exact, as from the folders


def test_config_folder_problems_are_reported_before_loading(tiny_model_dir, tuned, tmp_path, capsys):
    _, _, tuned_dir = tuned
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "o.safetensors"), "--base", str(tiny_model_dir), "--tuned", str(tuned_dir), "--rank", "4"]
    assert main([*args, "--base-config", str(tmp_path / "empty"), "--tuned-config", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"--base-config {tmp_path / 'empty'}: not a diffusers folder (no model_index.json)" in err
    assert f"--tuned-config {tiny_model_dir}: only a single-file --tuned checkpoint (.safetensors/" in err
    assert f"--tuned {tuned_dir} is not one (a diffusers folder or Hub id brings its own configs); drop --tuned-config" in err
    assert "3 configuration problems" in err  # --base is a folder too: every problem at once, nothing loaded


def test_a_pickled_checkpoint_needs_the_flag_extract_has(tiny_model_dir, tuned, tmp_path, capsys):
    """The loader refuses a .ckpt without --allow-unsafe-pickle; extract had no such flag to pass."""
    from sd_lora.models.single_file import checkpoint_state_dict

    _, lora, tuned_dir = tuned
    tensors = checkpoint_state_dict(StableDiffusionPipeline.from_pretrained(tuned_dir).components, "sd1")
    ckpt = tmp_path / "tuned.ckpt"
    torch.save({"state_dict": tensors}, ckpt)
    args = [str(tmp_path / "o.safetensors"), "--base", str(tiny_model_dir), "--tuned", str(ckpt), "--tuned-config", str(tiny_model_dir), "--rank", "4"]
    capsys.readouterr()
    assert main(args) == 2 and "--allow-unsafe-pickle" in capsys.readouterr().err
    assert main([*args, "--allow-unsafe-pickle"]) == 0
    source = {n: w for n, w in read_lora_modules(lora).modules.items() if n.startswith("lora_unet_")}
    extracted = read_lora_modules(tmp_path / "o.safetensors").modules
    assert extracted.keys() == source.keys()
    assert max(_rel(delta(extracted[n], torch.float64), delta(w, torch.float64)) for n, w in source.items()) < 1e-5

