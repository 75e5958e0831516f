"""The loader rules of `sd_lora.formats.compatibility`.

THE check: on crafted files, the diffusers verdict of `compatibility()` agrees with what `pipe.load_lora_weights`
actually does on a tiny SD1 pipeline: raises <-> "rejects"; "applies" <-> a LoRA layer at exactly those modules and
a changed output; "drops" <-> no layer there (and no change when nothing applies).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import random_lora_components
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from sd_lora.formats.compatibility import compatibility
from sd_lora.formats.diffusers_format import to_diffusers_state_dict
from sd_lora.formats.kohya import to_kohya_state_dict
from sd_lora.formats.readers import parse_lora_state_dict, read_any_lora
from sd_lora.lora.inject import LoraModuleWeights

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
Q = f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q"
ATTN0 = "lora_unet_down_blocks_0_attentions_0_"
Q_SGM = Q.replace(ATTN0, "lora_unet_input_blocks_1_1_")


@pytest.fixture(scope="module")
def pristine(tiny_model_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd1"))


@pytest.fixture(scope="module")
def clean(pristine):
    """attn-mlp LoRA on the tiny SD1's U-Net and text encoder: {component: {path: weights}} (rank 4, alpha 2)."""
    return random_lora_components(pristine, rank=4, alpha=2.0, seed=0, scale=0.1)


def _unknown(name: str) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 4)}


def _crafted(case: str, clean) -> dict[str, torch.Tensor]:
    kohya = to_kohya_state_dict(clean)
    extra = {}
    if case == "clean kohya":
        return kohya
    if case == "unknown module":
        extra = _unknown("lora_unet_no_such_layer")
    if case == "only unknown U-Net modules":
        kohya = {k: v for k, v in kohya.items() if k.startswith("lora_te_")}
        extra = _unknown("lora_unet_no_such_layer")
    if case == "only unknown text-encoder modules":
        kohya = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
        extra = _unknown("lora_te_text_model_no_such_layer")
    if case == "orphan alpha":
        kohya = {k: v for k, v in kohya.items() if not (k.startswith(Q) and "lora_" in k.split(".", 1)[1])}
    if case == "lora_mid":
        extra = {f"{Q}.lora_mid.weight": torch.zeros(4, 4, 1, 1)}
    if case == "dora_scale":
        extra = {f"{Q}.dora_scale": torch.ones(1, 32)}
    if case == "norm-layer LoRA":
        extra = {"lora_unet_down_blocks_0_attentions_0_norm.lora_down.weight": torch.zeros(4, 32),
                 "lora_unet_down_blocks_0_attentions_0_norm.lora_up.weight": torch.zeros(32, 4)}  # fmt: skip
    if case == "LoHa":
        extra = {"lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_a": torch.zeros(32, 4)}
    if case == "mixed prefixes":  # kohya keys plus one module in diffusers keys
        extra = {f"unet.{ATTN}.attn2.to_q.lora_A.weight": torch.randn(4, 32) * 0.1,
                 f"unet.{ATTN}.attn2.to_q.lora_B.weight": torch.randn(32, 4) * 0.1}  # fmt: skip
        replaced = f"lora_unet_{ATTN.replace('.', '_')}_attn2_to_q."
        kohya = {k: v for k, v in kohya.items() if not k.startswith(replaced)}
    # SGM U-Net names in an SD1 file (down_blocks.0.attentions.0 is input_blocks.1.1): the SD pipeline does not map them
    sgm = {k.replace(ATTN0, "lora_unet_input_blocks_1_1_"): v for k, v in kohya.items()}
    if case == "one SGM-named U-Net module":
        kohya = {k: v for k, v in kohya.items() if not k.startswith(Q)}
        kohya |= {k: v for k, v in sgm.items() if k.startswith(Q_SGM)}
    if case == "SGM U-Net names":
        kohya = {k: v for k, v in sgm.items() if not k.startswith("lora_unet_") or "input_blocks" in k}
    # diffusers' kohya conversion tells a text encoder's key format by its out_proj modules (old-style to_out_lora),
    # else by its mlp ones: without out_proj, q/k/v keep unconverted names; without mlp as well, it raises
    if case == "text encoder without out_proj":
        kohya = {k: v for k, v in kohya.items() if "_self_attn_out_proj." not in k}
    if case == "text encoder q and v only":
        kohya = {k: v for k, v in kohya.items() if not k.startswith("lora_te_") or "_self_attn_q_proj." in k
                 or "_self_attn_v_proj." in k}  # fmt: skip
    if case == "diffusers keys":
        return to_diffusers_state_dict(clean)
    if case == "diffusers keys without prefixes":
        return {k.split(".", 1)[1]: v for k, v in to_diffusers_state_dict(clean).items()}
    return kohya | extra


