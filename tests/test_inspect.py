"""`python -m sd_lora.inspect`: the report and the --model check (the loader rules it prints:
tests/formats/test_compatibility.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import random_lora_components
from safetensors.torch import save_file

from sd_lora.formats.kohya import save_lora_file, to_kohya_state_dict
from sd_lora.inspect import main
from sd_lora.models.tiny import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("inspect") / "sd1", "sd1")


@pytest.fixture(scope="module")
def clean(tiny_dir):
    """attn-mlp LoRA on the tiny SD1's U-Net and text encoder: {component: {path: weights}} (rank 4, alpha 2)."""
    return random_lora_components(StableDiffusionPipeline.from_pretrained(tiny_dir), rank=4, alpha=2.0, seed=0, scale=0.1)


def _write_trained_file(path, clean):
    metadata = {
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_network_dim": "4", "ss_network_alpha": "2",
        "ss_learning_rate": "0.0001", "ss_training_started_at": "1700000000", "ss_output_name": "zkchar",
        "ss_max_token_length": "225", "ss_session_id": "1234567", "ss_num_validation_images": "3",
        "ss_tag_frequency": json.dumps({"10_zkchar": {"zkchar": 12, "red background": 3, "orange circle": 7}}),
        "ss_dataset_dirs": json.dumps({"10_zkchar": {"n_repeats": 10, "img_count": 12}}),
        "modelspec.architecture": "stable-diffusion-v1/lora",
    }  # fmt: skip
    save_lora_file(path, to_kohya_state_dict(clean), metadata)


