"""The diffusers profile (`formats.diffusers_format`): key names, alpha baking, the inverse, and THE check that a
diffusers-profile file loaded by `pipe.load_lora_weights` reproduces the trained (PEFT-injected) model's outputs.

alpha (2) != rank (4) in the exactness tests, so a file that forgot to bake alpha (scale 1 instead of 0.5)
would fail them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from sd_lora.errors import UserError
from sd_lora.formats.diffusers_format import (
    adapter_alpha,
    bake_alpha,
    diffusers_module_name,
    from_diffusers_state_dict,
    save_diffusers_lora_file,
    to_diffusers_state_dict,
)
from sd_lora.formats.kohya import tensor_data_sha256
from sd_lora.lora.inject import LoraModuleWeights, inject_lora, lora_weights
from sd_lora.lora.targets import text_encoder_target_modules, unet_target_modules
from sd_lora.models.tiny import build_tiny_sdxl_pipeline

RANK, ALPHA = 4, 2.0
TOLERANCE = 1e-4


def _w(out_features: int, in_features: int, alpha: float = ALPHA, rank: int = RANK, seed: int = 0) -> LoraModuleWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraModuleWeights(torch.randn(rank, in_features, generator=g), torch.randn(out_features, rank, generator=g), alpha)


def test_key_names_prefixes_and_no_alpha_tensors():
    components = {
        "unet": {"down_blocks.0.attentions.0.proj_in": _w(8, 6)},
        "text_encoder_1": {"encoder.layers.0.self_attn.q_proj": _w(6, 6)},  # flattened CLIPTextModel path
        "text_encoder_2": {"text_model.encoder.layers.1.mlp.fc2": _w(6, 12)},  # CLIPTextModelWithProjection
    }
    state = to_diffusers_state_dict(components)
    assert sorted(state) == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_A.weight",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_B.weight",
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight",
    ]
    assert diffusers_module_name("text_encoder", "text_projection") == "text_encoder.text_projection"
    with pytest.raises(ValueError, match="same pipeline component"):
        to_diffusers_state_dict({"text_encoder": {}, "text_encoder_1": {}})
    with pytest.raises(ValueError, match="offending keys: unet.conv_in.alpha"):
        save_diffusers_lora_file("never-written.safetensors", {**state, "unet.conv_in.alpha": torch.tensor(1.0)}, {})


def test_alpha_is_baked_into_lora_b():
    w = _w(8, 6, alpha=2.0)
    state = to_diffusers_state_dict({"unet": {"conv_in": w}})
    assert torch.equal(state["unet.conv_in.lora_A.weight"], w.down)
    assert torch.equal(state["unet.conv_in.lora_B.weight"], w.up * 0.5)  # alpha / r = 0.5 is exact in binary
    # delta W is the same: (alpha / r) up @ down == baked_up @ down
    assert torch.allclose(state["unet.conv_in.lora_B.weight"] @ w.down, (2.0 / RANK) * w.up @ w.down)
    # alpha == r: nothing is scaled, the factors are copied bit for bit
    unscaled = _w(8, 6, alpha=float(RANK))
    assert bake_alpha(unscaled) is unscaled
    state = to_diffusers_state_dict({"unet": {"conv_in": unscaled}}, dtype=torch.float16)
    assert torch.equal(state["unet.conv_in.lora_B.weight"], unscaled.up.half())


def test_inverse_resolves_by_lookup_with_alpha_equal_rank():
    components = {"unet": {"mid_block.attentions.0.proj_out": _w(8, 6)}, "text_encoder": {"encoder.layers.0.mlp.fc1": _w(12, 6)}}
    paths = {"unet": ["mid_block.attentions.0.proj_out", "conv_in"], "text_encoder": ["encoder.layers.0.mlp.fc1"]}
    state = to_diffusers_state_dict(components)
    back = from_diffusers_state_dict(state, paths)
    assert back["unet"].keys() == components["unet"].keys() and back["text_encoder"].keys() == components["text_encoder"].keys()
    w = back["unet"]["mid_block.attentions.0.proj_out"]
    assert w.alpha == RANK and torch.equal(w.up, components["unet"]["mid_block.attentions.0.proj_out"].up * 0.5)
    # PEFT's base_model.model. prefix and the flattened text-encoder spelling are read too
    peft_style = {k.replace("unet.", "unet.base_model.model.").replace("text_model.", ""): v for k, v in state.items()}
    assert from_diffusers_state_dict(peft_style, paths)["text_encoder"].keys() == {"encoder.layers.0.mlp.fc1"}
    with pytest.raises(UserError, match=r"my\.safetensors: 1 keys .*unet\.nowhere\.lora_A\.weight"):
        from_diffusers_state_dict({**state, "unet.nowhere.lora_A.weight": torch.zeros(1, 1)}, paths, source="my.safetensors")
    with pytest.raises(UserError, match="has only lora_A.weight"):
        from_diffusers_state_dict({"unet.conv_in.lora_A.weight": torch.zeros(4, 6)}, paths)


def test_alpha_from_adapter_metadata_follows_peft_rules():
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"proj_in": 2}, "text_encoder.use_rslora": True,
            "text_encoder.lora_alpha": 3}  # fmt: skip
    assert adapter_alpha(meta, "unet", "down_blocks.0.attentions.0.proj_out", 4) == 8
    assert adapter_alpha(meta, "unet", "down_blocks.0.attentions.0.proj_in", 4) == 2  # pattern matches the name's end
    assert adapter_alpha(meta, "text_encoder", "encoder.layers.0.mlp.fc1", 4) == 6  # rsLoRA: 3 / sqrt(4) == 6 / 4
    assert adapter_alpha(None, "unet", "conv_in", 4) == 4
    assert adapter_alpha({"unet.r": 4}, "unet", "conv_in", 4) == 8  # PEFT's default lora_alpha


# --- exactness against diffusers ----------------------------------------------------------------------------------


def _randomise(models, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inject_all(unet, text_encoders):
    inject_lora(unet, unet_target_modules(unet), rank=RANK, alpha=ALPHA)
    for te in text_encoders:
        inject_lora(te, text_encoder_target_modules(te), rank=RANK, alpha=ALPHA)
    _randomise([unet, *text_encoders], seed=3)


def _sd_outputs(pipe):
    g = torch.Generator().manual_seed(7)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    ids = torch.randint(0, 300, (1, 77), generator=g)
    with torch.no_grad():
        return {"unet": pipe.unet(latents, torch.tensor([321]), states).sample, "te": pipe.text_encoder(ids).last_hidden_state}


def _sdxl_outputs(pipe):
    g = torch.Generator().manual_seed(7)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 80, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    ids = torch.randint(0, 300, (1, 77), generator=g)
    with torch.no_grad():
        te2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        return {
            "unet": pipe.unet(latents, torch.tensor([321]), states, added_cond_kwargs=added).sample,
            "te1": pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
            "te2": te2.hidden_states[-2],
            "te2 pooled": te2.text_embeds,
        }


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_profile_file_reproduces_peft_outputs(family, tiny_model_dir, tmp_path):
    if family == "sd1":
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd1"))
        outputs, names = _sd_outputs, {"text_encoder": "text_encoder"}
    else:
        pipe = build_tiny_sdxl_pipeline()
        outputs, names = _sdxl_outputs, {"text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}
    trained = copy.deepcopy(pipe)  # "training" happens on a copy; `pipe` stays the untouched base
    _inject_all(trained.unet, [getattr(trained, attr) for attr in names.values()])
    reference = outputs(trained)
    components = {"unet": lora_weights(trained.unet)} | {c: lora_weights(getattr(trained, a)) for c, a in names.items()}
    save_diffusers_lora_file(tmp_path / "lora.safetensors", to_diffusers_state_dict(components), {"ss_seed": "1"})
    written = load_file(tmp_path / "lora.safetensors")
    assert not any("alpha" in k or "lora_te" in k for k in written)
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert f.metadata() == {"ss_seed": "1", "sshs_model_hash": tensor_data_sha256(written)}

    base = outputs(pipe)
    pipe.load_lora_weights(tmp_path, weight_name="lora.safetensors")
    assert lora_weights(pipe.unet, "default_0").keys() == components["unet"].keys()
    for component, attr in names.items():
        assert lora_weights(getattr(pipe, attr), "default_0").keys() == components[component].keys()
    loaded = outputs(pipe)
    diffs = {k: (loaded[k] - reference[k]).abs().max().item() for k in reference}
    print(f"{family} diffusers-profile max abs diffs: {diffs}")
    assert all(d < TOLERANCE for d in diffs.values()), diffs
    assert all((reference[k] - base[k]).abs().max() > 100 * TOLERANCE for k in reference)  # the LoRA is not a no-op
