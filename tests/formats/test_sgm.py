"""SDXL U-Net names: the diffusers <-> SGM map (`formats.sgm`), kohya's SDXL names, and the tiny SDXL pipeline.

Full-size checks run on SDXL base built on the meta device (configs: /work/shared/reference/model-configs.md).
The map is checked three ways: against literal SGM names, against diffusers' own SGM -> diffusers conversions
(the LoRA loader's and the single-file checkpoint converter's) on every targetable layer, and numerically: a
kohya file written with SGM names, loaded by `StableDiffusionXLPipeline.load_lora_weights` into a fresh tiny
SDXL pipeline, reproduces the PEFT model's outputs.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_lora.errors import UserError
from sd_lora.formats.kohya import from_kohya_state_dict, kohya_module_name, save_lora_file, to_kohya_state_dict
from sd_lora.formats.sgm import diffusers_to_sgm, sgm_module_map, sgm_to_diffusers
from sd_lora.lora.inject import LoraModuleWeights, inject_lora, lora_weights
from sd_lora.lora.targets import text_encoder_target_modules, unet_target_modules
from sd_lora.models.tiny import TINY_SDXL_UNET_CONFIG, build_tiny_sdxl_pipeline
from sd_lora.models.tiny import main as tiny_main

SDXL_BASE_UNET = dict(  # SDXL base 1.0 (model-configs.md)
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
RANK, ALPHA = 4, 2.0
TOLERANCE = 1e-4


def _meta_unet(config: dict = SDXL_BASE_UNET) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _meta_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's TE1 (CLIP ViT-L/14, `CLIPTextModel`) and TE2 (OpenCLIP bigG/14, `CLIPTextModelWithProjection`)."""
    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)
    te1 = CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", **common,
    )  # fmt: skip
    te2 = CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280, **common,
    )  # fmt: skip
    with torch.device("meta"):
        return CLIPTextModel(te1), CLIPTextModelWithProjection(te2)


def _targetable(unet: nn.Module) -> set[str]:
    """Every Linear / Conv2d of the U-Net, outside norm layers: what a LoRA (LoCon included) can sit on."""
    return {
        name
        for name, m in unet.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(part.startswith("norm") for part in name.split("."))
    }


def _tiny_unet_config() -> dict:
    """The tiny SDXL U-Net's full diffusers config (defaults filled in), as `unet.config` holds it."""
    return dict(_meta_unet(TINY_SDXL_UNET_CONFIG).config)


# --- the map on full-size SDXL ------------------------------------------------------------------------------


