"""`python -m sd_lora.resize`: SVD to a rank or an energy; every module's real error within the reported one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sd_lora.formats.kohya import HASH_KEY, read_lora_file, save_lora_file, tensor_data_sha256, to_kohya_state_dict
from sd_lora.formats.modelspec import family_metadata
from sd_lora.lora.inject import LoraModuleWeights
from sd_lora.lora.maths import delta, rank_for_energy
from sd_lora.merge import read_lora_modules
from sd_lora.resize import main, resize_modules
from sd_lora.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from helpers import write_random_lora

RANK = 8
# (component, module path, out, in, conv) - shapes like a tiny SD1 model's
MODULES = [
    ("unet", "down_blocks.0.attentions.0.proj_in", 32, 32, True),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32, False),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 32, 24, False),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", 64, 32, False),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", 32, 32, False),
    ("text_encoder", "encoder.layers.0.mlp.fc1", 64, 32, False),
]


def _write_lora(path, dtype=torch.float32):
    """A rank-8 LoRA whose modules have different singular-value decays (so --energy varies the rank)."""
    g = torch.Generator().manual_seed(0)
    components: dict = {}
    for i, (component, module, out, inp, conv) in enumerate(MODULES):
        decay = torch.tensor([0.4 + 0.1 * i]) ** torch.arange(RANK)  # sigma_k ~ decay^k
        down = torch.linalg.qr(torch.randn(inp, RANK, generator=g))[0].T * decay[:, None]
        up = torch.linalg.qr(torch.randn(out, RANK, generator=g))[0]
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        components.setdefault(component, {})[module] = LoraModuleWeights(down=down, up=up, alpha=4.0)
    metadata = family_metadata(
        family="sd1", prediction_type="epsilon", resolution=(512, 512), title="src", date="2024-01-01T00:00:00"
    )
    metadata.update({"ss_network_dim": str(RANK), "ss_network_alpha": "4", "ss_tag_frequency": '{"a": {"b": 1}}'})
    save_lora_file(path, to_kohya_state_dict(components, dtype), metadata)
    return path


def _actual_errors(src, dst) -> dict[str, float]:
    before, after = read_lora_modules(src).modules, read_lora_modules(dst).modules
    assert before.keys() == after.keys()
    errors = {}
    for name in before:
        ref = delta(before[name], torch.float64)
        errors[name] = float((delta(after[name], torch.float64) - ref).norm() / ref.norm())
    return errors


def _reported(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^  (lora_\w+): (\S+)$", out, re.M)}


@pytest.mark.parametrize("rank", [2, 5])
def test_rank_resize_error_within_report(tmp_path, capsys, rank):
    src, dst = _write_lora(tmp_path / "in.safetensors"), tmp_path / "out.safetensors"
    assert main([str(src), str(dst), "--rank", str(rank), "-v"]) == 0
    out = capsys.readouterr().out
    actual, reported = _actual_errors(src, dst), _reported(out)
    assert reported.keys() == actual.keys()
    for name, err in actual.items():
        assert err <= reported[name] * (1 + 5e-3) + 1e-9, (name, err, reported[name])  # printed to 3 digits
        assert err > 1e-3  # truncation really lost something: the check has teeth
    max_line = re.search(r"relative error: max (\S+)", out)
    assert max(actual.values()) <= float(max_line.group(1)) * (1 + 5e-3)

    state, meta = read_lora_file(dst)
    assert {t.shape[0] for k, t in state.items() if k.endswith("lora_down.weight")} == {rank}
    assert meta["ss_network_dim"] == str(rank) and meta["ss_network_alpha"] == str(rank)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_tag_frequency"] == '{"a": {"b": 1}}'  # kept
    assert meta["sshs_model_hash"] == tensor_data_sha256(state)  # recomputed for the new tensors
    assert json.loads(meta["sd_lora_resize"])["rank"] == rank


def test_exact_errors_from_the_api(tmp_path):
    lora = read_lora_modules(_write_lora(tmp_path / "in.safetensors"))
    for rank in (1, 3, RANK):
        modules, errors, retained = resize_modules(lora.modules, rank, None, torch.float32)
        for name, w in modules.items():
            ref = delta(lora.modules[name], torch.float64)
            actual = float((delta(w, torch.float64) - ref).norm() / ref.norm())
            assert actual == pytest.approx(errors[name], rel=1e-6, abs=1e-9)
            if rank == RANK:
                assert errors[name] < 1e-6 and retained[name] == pytest.approx(1.0)  # full rank: ~0 error


def test_energy_gives_per_module_ranks(tmp_path, capsys):
    src, dst = _write_lora(tmp_path / "in.safetensors"), tmp_path / "out.safetensors"
    assert main([str(src), str(dst), "--energy", "0.95"]) == 0
    capsys.readouterr()
    before, after = read_lora_modules(src).modules, read_lora_modules(dst).modules
    ranks = {}
    for name, w in before.items():
        s = torch.linalg.svdvals(delta(w, torch.float64).flatten(1))
        ranks[name] = after[name].rank
        assert after[name].rank == rank_for_energy(s, 0.95)
        kept = float((s[: after[name].rank] ** 2).sum() / (s**2).sum())
        assert kept >= 0.95
    assert len(set(ranks.values())) > 1  # the modules' decays differ, so must their ranks
    _, meta = read_lora_file(dst)
    assert meta["ss_network_dim"] == "Dynamic"
    assert json.loads(meta["sd_lora_module_ranks"]) == ranks
    assert len({w.alpha for w in after.values()}) == 1  # one alpha for every module


def test_fp16_input_stays_fp16_and_rounding_is_reported(tmp_path, capsys):
    src, dst = _write_lora(tmp_path / "in.safetensors", torch.float16), tmp_path / "out.safetensors"
    assert main([str(src), str(dst), "--rank", str(RANK), "-v"]) == 0
    reported = _reported(capsys.readouterr().out)
    assert read_lora_modules(dst).dtype == torch.float16
    for name, err in _actual_errors(src, dst).items():
        assert err <= reported[name] * (1 + 5e-3) + 1e-9
        assert err < 1e-2  # only fp16 rounding


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "positive"),
        (["--rank", "-3"], "positive"),
        (["--rank", "x"], "not an integer"),
        (["--energy", "1.5"], r"\(0, 1\]"),
        (["--energy", "0"], r"\(0, 1\]"),
        ([], "--rank R"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, message):
    src = _write_lora(tmp_path / "in.safetensors")
    assert main([str(src), str(tmp_path / "out.safetensors"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd_lora: error:") and re.search(message, err) and "Traceback" not in err


def test_a_file_holding_nan_is_refused_before_the_svd(tmp_path, capsys):
    state, metadata = read_lora_file(_write_lora(tmp_path / "a.safetensors"))
    name = sorted(k for k in state if k.endswith(".lora_up.weight"))[0]
    state[name][0, 0] = float("nan")
    save_lora_file(tmp_path / "nan.safetensors", state, {k: v for k, v in metadata.items() if k != HASH_KEY})
    assert main([str(tmp_path / "nan.safetensors"), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "nan.safetensors: cannot read this file exactly" in err and "hold NaN or infinite values" in err
    assert not (tmp_path / "r.safetensors").exists()


def test_missing_input(tmp_path, capsys):
    assert main([str(tmp_path / "nope.safetensors"), str(tmp_path / "out.safetensors"), "--rank", "4"]) == 2
    assert "nope.safetensors: no such LoRA file" in capsys.readouterr().err


def test_output_that_is_the_input_or_a_folder_is_refused(tmp_path, capsys, monkeypatch):
    src = _write_lora(tmp_path / "in.safetensors")
    before = src.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for output in ["in.safetensors", "./in.safetensors", "link.safetensors"]:
        assert main(["in.safetensors", output, "--rank", "2"]) == 2
        err = capsys.readouterr().err
        assert f"OUT {Path(output)}: the output would overwrite the input in.safetensors; choose another output file" in err
    assert src.read_bytes() == before
    (tmp_path / "d.safetensors").mkdir()
    assert main(["in.safetensors", "d.safetensors", "--rank", "2"]) == 2
    assert "OUT d.safetensors: is a folder; name the file to write, e.g. d.safetensors/lora.safetensors" in (
        capsys.readouterr().err
    )


def test_sdxl_input_without_family_metadata_gives_a_resized_file_that_says_sdxl(tmp_path, capsys):
    # A1111 takes a LoRA without ss_base_model_version for SD1 and hides it on SDXL checkpoints
    src = write_random_lora(tmp_path / "a.safetensors", build_tiny_sdxl_pipeline(), rank=4, alpha=4.0, seed=1,
                            metadata={})  # fmt: skip
    assert main([str(src), str(tmp_path / "b.safetensors"), "--rank", "2"]) == 0
    assert "added metadata: ss_base_model_version=sdxl_base_v1-0, ss_v2=False" in capsys.readouterr().out
    metadata = read_lora_file(tmp_path / "b.safetensors")[1]
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sdxl_base_v1-0", "False")


def test_a_resized_diffusers_file_loses_its_peft_config_and_loads_in_diffusers(tmp_path, capsys):
    """A diffusers file's `lora_adapter_metadata` (r 4, alpha 2) used to be copied into the resized kohya file:
    diffusers raised on it ("Both `network_alphas` and `metadata` cannot be specified"), and it named the old rank."""
    from diffusers import StableDiffusionPipeline

    pipe = build_tiny_pipeline()
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    out_features, in_features = dict(pipe.unet.named_modules())[path].weight.shape
    g = torch.Generator().manual_seed(0)
    layers = {f"{path}.lora_A.weight": torch.randn(4, in_features, generator=g),
              f"{path}.lora_B.weight": torch.randn(out_features, 4, generator=g)}  # fmt: skip
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata={"r": 4, "lora_alpha": 2.0, "target_modules": [path]})  # fmt: skip
    assert main([str(tmp_path / "pytorch_lora_weights.safetensors"), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 0
    capsys.readouterr()
    metadata = read_lora_file(tmp_path / "r.safetensors")[1]
    assert "lora_adapter_metadata" not in metadata
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "2")
    pipe.load_lora_weights(str(tmp_path), weight_name="r.safetensors")  # raised before
    module = dict(pipe.unet.named_modules())[path]
    assert module.lora_A["default_0"].weight.shape == (2, in_features)


def test_the_input_files_own_hashes_are_not_copied(tmp_path, capsys):
    """kohya's sshs_legacy_hash of the input (sd-webui-additional-networks takes it as the file's hash) was copied."""
    src = write_random_lora(tmp_path / "a.safetensors", build_tiny_pipeline(), rank=4, alpha=4.0, seed=1,
                            metadata={"sshs_legacy_hash": "0123abcd", "modelspec.hash_sha256": "0x" + "1" * 64, "ss_seed": "7"})
    assert main([str(src), str(tmp_path / "b.safetensors"), "--rank", "2"]) == 0
    capsys.readouterr()
    metadata = read_lora_file(tmp_path / "b.safetensors")[1]
    assert "sshs_legacy_hash" not in metadata and "modelspec.hash_sha256" not in metadata
    assert metadata["ss_seed"] == "7"


@pytest.mark.slow
def test_a_trained_files_validation_loss_is_dropped_by_resize_and_kept_by_convert(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """A trained LoRA resized to rank 1 kept ss_validation_loss_best / ss_validation_best_step: the held-out loss of
    the trained weights, which the approximation does not have. `convert` keeps them (the same weight changes, bit
    for bit at alpha = rank) and `merge` writes none; the run's own keys (rank-free history) stay."""
    from sd_lora.train import main as train_main
    from sd_lora.convert import convert_lora
    from sd_lora.formats.architecture import architecture_from_model_dir
    from sd_lora.merge import main as merge_main

    out = tmp_path / "run"
    assert train_main(["--data", str(tiny_dataset), "--model", str(tiny_model_dir), "--output-dir", str(out),
                       "--resolution", "32", "--batch-size", "2", "--rank", "4", "--max-steps", "2", "--sample-every", "0",
                       "--validation-split", "0.3", "--validate-every", "1", "--output-name", "trained"]) == 0
    trained = read_lora_file(out / "trained.safetensors")[1]
    assert {"ss_validation_loss_best", "ss_validation_best_step", "ss_num_validation_images"} <= trained.keys()
    capsys.readouterr()

    assert main([str(out / "trained.safetensors"), str(tmp_path / "r.safetensors"), "--rank", "1"]) == 0
    resized = read_lora_file(tmp_path / "r.safetensors")[1]
    assert "ss_validation_loss_best" not in resized and "ss_validation_best_step" not in resized
    assert "dropped metadata: ss_validation_loss_best, ss_validation_best_step" in capsys.readouterr().out
    assert (resized["ss_network_dim"], resized["ss_network_alpha"]) == ("1", "1")
    for key in ("ss_num_validation_images", "ss_validation_split", "ss_steps", "ss_tag_frequency", "sd_lora_config"):
        assert resized[key] == trained[key], key  # what the run was, still true

    convert_lora(out / "trained.safetensors", tmp_path / "c.safetensors", "kohya",
                 architecture=architecture_from_model_dir(tiny_model_dir))
    converted = read_lora_file(tmp_path / "c.safetensors")[1]
    assert converted["ss_validation_loss_best"] == trained["ss_validation_loss_best"]

    assert merge_main(["--lora", f"{out / 'trained.safetensors'}:0.5", "--lora", str(tmp_path / "r.safetensors"),
                       "--output", str(tmp_path / "m.safetensors")]) == 0
    assert not {"ss_validation_loss_best", "ss_validation_best_step"} & read_lora_file(tmp_path / "m.safetensors")[1].keys()
