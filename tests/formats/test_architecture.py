"""`formats.architecture`: the layers LoRA names resolve against, from live models, folders and the shipped configs."""

from __future__ import annotations


import pytest

from sd_lora.errors import UserError
from sd_lora.formats.architecture import Layer, architecture_from_model_dir, architecture_of_pipeline, full_size_architecture


@pytest.mark.parametrize("family, layer, kind, shape", [
    # facts of the released models (shared/reference/model-configs.md), read off the shipped configs
    ("sd1", ("unet", "down_blocks.0.attentions.0.proj_in"), "conv", (320, 320, 1, 1)),  # 1x1 conv projection
    ("sd1", ("text_encoder", "encoder.layers.11.mlp.fc1"), "linear", (3072, 768)),  # ViT-L: 12 layers
    ("sd2", ("unet", "down_blocks.0.attentions.0.proj_in"), "linear", (320, 320)),  # linear projection
    ("sd2", ("text_encoder", "encoder.layers.22.self_attn.k_proj"), "linear", (1024, 1024)),  # ViT-H, 24th layer dropped
    ("sdxl", ("unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"), "linear", (1280, 2048)),
    ("sdxl", ("unet", "add_embedding.linear_1"), "linear", (1280, 2816)),
    ("sdxl", ("text_encoder_2", "text_model.encoder.layers.31.mlp.fc2"), "linear", (1280, 5120)),  # bigG: 32 layers
])
def test_full_size_architectures_come_from_the_shipped_configs(family, layer, kind, shape):
    arch = full_size_architecture(family)
    component, path = layer
    assert arch.family == family and arch.layers[component][path] == Layer(kind, shape)
    assert full_size_architecture(family) is arch  # built once
    # SGM names for every family: kohya writes them for SDXL, and SD1 / SD2 files sometimes use them too
    assert arch.sgm_paths["down_blocks.1.attentions.0.proj_in"] == "input_blocks.4.1.proj_in"
    assert "encoder.layers.23.mlp.fc1" not in arch.layers.get("text_encoder", {})  # SD2's 24th layer, or past ViT-L


def test_a_folder_and_its_live_pipeline_give_the_same_layers(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    folder = architecture_from_model_dir(tiny_model_dir("sd2"))
    live = architecture_of_pipeline(StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd2")))
    assert folder.family == live.family == "sd2" and folder.layers == live.layers


def test_refusals_name_the_folder_and_the_fix(tmp_path, tiny_model_dir):
    tiny_model_dir = tiny_model_dir("sd1")  # this folder's fixture builds one per family
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        full_size_architecture("sd3")
    with pytest.raises(UserError, match=f"--model {tmp_path}: not a diffusers model folder"):
        architecture_from_model_dir(tmp_path)
    broken = tmp_path / "broken"
    for name in ("model_index.json", "unet/config.json"):
        (broken / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / name).write_text((tiny_model_dir / name).read_text())
    with pytest.raises(UserError, match="has no text_encoder/config.json; it is not a Stable Diffusion model"):
        architecture_from_model_dir(broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read its configs"):
        architecture_from_model_dir(broken)
