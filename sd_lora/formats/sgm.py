"""SDXL U-Net module paths: diffusers names <-> Stability's original SGM/LDM names.

kohya sd-scripts trains SDXL on a U-Net that keeps the original checkpoint's module names, so SDXL LoRA files
name U-Net modules the SGM way (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and A1111 needs
these names for modules outside the attention blocks. This module is the dictionary between the two
vocabularies; `formats.kohya` does the rest of the naming (prefix, `.` -> `_`). Pure functions of the U-Net
config (`unet.config` or a plain dict with the same keys), so they work for the full-size SDXL U-Net, a tiny
one, or one built on the meta device alike.

How the SGM U-Net (`sgm.modules.diffusionmodules.openaimodel.UNetModel`) lays out what diffusers splits into
down/mid/up blocks (lpb = `layers_per_block`):

    conv_in                                   input_blocks.0.0
    down_blocks.b.resnets.j                   input_blocks.{1 + b*(lpb+1) + j}.0
    down_blocks.b.attentions.j                input_blocks.{1 + b*(lpb+1) + j}.1
    down_blocks.b.downsamplers.0.conv         input_blocks.{1 + b*(lpb+1) + lpb}.0.op    (not after the last block)
    mid_block.resnets.0 / attentions.0 / resnets.1    middle_block.0 / .1 / .2
    up_blocks.b.resnets.j                     output_blocks.{b*(lpb+1) + j}.0            (j < lpb + 1)
    up_blocks.b.attentions.j                  output_blocks.{b*(lpb+1) + j}.1
    up_blocks.b.upsamplers.0.conv             output_blocks.{b*(lpb+1) + lpb}.{2 with attention, else 1}.conv
    conv_out                                  out.2       (out.0 is the final norm)
    time_embedding.linear_1 / linear_2        time_embed.0 / time_embed.2
    add_embedding.linear_1 / linear_2         label_emb.0.0 / label_emb.0.2   (SDXL's "text_time" conditioning)

Inside a ResNet block: conv1 = `in_layers.2`, conv2 = `out_layers.3`, time_emb_proj = `emb_layers.1`,
conv_shortcut = `skip_connection`. Inside an attention block (`Transformer2DModel` / `SpatialTransformer`)
the names are the same in both (`proj_in`, `transformer_blocks.k.attn1.to_q`, `...ff.net.0.proj`, ...).
With a per-block `layers_per_block` tuple the offsets are cumulative (as in SGM's `num_res_blocks` list).

Only modules a LoRA can target are mapped: every Linear / Conv2d. Norm layers are never LoRA targets (A1111
aborts a whole file with LoRA on a norm), so their paths are refused like any unknown path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

# Leaf names inside one block, diffusers -> SGM.
_RESNET_LEAVES = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_DOWNSAMPLER_LEAVES = {"conv": "op"}
_UPSAMPLER_LEAVES = {"conv": "conv"}
_BLOCK_LEAVES = {"resnet": _RESNET_LEAVES, "downsampler": _DOWNSAMPLER_LEAVES, "upsampler": _UPSAMPLER_LEAVES}
# Inside an attention block: identical names in both vocabularies; group 1 = transformer block index.
_ATTENTION_LEAF = re.compile(
    r"proj_in|proj_out|transformer_blocks\.(\d+)\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))"
)
# Modules outside the down/mid/up blocks.
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
}
_TEXT_TIME_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type -> has attentions
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)
# PEFT's LoRA wrapper children: `sgm_module_map` looks through them to the wrapped layer's own path.
_PEFT_CHILD = re.compile(r"base_layer|lora_\w+")


@dataclass(frozen=True)
class _Block:
    diffusers: str  # e.g. "down_blocks.1.attentions.0"
    sgm: str  # e.g. "input_blocks.4.1"
    kind: str  # "resnet" | "attention" | "downsampler" | "upsampler"
    depth: int = 0  # transformer blocks inside an attention block


class _Layout:
    """The block-level correspondence for one U-Net config, in both directions."""

    def __init__(self, config: Mapping[str, Any]):
        blocks = _blocks(config)
        self.by_diffusers = {b.diffusers: b for b in blocks}
        self.by_sgm = {b.sgm: b for b in blocks}
        top = dict(_TOP_LEVEL)
        if _get(config, "addition_embed_type") == "text_time":
            top.update(_TEXT_TIME_EMBEDDING)
        self.top_to_sgm = top
        self.top_to_diffusers = {v: k for k, v in top.items()}

    def to_sgm(self, path: str) -> str | None:
        if path in self.top_to_sgm:
            return self.top_to_sgm[path]
        found = _split(path, self.by_diffusers)
        if found is None:
            return None
        block, leaf = found
        sgm_leaf = _map_leaf(block, leaf, to_sgm=True)
        return None if sgm_leaf is None else f"{block.sgm}.{sgm_leaf}"

    def to_diffusers(self, path: str) -> str | None:
        if path in self.top_to_diffusers:
            return self.top_to_diffusers[path]
        found = _split(path, self.by_sgm)
        if found is None:
            return None
        block, leaf = found
        diffusers_leaf = _map_leaf(block, leaf, to_sgm=False)
        return None if diffusers_leaf is None else f"{block.diffusers}.{diffusers_leaf}"


def diffusers_to_sgm(path: str, unet_config: Mapping[str, Any]) -> str:
    """`"down_blocks.1.attentions.0.proj_in"` -> `"input_blocks.4.1.proj_in"` (full-size SDXL config).

    `path` is a diffusers `UNet2DConditionModel` module path of a LoRA-targetable layer; `unet_config` is
    `unet.config` (or a dict with its keys). Raises `ValueError` for a path the config has no such layer for.
    """
    sgm = _Layout(unet_config).to_sgm(path)
    if sgm is None:
        raise ValueError(f"{path!r} is not a LoRA-targetable module path (diffusers naming) of this U-Net config")
    return sgm


def sgm_to_diffusers(path: str, unet_config: Mapping[str, Any]) -> str:
    """`"output_blocks.2.2.conv"` -> `"up_blocks.0.upsamplers.0.conv"` (full-size SDXL config); inverse of
    `diffusers_to_sgm`. Raises `ValueError` for a path the config has no such layer for."""
    diffusers = _Layout(unet_config).to_diffusers(path)
    if diffusers is None:
        raise ValueError(f"{path!r} is not a LoRA-targetable module path (SGM naming) of this U-Net config")
    return diffusers


def sgm_module_map(unet: nn.Module) -> dict[str, str]:
    """diffusers path -> SGM path for every LoRA-targetable layer (every Linear / Conv2d) of `unet`.

    Pass the result as `sgm_paths=` to `formats.kohya` to write / read SDXL U-Net names the way kohya does.
    Works on a U-Net with PEFT LoRA injected (the wrapped layer's own path is used) and on the meta device.
    Raises `ValueError` naming every Linear / Conv2d it cannot place (an architecture this map does not know).
    """
    layout = _Layout(unet.config)
    result: dict[str, str] = {}
    unknown = []
    for name, module in unet.named_modules():
        if any(_PEFT_CHILD.fullmatch(part) for part in name.split(".")):
            continue
        layer = getattr(module, "base_layer", module)  # PEFT's LoRA wrapper: look through it
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        sgm = layout.to_sgm(name)
        if sgm is None:
            unknown.append(name)
        else:
            result[name] = sgm
    if unknown:
        shown = ", ".join(unknown[:5]) + (f", ... ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise ValueError(f"{type(unet).__name__}: {len(unknown)} layers have no SGM name: {shown}")
    assert len(set(result.values())) == len(result), "two diffusers paths map onto one SGM path"
    return result


def _blocks(config: Mapping[str, Any]) -> list[_Block]:
    """Every down/mid/up sub-block of the U-Net `config`, with its SGM prefix."""
    down_types = list(_get(config, "down_block_types", required=True))
    up_types = list(_get(config, "up_block_types", required=True))
    n = len(down_types)
    problems = [f"down block type {t!r}" for t in down_types if t not in _DOWN_TYPES]
    problems += [f"up block type {t!r}" for t in up_types if t not in _UP_TYPES]
    mid_type = _get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in _MID_TYPES:
        problems.append(f"mid block type {mid_type!r}")
    if len(up_types) != n:
        problems.append(f"{len(up_types)} up blocks for {n} down blocks")
    if problems:
        raise ValueError(
            f"U-Net config not supported by the SGM name map: {'; '.join(problems)}. Supported: down "
            f"{sorted(_DOWN_TYPES)}, up {sorted(_UP_TYPES)}, mid {_MID_TYPES[0]} or none, as in SDXL."
        )
    layers = _per_block(_get(config, "layers_per_block", 2), n, "layers_per_block")
    depth = _per_block(_get(config, "transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    reverse_depth = _get(config, "reverse_transformer_layers_per_block")
    up_depth = list(reversed(depth)) if reverse_depth is None else list(reverse_depth)
    up_layers = list(reversed(layers))

    blocks = []
    sgm_index = 1  # input_blocks.0 is conv_in
    for b, block_type in enumerate(down_types):
        for j in range(layers[b]):
            blocks.append(_Block(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{sgm_index}.0", "resnet"))
            if _DOWN_TYPES[block_type]:
                attention = _Block(
                    f"down_blocks.{b}.attentions.{j}", f"input_blocks.{sgm_index}.1", "attention", _at(depth[b], j)
                )
                blocks.append(attention)
            sgm_index += 1
        if b < n - 1:  # diffusers: every block but the last downsamples
            blocks.append(_Block(f"down_blocks.{b}.downsamplers.0", f"input_blocks.{sgm_index}.0", "downsampler"))
            sgm_index += 1

    if mid_type is not None:
        blocks += [
            _Block("mid_block.resnets.0", "middle_block.0", "resnet"),
            _Block("mid_block.attentions.0", "middle_block.1", "attention", _at(depth[-1], 0)),
            _Block("mid_block.resnets.1", "middle_block.2", "resnet"),
        ]

    sgm_index = 0
    for b, block_type in enumerate(up_types):
        has_attention = _UP_TYPES[block_type]
        for j in range(up_layers[b] + 1):
            blocks.append(_Block(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{sgm_index}.0", "resnet"))
            if has_attention:
                attention = _Block(
                    f"up_blocks.{b}.attentions.{j}", f"output_blocks.{sgm_index}.1", "attention", _at(up_depth[b], j)
                )
                blocks.append(attention)
            if b < n - 1 and j == up_layers[b]:  # every block but the last upsamples, after its last layer
                position = 2 if has_attention else 1
                blocks.append(
                    _Block(f"up_blocks.{b}.upsamplers.0", f"output_blocks.{sgm_index}.{position}", "upsampler")
                )
            sgm_index += 1
    return blocks


def _map_leaf(block: _Block, leaf: str, *, to_sgm: bool) -> str | None:
    """The leaf path inside `block` in the other vocabulary, or None if `block` has no such targetable layer."""
    if block.kind == "attention":
        match = _ATTENTION_LEAF.fullmatch(leaf)
        if match is None or (match.group(1) is not None and int(match.group(1)) >= block.depth):
            return None
        return leaf
    leaves = _BLOCK_LEAVES[block.kind]
    if not to_sgm:
        leaves = {v: k for k, v in leaves.items()}
    return leaves.get(leaf)


def _split(path: str, blocks: dict[str, _Block]) -> tuple[_Block, str] | None:
    """(block, leaf) for the block prefix of `path`, or None."""
    parts = path.split(".")
    for n in range(1, len(parts)):
        block = blocks.get(".".join(parts[:n]))
        if block is not None:
            return block, ".".join(parts[n:])
    return None


def _get(config: Mapping[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in config:
        return config[key]
    if required:
        raise ValueError(f"U-Net config has no {key!r}; pass `unet.config`")
    return default


def _per_block(value: int | Sequence, n: int, name: str) -> list:
    if isinstance(value, int):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"U-Net config {name} {value!r} has {len(value)} entries for {n} blocks")
    return list(value)


def _at(depth: int | Sequence[int], layer: int) -> int:
    """Transformer depth of one attention block: an int per block, or a per-layer sequence."""
    return depth if isinstance(depth, int) else int(depth[layer])