CASES = [
    "clean kohya", "unknown module", "only unknown U-Net modules", "only unknown text-encoder modules", "orphan alpha",
    "lora_mid", "dora_scale", "norm-layer LoRA", "LoHa", "mixed prefixes", "diffusers keys",
    "diffusers keys without prefixes", "one SGM-named U-Net module", "SGM U-Net names", "text encoder without out_proj",
    "text encoder q and v only",
]  # fmt: skip


def _outputs(pipe):
    g = torch.Generator().manual_seed(7)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    ids = torch.randint(0, 300, (1, 77), generator=g)
    with torch.no_grad():
        return torch.cat([pipe.unet(latents, torch.tensor([321]), states).sample.flatten(),
                          pipe.text_encoder(ids).last_hidden_state.flatten()])  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_diffusers_verdict_matches_diffusers(case, clean, pristine, tmp_path):
    save_file(_crafted(case, clean), tmp_path / "crafted.safetensors")
    lora = read_any_lora(tmp_path / "crafted.safetensors")  # as the CLI reads it: full-size SD names
    verdict = compatibility(lora)["diffusers"]

    pipe = copy.deepcopy(pristine)
    base = _outputs(pipe)
    try:
        pipe.load_lora_weights(tmp_path, weight_name="crafted.safetensors")
    except Exception as e:  # noqa: BLE001 - any exception is diffusers refusing the file
        assert verdict.rejects, f"diffusers raised {type(e).__name__}: {e}, verdict: {verdict}"
        return
    assert not verdict.rejects, f"diffusers loaded the file, verdict: {verdict.reasons}"
    wrapped = {("unet", n) for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    wrapped |= {("text_encoder", n) for n, m in pipe.text_encoder.named_modules() if isinstance(m, LoraLayer)}
    by_name = {m.name: m for m in lora.modules}
    applied = {(by_name[n].component, by_name[n].path) for n in verdict.applies}
    assert applied == wrapped
    dropped = {(by_name[n].component, by_name[n].path) for n in verdict.drops if n in by_name and by_name[n].path}
    assert not dropped & wrapped
    changed = (_outputs(pipe) - base).abs().max() > 0
    assert bool(changed) == bool(verdict.applies)


def test_a1111_and_comfyui_rules():
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    zeros = {f"{q}.lora_down.weight": torch.zeros(1, 320), f"{q}.lora_up.weight": torch.zeros(320, 1)}
    # an orphan alpha: A1111 refuses the whole file, ComfyUI ignores it
    verdicts = compatibility(parse_lora_state_dict(zeros | {"lora_unet_conv_in.alpha": torch.tensor(1.0)}))
    assert verdicts["AUTOMATIC1111"].rejects and not verdicts["ComfyUI"].rejects
    assert verdicts["ComfyUI"].applies == [q] and verdicts["ComfyUI"].drops == ["lora_unet_conv_in"]
    # norm-layer LoRA: A1111 aborts, ComfyUI logs and skips
    norm = "lora_unet_down_blocks_0_attentions_0_norm"
    verdicts = compatibility(parse_lora_state_dict(zeros | {f"{norm}.lora_down.weight": torch.zeros(1, 320),
                                                           f"{norm}.lora_up.weight": torch.zeros(320, 1)}))  # fmt: skip
    assert verdicts["AUTOMATIC1111"].rejects and verdicts["ComfyUI"].drops == [norm]
    # diffusers-format file: A1111 ignores it, ComfyUI applies everything but the U-Net attention projections
    q = LoraModuleWeights(torch.zeros(1, 320), torch.zeros(320, 1), 1.0)
    ff = LoraModuleWeights(torch.zeros(1, 1280), torch.zeros(320, 1), 1.0)
    state = to_diffusers_state_dict({"unet": {f"{ATTN}.attn1.to_q": q, f"{ATTN}.ff.net.2": ff}})
    verdicts = compatibility(parse_lora_state_dict(state))
    assert verdicts["AUTOMATIC1111"].applies == [] and len(verdicts["AUTOMATIC1111"].drops) == 2
    assert verdicts["ComfyUI"].applies == [f"unet.{ATTN}.ff.net.2"]


def test_a1111_openclip_attention_and_sdxl_naming_rules():
    def lora(names, metadata=None):
        state = {}
        for name in names:
            state |= {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1)}
        return parse_lora_state_dict(state, metadata or {})

    # SD2's OpenCLIP text encoder: q, k, v without out_proj are not applied; fc1 is
    te = "lora_te_text_model_encoder_layers_20_"
    names = [te + "self_attn_q_proj", te + "self_attn_k_proj", te + "self_attn_v_proj", te + "mlp_fc1"]
    verdict = compatibility(lora(names, {"ss_base_model_version": "sd_v2", "ss_v2": "True"}))["AUTOMATIC1111"]
    assert verdict.applies == [te + "mlp_fc1"] and len(verdict.drops) == 3
    # SDXL with diffusers-path names: A1111 misses up_blocks.0's upsampler and add_embedding; SGM names work
    names = ["lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_add_embedding_linear_1",
             "lora_unet_up_blocks_1_upsamplers_0_conv", "lora_unet_output_blocks_2_2_conv",
             "lora_te2_text_model_encoder_layers_0_mlp_fc1"]  # fmt: skip
    verdict = compatibility(lora(names))["AUTOMATIC1111"]
    assert sorted(verdict.drops) == sorted(names[:2])
    assert any("no metadata: A1111 cannot tell the family and lists it for every checkpoint" in r
               for r in verdict.reasons)  # A1111's SdVersion.Unknown
    verdict = compatibility(lora(names, {"ss_network_dim": "1"}))["AUTOMATIC1111"]
    assert any("hidden for SDXL checkpoints" in r and "lists it as SD1.x" in r for r in verdict.reasons)