def test_full_size_sdxl_names_match_golden_list(golden_dir):
    """PEFT-injected SDXL base (meta device): kohya's 722 U-Net + 72 TE1 + 192 TE2 names, as committed."""
    unet = _meta_unet()
    te1, te2 = _meta_text_encoders()
    inject_lora(unet, unet_target_modules(unet), rank=RANK, alpha=ALPHA)
    inject_lora(te1, text_encoder_target_modules(te1), rank=RANK, alpha=ALPHA)
    inject_lora(te2, text_encoder_target_modules(te2), rank=RANK, alpha=ALPHA)
    sgm_paths = sgm_module_map(unet)  # looks through PEFT's wrappers
    unet_w, te1_w, te2_w = lora_weights(unet), lora_weights(te1), lora_weights(te2)
    # 11 Transformer2DModels x (proj_in + proj_out) + 70 transformer blocks x 10 linears = 722
    assert (len(unet_w), len(te1_w), len(te2_w)) == (722, 72, 192)

    # (meta tensors cannot be copied into a state dict; the names are what to_kohya_state_dict writes)
    names = sorted(
        [kohya_module_name("unet", p, sgm_paths=sgm_paths) for p in unet_w]
        + [kohya_module_name("text_encoder_1", p) for p in te1_w]
        + [kohya_module_name("text_encoder_2", p) for p in te2_w]
    )
    assert len(set(names)) == 722 + 72 + 192
    assert names == (golden_dir / "sdxl_attn_mlp.txt").read_text().split()
    assert sum(n.startswith("lora_unet_") for n in names) == 722
    assert not any(block in n for n in names for block in ("down_blocks", "mid_block", "up_blocks"))
    for literal in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
        "lora_unet_output_blocks_0_1_proj_in",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2",  # the key SwarmUI detects SDXL LoRA by
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",  # flattened CLIPTextModel: text_model. re-inserted
        "lora_te1_text_model_encoder_layers_11_mlp_fc2",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    ):
        assert literal in names, literal
    # no attention in SDXL's first level, nor in output blocks 6-8
    assert not any(n.startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_6_")) for n in names)
    assert sgm_paths["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    )
    assert tuple(unet_w["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].down.shape) == (RANK, 2048)


# Literal pairs from the SGM U-Net (sgm.modules.diffusionmodules.openaimodel) as found in SDXL base checkpoints.
SDXL_LITERALS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.attentions.0.proj_in": "input_blocks.4.1.proj_in",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
    "mid_block.resnets.0.conv2": "middle_block.0.out_layers.3",
    "mid_block.attentions.0.transformer_blocks.9.attn2.to_v": "middle_block.1.transformer_blocks.9.attn2.to_v",
    "mid_block.resnets.1.conv1": "middle_block.2.in_layers.2",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks.0.0.skip_connection",
    "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
    "conv_out": "out.2",
}


def test_every_targetable_module_maps_both_ways():
    unet = _meta_unet()
    sgm_paths = sgm_module_map(unet)
    assert set(sgm_paths) == _targetable(unet)
    assert len(sgm_paths) == 794  # 722 attn-mlp + 68 ResNet/sampler convs and linears + 4 embedding + conv_in/out
    assert len(set(sgm_paths.values())) == len(sgm_paths)
    assert len({kohya_module_name("unet", p, sgm_paths=sgm_paths) for p in sgm_paths}) == len(sgm_paths)
    for path, sgm in sgm_paths.items():
        assert diffusers_to_sgm(path, unet.config) == sgm
        assert sgm_to_diffusers(sgm, unet.config) == path
    for path, sgm in SDXL_LITERALS.items():
        assert sgm_paths[path] == sgm, path


@pytest.mark.parametrize("model", ["sdxl-base", "tiny-sdxl"])
def test_diffusers_lora_loader_maps_sgm_names_back(model):
    """Every SGM-named kohya key, fed to diffusers' SDXL LoRA conversion, lands on our diffusers path.

    Names only: dummy tensors, no weights. This is `load_lora_weights`' own path: `lora_state_dict` (SGM block
    renumbering from the U-Net config, then kohya -> diffusers names) and the PEFT renaming of `load_lora_adapter`.
    """
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = _meta_unet(SDXL_BASE_UNET if model == "sdxl-base" else _tiny_unet_config())
    sgm_paths = sgm_module_map(unet)
    state = {}
    for path in sgm_paths:
        name = kohya_module_name("unet", path, sgm_paths=sgm_paths)
        state |= {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1)}
        state[f"{name}.alpha"] = torch.tensor(1.0)
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    unet_keys = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    assert len(unet_keys) == len(converted) == 2 * len(sgm_paths)
    peft_keys = convert_unet_state_dict_to_peft(unet_keys)
    assert {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")} == set(sgm_paths)
    assert {k.removesuffix(".lora_B.weight") for k in peft_keys if k.endswith(".lora_B.weight")} == set(sgm_paths)
    assert len(alphas) == len(sgm_paths)


@pytest.mark.parametrize("model", ["sdxl-base", "tiny-sdxl"])
def test_diffusers_single_file_converter_agrees(model):
    """diffusers' LDM checkpoint converter (what `from_single_file` uses for SDXL .safetensors checkpoints)
    maps `model.diffusion_model.<sgm path>.weight/.bias` of every targetable layer to our diffusers path."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _meta_unet(SDXL_BASE_UNET if model == "sdxl-base" else _tiny_unet_config())
    modules = dict(unet.named_modules())
    checkpoint, expected = {}, set()
    for path, sgm in sgm_module_map(unet).items():
        params = ["weight"] + (["bias"] if modules[path].bias is not None else [])
        for param in params:
            checkpoint[f"model.diffusion_model.{sgm}.{param}"] = torch.zeros(1)
            expected.add(f"{path}.{param}")
    assert set(convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))) == expected


def test_tiny_sdxl_map_follows_its_config():
    """Derived from the config, not the full-size numbers: 2 levels, layers_per_block 2, depth (1, 2)."""
    config = _tiny_unet_config()
    assert diffusers_to_sgm("down_blocks.0.downsamplers.0.conv", config) == "input_blocks.3.0.op"
    assert diffusers_to_sgm("down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q", config) == (
        "input_blocks.5.1.transformer_blocks.1.attn1.to_q"
    )
    assert diffusers_to_sgm("mid_block.attentions.0.transformer_blocks.1.ff.net.2", config) == (
        "middle_block.1.transformer_blocks.1.ff.net.2"
    )
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", config) == "output_blocks.2.2.conv"
    assert diffusers_to_sgm("up_blocks.1.resnets.2.conv_shortcut", config) == "output_blocks.5.0.skip_connection"
    # per-block layers_per_block: SGM indices are cumulative; an upsampler after a block without attention is .1
    uneven = {**config, "layers_per_block": (1, 3), "up_block_types": ("UpBlock2D", "UpBlock2D")}
    assert diffusers_to_sgm("down_blocks.0.downsamplers.0.conv", uneven) == "input_blocks.2.0.op"
    assert diffusers_to_sgm("down_blocks.1.attentions.2.proj_in", uneven) == "input_blocks.5.1.proj_in"
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", uneven) == "output_blocks.3.1.conv"
    assert sgm_to_diffusers("output_blocks.4.0.in_layers.2", uneven) == "up_blocks.1.resnets.0.conv1"


@pytest.mark.parametrize(
    "path, why",
    [
        ("down_blocks.0.attentions.0.proj_in", "DownBlock2D has no attention"),
        ("down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q", "depth 2 at this level"),
        ("down_blocks.1.downsamplers.0.conv", "the last down block does not downsample"),
        ("up_blocks.1.upsamplers.0.conv", "the last up block does not upsample"),
        ("up_blocks.0.resnets.3.conv1", "layers_per_block + 1 resnets"),
        ("down_blocks.0.resnets.0.norm1", "norms are never LoRA targets"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.norm1", "norms are never LoRA targets"),
        ("conv_norm_out", "norms are never LoRA targets"),
        ("down_blocks.1.attentions.0", "a block, not a layer"),
        ("text_model.encoder.layers.0.mlp.fc1", "not a U-Net path"),
    ],
)
def test_unknown_diffusers_paths_raise(path, why):
    with pytest.raises(ValueError, match="not a LoRA-targetable module path"):
        diffusers_to_sgm(path, _tiny_unet_config())


@pytest.mark.parametrize(
    "path", ["input_blocks.6.0.op", "input_blocks.1.1.proj_in", "output_blocks.5.2.conv", "middle_block.3.in_layers.2",
             "out.0", "input_blocks.1.0.in_layers.0", "label_emb.0.1", "down_blocks.0.resnets.0.conv1"],
)  # fmt: skip
def test_unknown_sgm_paths_raise(path):
    with pytest.raises(ValueError, match="not a LoRA-targetable module path"):
        sgm_to_diffusers(path, _tiny_unet_config())


def test_unsupported_configs_are_refused():
    config = _tiny_unet_config()
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        diffusers_to_sgm("conv_in", {**config, "down_block_types": ("DownBlock2D", "SimpleCrossAttnDownBlock2D")})
    with pytest.raises(ValueError, match="down_block_types"):
        diffusers_to_sgm("conv_in", {"up_block_types": ("UpBlock2D",)})
    # add_embedding only exists with SDXL's "text_time" conditioning
    with pytest.raises(ValueError, match="not a LoRA-targetable"):
        diffusers_to_sgm("add_embedding.linear_1", {**config, "addition_embed_type": None})


# --- kohya naming with SGM paths ----------------------------------------------------------------------------


def test_kohya_round_trip_with_sgm_names():
    unet = _meta_unet(_tiny_unet_config())
    sgm_paths = sgm_module_map(unet)
    weights = {p: LoraModuleWeights(torch.randn(2, 3), torch.randn(5, 2), 1.5) for p in sorted(sgm_paths)[:20]}
    state = to_kohya_state_dict({"unet": weights}, sgm_paths=sgm_paths)
    assert not any(block in key for key in state for block in ("down_blocks", "mid_block", "up_blocks"))
    back = from_kohya_state_dict(state, {"unet": list(sgm_paths)}, sgm_paths=sgm_paths)["unet"]
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[p].down, w.down) and back[p].alpha == w.alpha for p, w in weights.items())
    # an SGM-named file read without the map (as SD1/SD2) is refused by name, not misread
    with pytest.raises(UserError, match="lora_unet_"):
        from_kohya_state_dict(state, {"unet": list(sgm_paths)})
    with pytest.raises(ValueError, match="no entry in sgm_paths"):
        to_kohya_state_dict({"unet": {"not.a.unet.path": next(iter(weights.values()))}}, sgm_paths=sgm_paths)


# --- tiny SDXL pipeline -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    """A saved tiny SDXL diffusers folder, written through the module's CLI (`--family sdxl`)."""
    directory = tmp_path_factory.mktemp("tiny_sdxl") / "model"
    tiny_main([str(directory), "--family", "sdxl"])
    return directory


def test_tiny_sdxl_pipeline_saves_reloads_and_samples(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.unet.config.addition_embed_type == "text_time"
    fresh = build_tiny_sdxl_pipeline()  # the same seed gives the same weights as the saved folder
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), fresh.unet.state_dict().values()))

    generator = torch.Generator().manual_seed(0)
    images = pipe(
        "a red circle", num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt"
    ).images
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()


@pytest.fixture
def sdxl_inputs():
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 8, 8, generator=g)  # (B, 4, H/2, W/2) for the 2-level tiny VAE
    states = torch.randn(1, 8, 80, generator=g)  # (B, tokens, TE1 32 + TE2 48)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    ids = torch.randint(0, 300, (1, 77), generator=g)
    return latents, torch.tensor([321]), states, added, ids


