"""The original single-file layout of Stable Diffusion weights, written from diffusers modules.

A1111 and ComfyUI load SD1.x / SD2.x / SDXL checkpoints in the layout of the original training code
(Stability's LDM / SGM repositories). This module names every diffusers tensor in it:

    model.diffusion_model.*                       U-Net, SGM names (input_blocks / middle_block / output_blocks)
    first_stage_model.*                           VAE, LDM names (encoder.down.0.block.0 ..., mid.attn_1 as 1x1 convs)
    cond_stage_model.transformer.text_model.*     SD1.x CLIP ViT-L (Hugging Face names)
    cond_stage_model.model.*                      SD2.x OpenCLIP ViT-H (resblocks, fused in_proj q/k/v)
    conditioner.embedders.0.transformer.*         SDXL text encoder 1 (CLIP ViT-L, Hugging Face names)
    conditioner.embedders.1.model.*               SDXL text encoder 2 (OpenCLIP ViT-bigG)

It is the inverse of diffusers' single-file conversion (`diffusers.loaders.single_file_utils`), and tested
against it: a written file loads back bit-exactly through `from_single_file`. Pure name and shape work, so it
also runs on the meta device. `models.single_file` detects, loads and saves whole files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..formats.sgm import sgm_module_map

FAMILIES = ("sd1", "sd2", "sdxl")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # diffusers also reads "vae."; we write the first
# family -> component -> (layout, key prefix). "clip": Hugging Face CLIP names; "openclip": OpenCLIP's.
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.text_model.")},
    "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {
        "text_encoder": ("clip", "conditioner.embedders.0.transformer.text_model."),
        "text_encoder_2": ("openclip", "conditioner.embedders.1.model."),
    },
}


def checkpoint_state_dict(components: Mapping[str, Any], family: str) -> dict[str, torch.Tensor]:
    """diffusers components (`unet`, `vae`, `text_encoder`, [`text_encoder_2`]) -> one state dict in the
    original single-file layout. Works on the meta device (names and shapes only)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in unet_to_sgm(components["unet"]).items():
        out[UNET_PREFIX + key] = tensor
    for key, tensor in vae_to_ldm(components["vae"]).items():
        out[VAE_PREFIXES[0] + key] = tensor
    for name, (layout, prefix) in TEXT_ENCODERS[family].items():
        convert = clip_to_ldm if layout == "clip" else clip_to_openclip
        for key, tensor in convert(components[name]).items():
            out[prefix + key] = tensor
    return out


# -- U-Net: diffusers -> SGM (formats.sgm names every Linear/Conv2d; norms follow their block) --------------

_RESNET_NORMS = {"norm1": "in_layers.0", "norm2": "out_layers.0"}
_UNET_TOP_NORMS = {"conv_norm_out": "out.0"}


def unet_to_sgm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """U-Net state dict under SGM names (without `model.diffusion_model.`). Raises on any unplaced tensor."""
    modules = sgm_module_map(unet)  # Linear/Conv2d paths, diffusers -> SGM
    resnets, attentions = {}, {}  # block prefixes, diffusers -> SGM, anchored on a layer every block has
    for d, s in modules.items():
        if d.endswith(".conv1") and s.endswith(".in_layers.2"):
            resnets[d[: -len(".conv1")]] = s[: -len(".in_layers.2")]
        elif d.endswith(".proj_in"):
            attentions[d[: -len(".proj_in")]] = s[: -len(".proj_in")]
    out, unplaced = {}, []
    for name, tensor in unet.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        target = modules.get(module) or _UNET_TOP_NORMS.get(module)
        if target is None:
            block, _, rest = module.rpartition(".")
            if block in resnets and rest in _RESNET_NORMS:
                target = f"{resnets[block]}.{_RESNET_NORMS[rest]}"
            else:
                target = next((attentions[p] + module[len(p):] for p in attentions if module.startswith(p + ".")), None)
        if target is None:
            unplaced.append(name)
        else:
            out[f"{target}.{leaf}"] = tensor
    if unplaced:
        raise ValueError(f"U-Net tensors without an SGM name: {unplaced[:5]} ({len(unplaced)} in all)")
    return out


# -- VAE: diffusers -> LDM (the reverse of diffusers' convert_ldm_vae_checkpoint) ---------------------------

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict under LDM names (without `first_stage_model.`)."""
    n = len(vae.config.block_out_channels)
    out = {}
    for name, tensor in vae.state_dict().items():
        key = _vae_key(name, n)
        if key is None:
            raise ValueError(f"VAE tensor {name!r} has no LDM name")
        if ".mid.attn_1." in key and key.endswith(".weight") and not key.endswith("norm.weight"):
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM's attention projections are 1x1 convs
        out[key] = tensor
    return out


def _vae_key(name: str, n: int) -> str | None:
    shortcut = lambda leaf: leaf.replace("conv_shortcut", "nin_shortcut")  # noqa: E731
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{shortcut(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{shortcut(m[3])}"  # LDM counts up blocks bottom-up
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", name):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{shortcut(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", name):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", name):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(?:encoder|decoder)\.conv_(?:in|out)\.\w+|(?:post_)?quant_conv\.\w+", name):
        return name
    return None


# -- text encoders: Hugging Face CLIP -> LDM (same names) / OpenCLIP ----------------------------------------


def _clip_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with names relative to the text transformer (`embeddings...`, `encoder.layers...`), whether or
    not the model nests it under `text_model.` (transformers >= 5.6 flattened `CLIPTextModel`)."""
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")}


def clip_to_ldm(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIP ViT-L: Hugging Face names (the caller adds `...transformer.text_model.`)."""
    state = _clip_state(text_encoder)
    extra = [k for k in state if not k.startswith(("embeddings.", "encoder.", "final_layer_norm."))]
    if extra:
        raise ValueError(f"CLIP text encoder tensors with no place in the checkpoint layout: {extra[:5]}")
    return state


_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def clip_to_openclip(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """OpenCLIP names (the caller adds `cond_stage_model.model.` / `conditioner.embedders.1.model.`):
    q/k/v fused into `attn.in_proj_weight`/`in_proj_bias` (q, k, v stacked on dim 0), the projection stored as
    OpenCLIP's `text_projection` matrix (the transpose of the Linear weight)."""
    state = _clip_state(text_encoder)
    out, used = {}, set()
    for src, dst in _OPENCLIP_TOP.items():
        out[dst] = state[src]
        used.add(src)
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T
        used.add("text_projection.weight")
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [src + f"self_attn.{p}_proj.{leaf}" for p in "qkv"]
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat([state[k] for k in qkv], dim=0)
            used.update(qkv)
            for hf, oc in _OPENCLIP_LAYER.items():
                out[dst + f"{oc}.{leaf}"] = state[src + f"{hf}.{leaf}"]
                used.add(src + f"{hf}.{leaf}")
    leftover = sorted(set(state) - used)
    if leftover:
        raise ValueError(f"text encoder tensors with no OpenCLIP name: {leftover[:5]}")
    return out