@pytest.mark.parametrize("metadata, hidden", [
    ({"ss_base_model_version": "sd_v2"}, True),  # A1111's only SD2 test is ss_v2 == "True"
    ({"ss_base_model_version": "sd_v2", "ss_v2": "False"}, True),
    ({"ss_v2": "True"}, False),
    ({"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}, False),
])  # fmt: skip
def test_a1111_lists_a_file_as_sd2_only_by_ss_v2(metadata, hidden):
    te = "lora_te_text_model_encoder_layers_20_mlp_fc1"  # a 23-layer text encoder: SD2 by its keys
    state = {f"{te}.lora_down.weight": torch.zeros(1, 1), f"{te}.lora_up.weight": torch.zeros(1, 1)}
    lora = parse_lora_state_dict(state, metadata)
    assert lora.family == "sd2"
    reasons = compatibility(lora)["AUTOMATIC1111"].reasons
    assert any("hidden for SD2.x checkpoints" in r and "lists it as SD1.x" in r for r in reasons) == hidden, reasons


def test_sdxl_lora_te_names_verdicts_match_diffusers(tmp_path):
    """SDXL text encoder 1 under SD1's `lora_te_` prefix: diffusers applies it to text_encoder (checked here),
    ComfyUI maps `lora_te_text_model_encoder_layers_*` to clip_l for SDXL too; A1111 maps only `lora_te1_`."""
    from sd_lora.formats.architecture import architecture_of_pipeline
    from sd_lora.models.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    components = random_lora_components(pipe, rank=2, alpha=2.0, seed=0, unet_every=8)
    state = to_kohya_state_dict(components, sgm_paths=architecture_of_pipeline(pipe).sgm_paths)
    save_file({k.replace("lora_te1_", "lora_te_"): v for k, v in state.items()}, tmp_path / "te.safetensors")
    lora = read_any_lora(tmp_path / "te.safetensors")
    verdicts = compatibility(lora)
    te1 = sorted(m.name for m in lora.modules if m.name.startswith("lora_te_"))
    assert len(te1) == len(components["text_encoder_1"]) > 0
    assert sorted(verdicts["AUTOMATIC1111"].drops) == te1
    assert not verdicts["ComfyUI"].drops and not verdicts["diffusers"].drops and not verdicts["diffusers"].rejects

    pipe.load_lora_weights(tmp_path, weight_name="te.safetensors")
    wrapped = {n for n, m in pipe.text_encoder.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(components["text_encoder_1"])