def _sdxl_outputs(unet, te1, te2, inputs) -> dict[str, torch.Tensor]:
    latents, t, states, added, ids = inputs
    with torch.no_grad():
        te2_out = te2(ids, output_hidden_states=True)
        return {
            "unet": unet(latents, t, states, added_cond_kwargs=added).sample,
            "te1": te1(ids, output_hidden_states=True).hidden_states[-2],  # what SDXL conditions on
            "te2": te2_out.hidden_states[-2],
            "te2 pooled": te2_out.text_embeds,
        }


def _merge_by_hand(model: nn.Module, weights: dict[str, LoraModuleWeights]) -> None:
    """W += (alpha / r) * up @ down for every module in `weights` (diffusers paths); no PEFT involved."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, w in weights.items():
            weight = modules[path].weight
            weight += (w.alpha / w.rank * (w.up.flatten(1) @ w.down.flatten(1))).reshape(weight.shape)


@pytest.mark.parametrize("unet_targets", ["attn-mlp", "every-layer"])
def test_sgm_named_file_reproduces_trained_outputs(unet_targets, tiny_sdxl_dir, tmp_path, random_lora, sdxl_inputs):
    """THE SDXL exactness test. `every-layer` (LoCon on every Linear / Conv2d: 3x3 convs, samplers, conv_in/out,
    time and text-time embeddings) exercises every entry of the SGM map through diffusers' loader."""
    trained = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    sgm_paths = sgm_module_map(trained.unet)
    targets = unet_target_modules(trained.unet) if unet_targets == "attn-mlp" else sorted(sgm_paths)
    inject_lora(trained.unet, targets, rank=RANK, alpha=ALPHA)
    inject_lora(trained.text_encoder, text_encoder_target_modules(trained.text_encoder), rank=RANK, alpha=ALPHA)
    inject_lora(trained.text_encoder_2, text_encoder_target_modules(trained.text_encoder_2), rank=RANK, alpha=ALPHA)
    for seed, model in enumerate((trained.unet, trained.text_encoder, trained.text_encoder_2), start=1):
        random_lora(model, seed=seed)
    reference = _sdxl_outputs(trained.unet, trained.text_encoder, trained.text_encoder_2, sdxl_inputs)

    components = {
        "unet": lora_weights(trained.unet),
        "text_encoder_1": lora_weights(trained.text_encoder),
        "text_encoder_2": lora_weights(trained.text_encoder_2),
    }
    state = to_kohya_state_dict(components, sgm_paths=sgm_paths)
    save_lora_file(tmp_path / "sdxl.safetensors", state, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert {k.split("_")[1] for k in state} == {"unet", "te1", "te2"}
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in state)

    # 1. diffusers loads the SGM-named file into a fresh copy of the base pipeline.
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = _sdxl_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, sdxl_inputs)
    pipe.load_lora_weights(tmp_path, weight_name="sdxl.safetensors")
    assert lora_weights(pipe.unet, "default_0").keys() == components["unet"].keys()
    assert lora_weights(pipe.text_encoder, "default_0").keys() == components["text_encoder_1"].keys()
    assert lora_weights(pipe.text_encoder_2, "default_0").keys() == components["text_encoder_2"].keys()
    loaded = _sdxl_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, sdxl_inputs)

    # 2. our reader maps the SGM names back; merge W + (alpha/r) * up @ down into fresh base weights.
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    candidates = {
        "unet": list(sgm_module_map(fresh.unet)),
        "text_encoder_1": text_encoder_target_modules(fresh.text_encoder),
        "text_encoder_2": text_encoder_target_modules(fresh.text_encoder_2),
    }
    read = from_kohya_state_dict(load_file(tmp_path / "sdxl.safetensors"), candidates, sgm_paths=sgm_paths)
    assert {c: set(w) for c, w in read.items()} == {c: set(w) for c, w in components.items()}
    _merge_by_hand(fresh.unet, read["unet"])
    _merge_by_hand(fresh.text_encoder, read["text_encoder_1"])
    _merge_by_hand(fresh.text_encoder_2, read["text_encoder_2"])
    merged = _sdxl_outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2, sdxl_inputs)

    diffs = {f"{k} diffusers": (loaded[k] - reference[k]).abs().max().item() for k in reference}
    diffs |= {f"{k} merged": (merged[k] - reference[k]).abs().max().item() for k in reference}
    print(f"sdxl {unet_targets} max abs diffs: {diffs}")  # shown with -s
    assert all(d < TOLERANCE for d in diffs.values()), diffs
    # ... and the LoRA is not a no-op, so the comparison above has teeth.
    assert all((reference[k] - base[k]).abs().max() > 100 * TOLERANCE for k in reference)