def test_cli_report(clean, tiny_dir, tmp_path, capsys):
    _write_trained_file(tmp_path / "zkchar.safetensors", clean)
    assert main([str(tmp_path / "zkchar.safetensors"), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    for expected in ("Format: kohya", "Model family: SD1.x", "ss_base_model_version=sd_v1", "1x1-conv proj_in",
                     "Modules: 66 (66 lora)", "down_blocks.0", "up_blocks.1", "text encoder",
                     "rank 4, alpha 2 (scale 0.5) on all 66 modules", "AUTOMATIC1111: applies 66, drops 0",
                     "ComfyUI: applies 66, drops 0", "diffusers: applies 66, drops 0", "learning rate",
                     "2023-11-14 22:13:20 UTC", "matches the tensor data", "all 66 modules exist with matching shapes"):  # fmt: skip
        assert expected in out, expected
    tags = out[out.index("Tag frequency, 10_zkchar"):].splitlines()[2:5]
    assert [line.split(maxsplit=1) for line in tags] == [["12", "zkchar"], ["7", "orange circle"], ["3", "red background"]]
    assert "10_zkchar" in out[out.index("Dataset folders"):] and "Problems" not in out
    section = out[out.index("Training settings:"):].splitlines()[1:]
    settings = section[:next(i for i, line in enumerate(section) if not line.startswith("    "))]
    assert any(re.fullmatch(r" +max token length +225", line) for line in settings)  # with the other training settings, not under "Other"
    assert any(re.fullmatch(r" +session id +1234567", line) for line in settings)
    assert any(re.fullmatch(r" +validation images +3", line) for line in settings)


def test_cli_model_mismatch_and_errors(clean, tmp_path, capsys):
    _write_trained_file(tmp_path / "zkchar.safetensors", clean)
    sd2 = save_tiny_model(tmp_path / "sd2", "sd2")  # linear proj_in/out: the SD1 file's 1x1-conv factors do not fit
    assert main([str(tmp_path / "zkchar.safetensors"), "--model", str(sd2)]) == 0
    out = capsys.readouterr().out
    assert "8 of 66 modules do not fit" in out and "do not fit the linear weight" in out
    assert main([str(tmp_path / "nothing.safetensors")]) == 2
    assert "sd_lora: error:" in capsys.readouterr().err
    for tags in ["-1", "many"]:
        assert main([str(tmp_path / "zkchar.safetensors"), "--tags", tags]) == 2
        assert f"argument --tags: must be a number of tags, 0 or more (0 shows all), got {tags}" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert f"sd_lora: error: {tmp_path}: is a folder, not a LoRA file; pass the .safetensors file itself" in (
        capsys.readouterr().err
    )
    assert main([str(tmp_path / "zkchar.safetensors"), "--model", str(tmp_path)]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err
    # a single-file base model (what most people have) is named a file, with the way out
    assert main([str(tmp_path / "zkchar.safetensors"), "--model", str(tmp_path / "zkchar.safetensors")]) == 2
    assert "is a file; --model takes a diffusers model folder" in capsys.readouterr().err


def test_rank_0_and_nan_modules_are_listed_as_problems(clean, tmp_path, capsys):
    state = to_kohya_state_dict(clean)
    downs = sorted(k for k in state if k.endswith(".lora_down.weight"))
    zero, nan = downs[0].removesuffix(".lora_down.weight"), downs[1].removesuffix(".lora_down.weight")
    state[f"{zero}.lora_down.weight"] = torch.zeros(0, *state[f"{zero}.lora_down.weight"].shape[1:])
    state[f"{zero}.lora_up.weight"] = torch.zeros(state[f"{zero}.lora_up.weight"].shape[0], 0,
                                                  *state[f"{zero}.lora_up.weight"].shape[2:])
    state[f"{nan}.lora_up.weight"] = torch.full_like(state[f"{nan}.lora_up.weight"], float("nan"))
    save_lora_file(tmp_path / "broken.safetensors", state, {"ss_base_model_version": "sd_v1"})
    assert main([str(tmp_path / "broken.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"1 modules have rank 0 (empty factors: they change nothing): {zero}" in out
    assert f"1 modules hold NaN or infinite values (the training that wrote them diverged; use an earlier save): {nan}" in out
    assert "rank 4, alpha 2 (scale 0.5) on all 65 modules" in out  # the NaN module still has its rank, the empty one none


def test_dataset_folders_from_another_tool_with_null_or_odd_counts_are_shown_not_a_traceback(clean, tmp_path, capsys):
    # Other trainers write ss_dataset_dirs too; a null or a list where kohya writes a number crashed the report.
    dirs = {"5_a": {"n_repeats": None, "img_count": [3]}, "2_b": {"n_repeats": 2, "img_count": 7}, "c": "odd"}
    save_lora_file(tmp_path / "other.safetensors", to_kohya_state_dict(clean), {"ss_dataset_dirs": json.dumps(dirs)})
    assert main([str(tmp_path / "other.safetensors")]) == 0
    out = capsys.readouterr().out
    rows = out[out.index("Dataset folders:"):].splitlines()[2:5]
    assert [row.split() for row in rows] == [["2_b", "2", "7"], ["5_a", "?", "?"], ["c", "?", "?"]]


def test_regularisation_folders_are_a_table_of_their_own(clean, tmp_path, capsys):
    meta = {"ss_dataset_dirs": json.dumps({"10_zk": {"n_repeats": 10, "img_count": 6}}),
            "ss_reg_dataset_dirs": json.dumps({"1_person": {"n_repeats": 1, "img_count": 200}})}
    save_lora_file(tmp_path / "reg.safetensors", to_kohya_state_dict(clean), meta)
    assert main([str(tmp_path / "reg.safetensors")]) == 0
    out = capsys.readouterr().out
    rows = out[out.index("Regularisation folders:"):].splitlines()
    assert rows[2].split() == ["1_person", "1", "200"] and "ss_reg_dataset_dirs" not in out


def test_a_module_that_is_no_plain_lora_has_no_rank_even_beside_one_of_its_path(clean, tmp_path, capsys):
    # a lone diffusers lora_A on proj_in, which the kohya keys also hold, was counted with the kohya module's rank
    state = to_kohya_state_dict(clean)
    state["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.zeros(2, 32, 1, 1)
    save_file(state, tmp_path / "mixed.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    assert main([str(tmp_path / "mixed.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "Modules: 67 (1 incomplete, 66 lora)" in out and "rank 4, alpha 2 (scale 0.5) on all 66 modules" in out
