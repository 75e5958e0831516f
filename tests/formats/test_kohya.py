"""The kohya file format: names (golden lists on full-size models), tensors, round trip, hash, errors."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from sd_lora.errors import UserError
from sd_lora.formats.kohya import (
    from_kohya_state_dict,
    kohya_module_name,
    read_lora_file,
    save_lora_file,
    tensor_data_sha256,
    to_kohya_state_dict,
)
from sd_lora.lora.inject import LoraModuleWeights, inject_lora, load_lora_weights_into, lora_weights
from sd_lora.lora.targets import text_encoder_target_modules, unet_target_modules

PREFIXES = ("lora_unet_", "lora_te_")
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


# --- names -------------------------------------------------------------------------------------------------


def test_kohya_module_name():
    assert (
        kohya_module_name("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    )
    # flattened CLIPTextModel (transformers >= 5.6): `text_model.` is re-inserted
    assert (
        kohya_module_name("text_encoder", "encoder.layers.0.self_attn.q_proj")
        == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    # nested (older transformers, CLIPTextModelWithProjection): unchanged
    assert (
        kohya_module_name("text_encoder", "text_model.encoder.layers.11.mlp.fc2")
        == "lora_te_text_model_encoder_layers_11_mlp_fc2"
    )
    te1_name = kohya_module_name("text_encoder_1", "encoder.layers.0.mlp.fc1")
    assert te1_name == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert (
        kohya_module_name("text_encoder_2", "text_model.encoder.layers.31.self_attn.out_proj")
        == "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"
    )
    with pytest.raises(ValueError, match="unknown component"):
        kohya_module_name("vae", "encoder.conv_in")


@pytest.mark.parametrize(
    "family, golden, te_layers, proj_down_shape",
    [("sd1", "sd15_attn_mlp.txt", 12, (4, 320, 1, 1)), ("sd2", "sd21_attn_mlp.txt", 23, (4, 320))],
)
def test_full_size_names_match_golden_list(full_size_models, golden_dir, family, golden, te_layers, proj_down_shape):
    """PEFT-injected full-size SD1.5 / SD2.1 (meta device, no weights): kohya names equal the committed list."""
    unet, text_encoder = full_size_models(family)
    unet_targets = unet_target_modules(unet)
    # kohya's rule, evaluated independently: every Linear / 1x1 Conv2d inside a Transformer2DModel.
    every_layer = {
        f"{name}.{rel}"
        for name, block in unet.named_modules()
        if type(block).__name__ == "Transformer2DModel"
        for rel, layer in block.named_modules()
        if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))
    }
    assert set(unet_targets) == every_layer
    inject_lora(unet, unet_targets, rank=4, alpha=1)
    inject_lora(text_encoder, text_encoder_target_modules(text_encoder), rank=4, alpha=1)
    unet_weights, te_weights = lora_weights(unet), lora_weights(text_encoder)

    # 16 Transformer2DModels (down 3x2, mid 1, up 3x3) x 12 = 192; text encoder 6 linears per layer.
    assert len(unet_weights) == 192
    assert len(te_weights) == 6 * te_layers
    names = sorted(
        [kohya_module_name("unet", p) for p in unet_weights]
        + [kohya_module_name("text_encoder", p) for p in te_weights]
    )
    assert names == (golden_dir / golden).read_text().split()
    for literal in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        f"lora_te_text_model_encoder_layers_{te_layers - 1}_mlp_fc2",
    ):
        assert literal in names

    proj_in = unet_weights["down_blocks.0.attentions.0.proj_in"]  # SD1: 1x1 Conv2d -> 4-D; SD2: Linear -> 2-D
    assert tuple(proj_in.down.shape) == proj_down_shape
    assert tuple(proj_in.up.shape) == (320, 4) + proj_down_shape[2:]
    attn2_k = unet_weights["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert tuple(attn2_k.down.shape) == (4, 1024 if family == "sd2" else 768)


# --- state dict --------------------------------------------------------------------------------------------


@pytest.fixture(params=["sd1", "sd2"])
def trained(request, tiny_model_dir, random_lora):
    """(family, pipeline) with attn-mlp LoRA (rank 4, alpha 2) on U-Net and text encoder, weights randomised."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir(request.param))
    inject_lora(pipe.unet, unet_target_modules(pipe.unet), rank=4, alpha=2)
    inject_lora(pipe.text_encoder, text_encoder_target_modules(pipe.text_encoder), rank=4, alpha=2)
    random_lora(pipe.unet, seed=1)
    random_lora(pipe.text_encoder, seed=2)
    return request.param, pipe


