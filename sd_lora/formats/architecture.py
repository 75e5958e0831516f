"""Architectures: every layer a LoRA name can point at, by component and diffusers module path.

LoRA files name modules in several vocabularies (kohya `lora_unet_...`, SDXL's SGM paths, diffusers/PEFT paths);
`formats.readers` resolves them BY LOOKUP against an `Architecture`: the layers of a model you pass, of a local
diffusers folder, or of the full-size SD1.5 / SD2.1 / SDXL base built on the meta device. Nothing here reads a
LoRA file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import torch
from torch import nn

from sd_lora.errors import UserError
from sd_lora.formats.diffusers_format import diffusers_name_lookup
from sd_lora.formats.kohya import kohya_module_name
from sd_lora.formats.sgm import sgm_module_map

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class Layer:
    kind: str  # "linear" | "conv" | "norm" | "embedding" | "other"
    shape: tuple[int, ...]  # the layer's weight shape


@dataclass(frozen=True, eq=False)
class Architecture:
    """The layers of a U-Net and its text encoders, by component and diffusers module path.

    Components use the kohya vocabulary: `unet` + `text_encoder` (SD1/SD2) or `unet` + `text_encoder_1` +
    `text_encoder_2` (SDXL). Text-encoder paths are as the loaded transformers model names them (a flattened
    `CLIPTextModel` has no `text_model.`), which is also what `lora.inject.lora_weights` returns.
    """

    family: str  # "sd1" | "sd2" | "sdxl"
    layers: Mapping[str, Mapping[str, Layer]]
    # U-Net diffusers path -> SGM path (formats.sgm). kohya writes SGM names for SDXL; files for SD1 / SD2 use
    # them too now and then (A1111 and ComfyUI apply them), so they are looked up for every family.
    sgm_paths: Mapping[str, str] | None = None

    @cached_property
    def kohya_names(self) -> dict[str, tuple[str, str, bool]]:
        """kohya module name -> (component, path, written with an SGM name). SDXL U-Net layers are found
        under both spellings (kohya writes SGM names; some tools write diffusers paths)."""
        lookup: dict[str, tuple[str, str, bool]] = {}
        for component, layers in self.layers.items():
            for path in layers:
                entries = [(kohya_module_name(component, path), False)]
                if component == "unet" and self.sgm_paths and path in self.sgm_paths:
                    entries.append((kohya_module_name("unet", path, sgm_paths=self.sgm_paths), True))
                for name, sgm in entries:
                    if lookup.setdefault(name, (component, path, sgm)) != (component, path, sgm):
                        raise RuntimeError(f"{lookup[name]} and {(component, path)} both have the kohya name {name}")
        return lookup

    @cached_property
    def diffusers_names(self) -> dict[str, tuple[str, str]]:
        """diffusers module name (`unet.<path>`, `text_encoder.text_model.<path>`) -> (component, path)."""
        return diffusers_name_lookup({c: list(layers) for c, layers in self.layers.items()})


def architecture_of(unet: nn.Module, text_encoders: Mapping[str, nn.Module], family: str | None = None) -> Architecture:
    """The `Architecture` of live (or meta-device) models; `text_encoders` keyed `text_encoder` (SD1/SD2) or
    `text_encoder_1` / `text_encoder_2` (SDXL). PEFT LoRA wrappers already in the models are looked through."""
    family = family or family_of_config(dict(unet.config), sdxl_text_encoders="text_encoder_2" in text_encoders)
    layers = {"unet": _layers(unet)} | {name: _layers(model) for name, model in text_encoders.items()}
    return Architecture(family, layers, _sgm_paths(unet, family))


def _sgm_paths(unet: nn.Module, family: str) -> dict[str, str] | None:
    """SGM names of the U-Net's layers. Required for SDXL (its files use them); for SD1 / SD2 a U-Net layout the
    SGM map does not know just leaves SGM-named LoRA modules unresolved (reported), as before SGM names for
    SD1 / SD2 were read at all."""
    try:
        return sgm_module_map(unet)
    except ValueError:
        if family == "sdxl":
            raise
        return None


def architecture_of_pipeline(pipe) -> Architecture:
    """`architecture_of` a diffusers SD / SDXL pipeline (its unet, text_encoder and text_encoder_2). A text
    encoder the pipeline was built without (`text_encoder=None`) has no layers: LoRA modules for it do not resolve."""
    family = family_of_config(dict(pipe.unet.config), sdxl_text_encoders=hasattr(pipe, "text_encoder_2"))
    if family == "sdxl":
        text_encoders = {"text_encoder_1": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    else:
        text_encoders = {"text_encoder": pipe.text_encoder}
    present = {name: model for name, model in text_encoders.items() if model is not None}
    return architecture_of(pipe.unet, present, family=family)


def architecture_from_model_dir(path: str | os.PathLike) -> Architecture:
    """The `Architecture` of a local diffusers model folder, built from its configs on the meta device (no
    weights are read, so this is quick even for SDXL)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(path).expanduser()
    if folder.is_file():  # most people's base models are single files
        raise UserError(f"--model {folder}: is a file; --model takes a diffusers model folder (only its configs are read). "
                        "For a standard-size SD1.x/SD2.x/SDXL single-file checkpoint drop --model: the full-size layout "
                        "of the LoRA's family is used")
    if not (folder / "model_index.json").is_file() or not (folder / "unet" / "config.json").is_file():
        raise UserError(
            f"--model {folder}: not a diffusers model folder (needs model_index.json and unet/config.json); "
            "pass the folder that holds them"
        )
    try:
        unet_config = UNet2DConditionModel.load_config(folder / "unet")
        configs = {
            sub: CLIPTextConfig.from_pretrained(folder / sub)
            for sub in ("text_encoder", "text_encoder_2")
            if (folder / sub / "config.json").is_file()
        }
    except (OSError, ValueError) as e:
        message = f"--model {folder}: cannot read its configs ({e}); the folder is incomplete or damaged"
        raise UserError(message) from None
    if "text_encoder" not in configs:
        raise UserError(f"--model {folder}: has no text_encoder/config.json; it is not a Stable Diffusion model")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        if "text_encoder_2" in configs:
            text_encoders = {
                "text_encoder_1": CLIPTextModel(configs["text_encoder"]),
                "text_encoder_2": CLIPTextModelWithProjection(configs["text_encoder_2"]),
            }
        else:
            text_encoders = {"text_encoder": CLIPTextModel(configs["text_encoder"])}
    return architecture_of(unet, text_encoders)


