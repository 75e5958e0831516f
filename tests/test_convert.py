"""`python -m sd_lora.convert`: exact kohya <-> diffusers round trips for SD1, SD2 and SDXL, metadata, refusals.

Exact means bit for bit: the same keys and `torch.equal` tensors. With alpha == rank the round trip
kohya -> diffusers -> kohya returns the original file's tensors; with alpha != rank the diffusers file carries
alpha baked into lora_B (alpha / r = 0.5 here, exact in binary), so the round trip returns the alpha = r form,
which then round-trips exactly itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd_lora.convert import convert_lora, main
from sd_lora.formats.kohya import save_lora_file, tensor_data_sha256, to_kohya_state_dict
from sd_lora.formats.architecture import architecture_of_pipeline
from sd_lora.lora.inject import LoraModuleWeights
from sd_lora.lora.maths import delta
from sd_lora.lora.targets import text_encoder_target_modules, unet_target_modules
from sd_lora.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

RANK = 4


def assert_same_deltas(before: dict, after: dict) -> None:
    """Two kohya state dicts change every module's weight by the same amount (alpha folded in or not)."""
    for name in {k.split(".")[0] for k in before}:
        old = LoraModuleWeights(before[f"{name}.lora_down.weight"], before[f"{name}.lora_up.weight"], before[f"{name}.alpha"].item())
        new = LoraModuleWeights(after[f"{name}.lora_down.weight"], after[f"{name}.lora_up.weight"], after[f"{name}.alpha"].item())
        assert torch.allclose(delta(new), delta(old), rtol=1e-6, atol=1e-6), name


@pytest.fixture(scope="module")
def pipes():
    return {"sd1": build_tiny_pipeline("sd1"), "sd2": build_tiny_pipeline("sd2"), "sdxl": build_tiny_sdxl_pipeline()}


