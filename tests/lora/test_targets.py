"""Target presets on the tiny SD1/SD2 U-Nets and CLIP text encoders (full-size checks: tests/formats/test_kohya.py)."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sd_lora.lora.targets import UNET_PRESETS, text_encoder_target_modules, unet_target_modules

# The tiny U-Net (sd_lora/models/tiny.py) has layers_per_block=1 and block types
# (CrossAttnDownBlock2D, DownBlock2D) / (UpBlock2D, CrossAttnUpBlock2D), so it holds 4 Transformer2DModels:
#   down_blocks.0.attentions.0                      (1 = layers_per_block)
#   mid_block.attentions.0                          (1)
#   up_blocks.1.attentions.0 and .1                 (2 = layers_per_block + 1)
# each with one transformer block. Per Transformer2DModel:
#   attn-mlp:   proj_in, proj_out + 4 (attn1) + 4 (attn2) + 2 (ff)   = 12  -> 48
#   attn:       4 (attn1: q, k, v, out) + 4 (attn2)                   =  8  -> 32
#   cross-attn: 4 (attn2)                                             =  4  -> 16
TINY_UNET_COUNTS = {"attn-mlp": 48, "attn": 32, "cross-attn": 16}
TINY_BLOCKS = {
    "down_blocks.0.attentions.0",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
}
# The tiny CLIP text encoder has 3 layers x 6 linears (q, k, v, out_proj, fc1, fc2) = 18.
TINY_TE_COUNT = 18

ATTN1 = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"}
ATTN2 = {"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}
MLP = {"ff.net.0.proj", "ff.net.2"}


def _block_and_role(path: str) -> tuple[str, str]:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> (block, 'attn1.to_q')."""
    if ".transformer_blocks.0." in path:
        block, role = path.split(".transformer_blocks.0.")
        return block, role
    block, _, role = path.rpartition(".")
    return block, role


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("preset", UNET_PRESETS)
def test_unet_preset_counts_on_tiny_unet(make_pipe, family, preset):
    targets = unet_target_modules(make_pipe(family).unet, preset)
    assert len(targets) == TINY_UNET_COUNTS[preset]
    assert len(set(targets)) == len(targets)
    assert targets == sorted(targets)
    assert {_block_and_role(p)[0] for p in targets} == TINY_BLOCKS


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_preset_roles(make_pipe, family):
    unet = make_pipe(family).unet
    roles = {preset: {_block_and_role(p)[1] for p in unet_target_modules(unet, preset)} for preset in UNET_PRESETS}
    assert roles["attn-mlp"] == {"proj_in", "proj_out"} | ATTN1 | ATTN2 | MLP
    assert roles["attn"] == ATTN1 | ATTN2
    assert roles["cross-attn"] == ATTN2


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_attn_mlp_is_every_linear_and_1x1_conv_in_transformer2d(make_pipe, family):
    """kohya's rule, evaluated independently: nothing else (no norm, no 3x3 conv) is picked up, nothing missed."""
    unet = make_pipe(family).unet
    expected = set()
    for name, module in unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            for rel, sub in module.named_modules():
                if isinstance(sub, nn.Linear) or (isinstance(sub, nn.Conv2d) and sub.kernel_size == (1, 1)):
                    expected.add(f"{name}.{rel}")
    assert set(unet_target_modules(unet, "attn-mlp")) == expected


def test_proj_in_is_conv_on_sd1_and_linear_on_sd2(make_pipe):
    for family, layer_type in (("sd1", nn.Conv2d), ("sd2", nn.Linear)):
        unet = make_pipe(family).unet
        modules = dict(unet.named_modules())
        projections = [p for p in unet_target_modules(unet) if p.endswith(("proj_in", "proj_out"))]
        assert len(projections) == 8  # 4 Transformer2DModels x (proj_in, proj_out)
        assert all(type(modules[p]) is layer_type for p in projections)


def test_unet_targets_are_deterministic(make_pipe):
    assert unet_target_modules(make_pipe("sd1").unet) == unet_target_modules(make_pipe("sd1", seed=5).unet)


def test_unknown_preset_lists_the_presets(make_pipe):
    with pytest.raises(ValueError, match="attn-mlp, attn, cross-attn"):
        unet_target_modules(make_pipe("sd1").unet, "attention")


def test_unet_targets_refuse_a_model_without_transformer_blocks():
    with pytest.raises(ValueError, match="Transformer2DModel"):
        unet_target_modules(nn.Sequential(nn.Linear(2, 2)))


def test_text_encoder_targets_flattened_clip(make_pipe):
    text_encoder = make_pipe("sd1").text_encoder
    assert not hasattr(text_encoder, "text_model")  # transformers >= 5.6 flattens CLIPTextModel
    targets = text_encoder_target_modules(text_encoder)
    assert len(targets) == TINY_TE_COUNT
    assert targets == sorted(targets)
    assert "encoder.layers.0.self_attn.q_proj" in targets
    assert {p.split(".", 3)[3] for p in targets} == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    }


def test_text_encoder_targets_nested_clip():
    """CLIPTextModelWithProjection (SDXL's second encoder) keeps the `text_model.` level."""
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=16,
    )
    targets = text_encoder_target_modules(CLIPTextModelWithProjection(config))
    assert len(targets) == 2 * 6  # 2 layers x 6 linears; text_projection is not an encoder layer
    assert all(p.startswith("text_model.encoder.layers.") for p in targets)


def test_text_encoder_targets_refuse_a_non_clip_model():
    with pytest.raises(ValueError, match="CLIP"):
        text_encoder_target_modules(nn.Sequential(nn.Linear(2, 2)))