def family_of_config(unet_config: Mapping, *, sdxl_text_encoders: bool = False) -> str:
    """"sdxl", "sd2" or "sd1" from a U-Net config (SD2 introduced linear projections; SDXL "text_time")."""
    if sdxl_text_encoders or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = unet_config.get("cross_attention_dim")
    if cross in (768, 1024):
        return "sd1" if cross == 768 else "sd2"
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"


# Full-size base models (/work/shared/reference/model-configs.md), for name resolution without a model.
@lru_cache(maxsize=None)
def full_size_architecture(family: str) -> Architecture:
    """SD1.5, SD2.1 or SDXL base 1.0, built once on the meta device from the config skeletons sd_lora ships for
    single-file checkpoints (`sd_lora/models/skeletons/<family>/`: the same JSON configs as the released models)."""
    from sd_lora.models.single_file import SKELETONS  # data files; imported here so formats loads without models

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return architecture_from_model_dir(SKELETONS / family)


_PEFT_CHILD = re.compile(r"base_layer|lora_\w+")


def _layers(model: nn.Module) -> dict[str, Layer]:
    """Every module with a weight of its own, by path, looking through PEFT's LoRA wrappers."""
    layers = {}
    for name, module in model.named_modules():
        if not name or any(_PEFT_CHILD.fullmatch(part) for part in name.split(".")):
            continue
        layer = getattr(module, "base_layer", module)
        weight = layer._parameters.get("weight")
        if weight is not None:
            layers[name] = Layer(_kind(layer), tuple(weight.shape))
    return layers


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "conv"
    if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
        return "norm"
    return "embedding" if isinstance(layer, nn.Embedding) else "other"