def _components(pipe):
    return {"unet": lora_weights(pipe.unet), "text_encoder": lora_weights(pipe.text_encoder)}


def _module_paths(pipe):
    return {"unet": list(lora_weights(pipe.unet)), "text_encoder": list(lora_weights(pipe.text_encoder))}


def test_state_dict_layout(trained):
    family, pipe = trained
    state = to_kohya_state_dict(_components(pipe))
    assert len(state) == 3 * (48 + 18)  # exactly three tensors per module
    modules: dict[str, set[str]] = {}
    for key, tensor in state.items():
        assert key.startswith(PREFIXES), key
        name, suffix = key.split(".", 1)
        modules.setdefault(name, set()).add(suffix)
        assert tensor.is_contiguous() and tensor.device.type == "cpu"
    assert all(s == {"lora_down.weight", "lora_up.weight", "alpha"} for s in modules.values())
    assert {state[k].item() for k in state if k.endswith(".alpha")} == {2.0}  # one alpha for all modules
    assert all(state[k].ndim == 0 for k in state if k.endswith(".alpha"))
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    expected_ndim = 4 if family == "sd1" else 2
    assert state[f"{proj}.lora_down.weight"].ndim == state[f"{proj}.lora_up.weight"].ndim == expected_ndim


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_in_half_precision(trained, tmp_path, dtype):
    _, pipe = trained
    components = _components(pipe)
    path = save_lora_file(tmp_path / "half.safetensors", to_kohya_state_dict(components, dtype=dtype), {})
    state, _ = read_lora_file(path)
    weights = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    alphas = {k: v for k, v in state.items() if k.endswith(".alpha")}
    assert {v.dtype for v in weights.values()} == {dtype}
    # alpha: 0-d and float32 whatever the weights' dtype, so an alpha like 0.3 is not rounded
    assert {(v.dtype, v.ndim) for v in alphas.values()} == {(torch.float32, 0)}
    back = from_kohya_state_dict(state, _module_paths(pipe))
    for path_, w in components["unet"].items():
        assert torch.equal(back["unet"][path_].down, w.down.to(dtype))


def test_rank_mismatch_is_refused():
    bad = {"unet": {"a.b": LoraModuleWeights(down=torch.zeros(4, 8), up=torch.zeros(8, 2), alpha=1.0)}}
    with pytest.raises(ValueError, match="same rank"):
        to_kohya_state_dict(bad)


def test_names_that_collapse_onto_one_kohya_name_are_refused():
    w = LoraModuleWeights(down=torch.zeros(2, 3), up=torch.zeros(3, 2), alpha=1.0)
    with pytest.raises(ValueError, match="both map"):
        to_kohya_state_dict({"unet": {"a_b.c": w, "a.b_c": w}})


# --- round trip and file -----------------------------------------------------------------------------------


def test_round_trip_through_file(trained, tmp_path):
    _, pipe = trained
    components = _components(pipe)
    path = save_lora_file(tmp_path / "lora.safetensors", to_kohya_state_dict(components), {"ss_network_dim": "4"})
    state, metadata = read_lora_file(path)
    back = from_kohya_state_dict(state, _module_paths(pipe), source=str(path))

    assert back.keys() == components.keys()
    for component, weights in components.items():
        assert back[component].keys() == weights.keys()
        for module_path, w in weights.items():
            got = back[component][module_path]
            assert torch.equal(got.down, w.down) and torch.equal(got.up, w.up) and got.alpha == w.alpha

    # sshs_model_hash = sha256 of the tensor-data bytes of the file on disk (after length + JSON header)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert metadata == header["__metadata__"]
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len :]).hexdigest()
    assert metadata["sshs_model_hash"] == tensor_data_sha256(state)
    assert set(metadata) == {"ss_network_dim", "sshs_model_hash"}  # nothing else added
    assert all(key.startswith(PREFIXES) and key.endswith(SUFFIXES) for key in state)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_missing_alpha_means_alpha_equals_rank(trained):
    _, pipe = trained
    state = {k: v for k, v in to_kohya_state_dict(_components(pipe)).items() if not k.endswith(".alpha")}
    back = from_kohya_state_dict(state, _module_paths(pipe))
    assert {w.alpha for c in back.values() for w in c.values()} == {4.0}