def _kohya_file(pipe, path, alpha: float, metadata=None, dtype=torch.float32):
    """A kohya file with random attn-mlp LoRA on every component of `pipe` (SDXL: SGM names)."""
    arch = architecture_of_pipeline(pipe)
    g = torch.Generator().manual_seed(0)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if arch.family == "sdxl":
        models = {"unet": pipe.unet, "text_encoder_1": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    components = {}
    for component, model in models.items():
        modules = dict(model.named_modules())
        paths = unet_target_modules(model) if component == "unet" else text_encoder_target_modules(model)
        components[component] = {}
        for p in paths:
            shape = modules[p].weight.shape
            down = torch.randn(RANK, *shape[1:], generator=g)
            up = torch.randn(shape[0], RANK, *([1, 1] if len(shape) == 4 else []), generator=g)
            components[component][p] = LoraModuleWeights(down, up, alpha)
    sgm = arch.sgm_paths if arch.family == "sdxl" else None
    save_lora_file(path, to_kohya_state_dict(components, dtype, sgm_paths=sgm), metadata or {})
    return load_file(path)


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_round_trip_is_bit_exact_with_alpha_equal_rank(family, pipes, tmp_path):
    meta = {"ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family],
            "ss_network_dim": "4", "ss_tag_frequency": '{"1_x": {"x": 1}}'}  # fmt: skip
    original = _kohya_file(pipes[family], tmp_path / "a.safetensors", alpha=float(RANK), metadata=meta)
    arch = architecture_of_pipeline(pipes[family])
    convert_lora(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "diffusers", architecture=arch)
    convert_lora(tmp_path / "b.safetensors", tmp_path / "c.safetensors", "kohya", architecture=arch)
    diffusers = load_file(tmp_path / "b.safetensors")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in diffusers)
    assert len(diffusers) == 2 * (len(original) // 3)
    _assert_identical(load_file(tmp_path / "c.safetensors"), original)  # SDXL: the same SGM names again
    # metadata survives both ways; the hash is recomputed right
    for name in ("b", "c"):
        kept = _metadata(tmp_path / f"{name}.safetensors")
        assert {k: kept[k] for k in meta} == meta
        assert kept["sshs_model_hash"] == tensor_data_sha256(load_file(tmp_path / f"{name}.safetensors"))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_baked_alpha_round_trip_gives_the_exact_alpha_equal_rank_form(family, pipes, tmp_path):
    original = _kohya_file(pipes[family], tmp_path / "a.safetensors", alpha=2.0)  # scale 0.5
    # default resolution: the full-size SD1.5 / SDXL base names (the tiny models keep their block layout)
    convert_lora(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "diffusers")
    convert_lora(tmp_path / "b.safetensors", tmp_path / "c.safetensors", "kohya")
    back = load_file(tmp_path / "c.safetensors")
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        if key.endswith(".alpha"):
            assert back[key].item() == RANK
        elif key.endswith("lora_up.weight"):
            assert torch.equal(back[key], tensor * 0.5)  # the same delta: 0.5 * up @ down
        else:
            assert torch.equal(back[key], tensor)
    # from the alpha = r form on, the round trip is exact
    convert_lora(tmp_path / "c.safetensors", tmp_path / "d.safetensors", "diffusers")
    convert_lora(tmp_path / "d.safetensors", tmp_path / "e.safetensors", "kohya")
    _assert_identical(load_file(tmp_path / "e.safetensors"), back)
    _assert_identical(load_file(tmp_path / "d.safetensors"), load_file(tmp_path / "b.safetensors"))


def test_fp16_old_diffusers_file_to_kohya_keeps_dtype_and_adds_family(tmp_path):
    attn = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    down, up = torch.randn(2, 768).half(), torch.randn(320, 2).half()
    save_file({f"unet.{attn}.processor.to_k_lora.down.weight": down, f"unet.{attn}.processor.to_k_lora.up.weight": up},
              tmp_path / "old.safetensors")  # fmt: skip
    assert main([str(tmp_path / "old.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    state = load_file(tmp_path / "k.safetensors")
    name = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert torch.equal(state[f"{name}.lora_down.weight"], down) and torch.equal(state[f"{name}.lora_up.weight"], up)
    assert state[f"{name}.alpha"].item() == 2
    assert _metadata(tmp_path / "k.safetensors")["ss_base_model_version"] == "sd_v1"  # from the 768-wide cross-attention input


def test_refusals(pipes, tmp_path, capsys):
    original = _kohya_file(pipes["sd1"], tmp_path / "a.safetensors", alpha=2.0)
    loha = dict(original) | {"lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_a": torch.zeros(2, 2)}
    save_file(loha, tmp_path / "loha.safetensors")
    assert main([str(tmp_path / "loha.safetensors"), str(tmp_path / "x.safetensors"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "sd_lora: error:" in err and "cannot convert this file exactly" in err and "loha" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--to", "kohya"]) == 2
    assert "the output would overwrite the input" in capsys.readouterr().err
    (tmp_path / "somedir").mkdir()
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "somedir"), "--to", "kohya"]) == 2
    assert f"OUT {tmp_path / 'somedir'}: is a folder; name the file to write" in capsys.readouterr().err
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "x.safetensors"), "--to", "lycoris"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    # an output that is no .safetensors file (a folder-like name, a .ckpt) is refused as resize/merge/extract refuse it
    for out, suggestion in (("newdir/", "newdir.safetensors"), ("x.ckpt", "x.safetensors")):
        assert main([str(tmp_path / "a.safetensors"), str(tmp_path / out), "--to", "diffusers"]) == 2
        err = capsys.readouterr().err
        assert f"OUT {tmp_path / out.rstrip('/')}: the converted LoRA is a .safetensors file; name it e.g. " \
               f"{tmp_path / suggestion}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "loha.safetensors", "somedir"]


def test_a_file_holding_nan_is_refused_by_name(pipes, tmp_path, capsys):
    state = dict(_kohya_file(pipes["sd1"], tmp_path / "a.safetensors", alpha=2.0))
    name = sorted(k for k in state if k.endswith(".lora_up.weight"))[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, tmp_path / "nan.safetensors")
    assert main([str(tmp_path / "nan.safetensors"), str(tmp_path / "x.safetensors"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "cannot convert this file exactly" in err and "hold NaN or infinite values" in err
    assert name.removesuffix(".lora_up.weight") in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_integer_factors_are_read_as_numbers_in_float32(pipes, tmp_path):
    """Loaders cast integer factors to the model's dtype; convert baked alpha/rank into the int8 factors and
    truncated them (3 * 0.5 -> 1)."""
    state = _kohya_file(pipes["sd1"], tmp_path / "a.safetensors", alpha=2.0)
    state = {k: (v * 3).round().to(torch.int8) if k.endswith("weight") else v for k, v in state.items()}
    save_file(state, tmp_path / "int.safetensors")
    as_float = {k: v.float() for k, v in state.items()}
    save_file(as_float, tmp_path / "float.safetensors")
    assert main([str(tmp_path / "int.safetensors"), str(tmp_path / "x.safetensors"), "--to", "diffusers"]) == 0
    assert {v.dtype for v in load_file(tmp_path / "x.safetensors").values()} == {torch.float32}
    assert main([str(tmp_path / "x.safetensors"), str(tmp_path / "back.safetensors"), "--to", "kohya"]) == 0
    assert_same_deltas(as_float, load_file(tmp_path / "back.safetensors"))


def test_to_kohya_gives_every_module_one_alpha_and_keeps_every_delta(pipes, tmp_path, capsys):
    """diffusers applies the most common alpha to every module of a kohya file, so mixed alphas must be unified."""
    original = _kohya_file(pipes["sd1"], tmp_path / "a.safetensors", alpha=float(RANK))
    mixed = {k: torch.tensor(1.0) if k.endswith("attn2_to_k.alpha") else v for k, v in original.items()}
    save_file(mixed, tmp_path / "mixed.safetensors", {"ss_network_alpha": "Dynamic"})
    assert main([str(tmp_path / "mixed.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert "alphas unified to 4" in capsys.readouterr().out
    back = load_file(tmp_path / "k.safetensors")
    assert back.keys() == mixed.keys()
    assert {v.item() for k, v in back.items() if k.endswith(".alpha")} == {RANK}
    assert _metadata(tmp_path / "k.safetensors")["ss_network_alpha"] == "4"
    assert_same_deltas(mixed, back)


@pytest.mark.parametrize("odd_alpha", [0.0, -2.0])
def test_to_kohya_with_a_most_common_alpha_of_zero_or_below_unifies_to_a_positive_one(pipes, tmp_path, capsys, odd_alpha):
    """Alpha 0 (the module changes nothing) or below (its change flipped) in most modules: the one alpha was that
    most common value, and folding the others into lora_up divided by it (a ValueError traceback)."""
    original = _kohya_file(pipes["sd1"], tmp_path / "a.safetensors", alpha=float(RANK))
    mixed = {k: torch.tensor(odd_alpha) if k.endswith(".alpha") and "attn2_to_k" not in k else v for k, v in original.items()}
    save_file(mixed, tmp_path / "mixed.safetensors")
    assert main([str(tmp_path / "mixed.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert "alphas unified to 4" in capsys.readouterr().out
    back = load_file(tmp_path / "k.safetensors")
    assert {v.item() for k, v in back.items() if k.endswith(".alpha")} == {RANK}
    assert_same_deltas(mixed, back)


def test_network_dim_and_alpha_metadata_say_what_the_written_file_holds(pipes, tmp_path, capsys):
    """A diffusers file trained with rank 4, alpha 2 (alpha baked, metadata still saying 2) converts to kohya with
    alpha = rank = 4 in every module, so ss_network_alpha must say 4 too, not the source's stale 2.0."""
    _kohya_file(pipes["sd1"], tmp_path / "a.safetensors", alpha=2.0)
    convert_lora(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "diffusers")
    trained_meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_network_module": "networks.lora"}
    save_file(load_file(tmp_path / "b.safetensors"), tmp_path / "trained.safetensors", trained_meta)
    assert main([str(tmp_path / "trained.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert {v.item() for k, v in load_file(tmp_path / "k.safetensors").items() if k.endswith(".alpha")} == {RANK}
    meta = _metadata(tmp_path / "k.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("4", "4", "networks.lora")
    assert "metadata set to what the file holds: ss_network_alpha 2.0 -> 4" in capsys.readouterr().out
    # kohya alpha 2 -> diffusers: the alpha is baked into lora_B, so the diffusers file holds alpha = rank too
    save_file(load_file(tmp_path / "a.safetensors"), tmp_path / "a2.safetensors", trained_meta)
    convert_lora(tmp_path / "a2.safetensors", tmp_path / "d.safetensors", "diffusers")
    meta = _metadata(tmp_path / "d.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4")


def test_mixed_ranks_give_dynamic_network_dim_and_the_rank_list(pipes, tmp_path):
    """Ranks varying per module: ss_network_dim "Dynamic" and `sd_lora_module_ranks`, as merge and resize write."""
    original = _kohya_file(pipes["sd1"], tmp_path / "a.safetensors", alpha=2.0)
    small = "lora_unet_down_blocks_0_attentions_0_proj_in"
    mixed = dict(original) | {f"{small}.lora_down.weight": original[f"{small}.lora_down.weight"][:2].clone(),
                              f"{small}.lora_up.weight": original[f"{small}.lora_up.weight"][:, :2].clone()}
    save_file(mixed, tmp_path / "mixed.safetensors", {"ss_network_dim": "4", "ss_network_alpha": "2"})
    convert_lora(tmp_path / "mixed.safetensors", tmp_path / "k.safetensors", "kohya")
    meta = _metadata(tmp_path / "k.safetensors")
    ranks = json.loads(meta["sd_lora_module_ranks"])
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "2")  # one alpha, two ranks
    assert len(ranks) == len(mixed) // 3 and ranks[small] == 2 and set(ranks.values()) == {2, RANK}
    # to diffusers: alpha baked, so each module holds alpha = its own rank (2 or 4)
    convert_lora(tmp_path / "mixed.safetensors", tmp_path / "d.safetensors", "diffusers")
    meta = _metadata(tmp_path / "d.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert json.loads(meta["sd_lora_module_ranks"]) == ranks


def test_ctrl_c_ends_with_one_line_and_exit_130_as_in_the_other_tools(tmp_path, monkeypatch, capsys):
    import sd_lora.convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sd_lora.convert, "convert_lora", interrupted)
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--to", "kohya"]) == 130
    assert "sd_lora: interrupted (Ctrl-C)" in capsys.readouterr().err


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_the_input_files_own_hashes_are_not_copied(pipes, tmp_path, to):
    """kohya writes sshs_legacy_hash (sd-webui-additional-networks takes it as the file's hash instead of hashing
    the file): copied, the converted file claimed the input's hash."""
    src = tmp_path / "a.safetensors"
    _kohya_file(pipes["sd1"], src, alpha=2.0, metadata={"sshs_legacy_hash": "0123abcd", "modelspec.hash_sha256": "0x" + "1" * 64,
                                                          "ss_seed": "7"})  # fmt: skip
    convert_lora(src, tmp_path / "b.safetensors", to)
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        meta = f.metadata()
    assert "sshs_legacy_hash" not in meta and "modelspec.hash_sha256" not in meta
    assert meta["ss_seed"] == "7" and meta["sshs_model_hash"] == tensor_data_sha256(load_file(tmp_path / "b.safetensors"))