def test_unknown_keys_are_named(trained):
    _, pipe = trained
    state = to_kohya_state_dict(_components(pipe))
    state["lora_unet_conv_in.lora_down.weight"] = torch.zeros(4, 4, 3, 3)
    state["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"] = torch.zeros(1, 32)
    with pytest.raises(UserError, match="my.safetensors: 2 keys") as info:
        from_kohya_state_dict(state, _module_paths(pipe), source="my.safetensors")
    assert "lora_unet_conv_in.lora_down.weight" in str(info.value) and "dora_scale" in str(info.value)


def test_alpha_without_weights_is_refused(trained):
    _, pipe = trained
    state = to_kohya_state_dict(_components(pipe))
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    del state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
    with pytest.raises(UserError, match=name):
        from_kohya_state_dict(state, _module_paths(pipe))


def test_save_refuses_bad_metadata_and_stray_keys(tmp_path):
    w = {"unet": {"proj_in": LoraModuleWeights(torch.ones(2, 3), torch.ones(3, 2), 1.0)}}
    state = to_kohya_state_dict(w)
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_lora_file(tmp_path / "a.safetensors", state, {"ss_network_dim": 4})
    with pytest.raises(ValueError, match="sshs_model_hash"):
        save_lora_file(tmp_path / "a.safetensors", state, {"sshs_model_hash": "x"})
    with pytest.raises(ValueError, match="scale"):
        save_lora_file(tmp_path / "a.safetensors", {**state, "lora_unet_proj_in.scale": torch.ones(())}, {})
    with pytest.raises(ValueError, match="lora_unet_proj_in"):
        save_lora_file(tmp_path / "a.safetensors", {"lora_unet_proj_in.alpha": torch.ones(())}, {})
    assert not list(tmp_path.iterdir())


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no such LoRA file"):
        read_lora_file(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"PK\x03\x04 definitely a zip file, not safetensors")
    with pytest.raises(UserError, match="garbage.safetensors: not a readable"):
        read_lora_file(garbage)
    good = save_lora_file(
        tmp_path / "good.safetensors",
        to_kohya_state_dict({"unet": {"proj_in": LoraModuleWeights(torch.ones(2, 3), torch.ones(3, 2), 1.0)}}),
        {},
    )
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated.safetensors: not a readable"):
        read_lora_file(truncated)


def test_resume_from_file_into_an_injected_model(tiny_model_dir, tmp_path, random_lora):
    """File -> from_kohya_state_dict -> load_lora_weights_into, with an fp16 file and an alpha float32 can't hold."""
    trained = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd2")).unet
    inject_lora(trained, unet_target_modules(trained), rank=4, alpha=0.3)
    random_lora(trained)
    expected = lora_weights(trained)
    path = save_lora_file(tmp_path / "a.safetensors", to_kohya_state_dict({"unet": expected}, torch.float16), {})

    fresh = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd2")).unet
    inject_lora(fresh, unet_target_modules(fresh), rank=4, alpha=0.3)
    state, _ = read_lora_file(path)
    weights = from_kohya_state_dict(state, {"unet": list(lora_weights(fresh))}, source=str(path))["unet"]
    load_lora_weights_into(fresh, weights, source=str(path))  # float32(0.3) != 0.3 must not be refused
    for module_path, w in lora_weights(fresh).items():
        assert torch.equal(w.up, expected[module_path].up.half().float())
        assert torch.equal(w.down, expected[module_path].down.half().float())
