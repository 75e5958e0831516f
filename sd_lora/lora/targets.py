"""Where LoRA goes: target presets for the U-Net and the CLIP text encoder.

Pure functions over `nn.Module.named_modules()`: they return full module paths (the strings PEFT is told to
wrap and the strings `formats.kohya` turns into `lora_unet_...` / `lora_te_...` names). Nothing here touches
weights, so the functions also work on models built under `torch.device("meta")`.

U-Net presets (every path lies inside a `Transformer2DModel`, the block kohya's `networks.lora` targets):

- `attn-mlp` (default, kohya's set): `proj_in`, `proj_out` and, per transformer block, `attn1.to_{q,k,v}`,
  `attn1.to_out.0`, the same four in `attn2`, `ff.net.0.proj` and `ff.net.2`: 12 modules per
  `Transformer2DModel` with one transformer block. `proj_in/proj_out` are 1x1 `Conv2d` on SD1.x and
  `Linear` on SD2.x/SDXL.
- `attn`: the q, k, v and out projections of `attn1` (self-attention) and `attn2` (cross-attention).
- `cross-attn`: `attn2`'s q, k, v and out only (the layers that read the text embedding).

Text encoder: the six linears of every CLIP encoder layer (`self_attn.{q,k,v,out}_proj`, `mlp.fc1`,
`mlp.fc2`). All six, always: diffusers misdetects partial sets and A1111 only applies SD2 attention LoRA when
q, k, v and out are all present (see /work/shared/reference/lora-format.md).
"""

from __future__ import annotations

import re

from torch import nn

UNET_PRESETS = ("attn-mlp", "attn", "cross-attn")

# Paths relative to a Transformer2DModel. An explicit list rather than "every Linear": it can never pick up a
# norm's projection (A1111 aborts a whole file that has LoRA on a norm layer), and a test checks that on the
# full-size SD1.5/SD2.1 U-Nets it equals kohya's "every Linear and 1x1 Conv2d" rule.
_BLOCK = r"transformer_blocks\.\d+\."
_SELF_ATTN = _BLOCK + r"attn1\.(?:to_q|to_k|to_v|to_out\.0)"
_CROSS_ATTN = _BLOCK + r"attn2\.(?:to_q|to_k|to_v|to_out\.0)"
_MLP = _BLOCK + r"ff\.net\.(?:0\.proj|2)"
_PROJ = r"proj_in|proj_out"

_PRESET_PATTERNS = {
    "attn-mlp": re.compile(f"{_PROJ}|{_SELF_ATTN}|{_CROSS_ATTN}|{_MLP}"),
    "attn": re.compile(f"{_SELF_ATTN}|{_CROSS_ATTN}"),
    "cross-attn": re.compile(_CROSS_ATTN),
}

# `encoder.layers.N...` in a flattened CLIPTextModel (transformers >= 5.6), `text_model.encoder.layers.N...`
# in a nested one (CLIPTextModelWithProjection, older transformers).
_TEXT_ENCODER_PATTERN = re.compile(
    r"(?:.+\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"
)


def is_lora_compatible_layer(module: nn.Module) -> bool:
    """An `nn.Linear` or a 1x1 `nn.Conv2d`: the layers the portable (kohya) profile can carry as plain LoRA."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def transformer_2d_paths(unet: nn.Module) -> list[str]:
    """Paths of every `Transformer2DModel` in `unet` (matched by class name, so no diffusers import is needed)."""
    return [name for name, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]


def unet_target_modules(unet: nn.Module, preset: str = "attn-mlp") -> list[str]:
    """Full module paths (sorted) of the U-Net layers that `preset` puts LoRA on."""
    if preset not in _PRESET_PATTERNS:
        raise ValueError(f"unknown U-Net LoRA preset {preset!r}; supported presets: {', '.join(UNET_PRESETS)}")
    pattern = _PRESET_PATTERNS[preset]
    blocks = transformer_2d_paths(unet)
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no Transformer2DModel blocks; is it a Stable Diffusion U-Net?")
    modules = dict(unet.named_modules())
    targets = []
    for block in blocks:
        for rel_name, module in modules[block].named_modules():
            if rel_name and pattern.fullmatch(rel_name) and is_lora_compatible_layer(module):
                targets.append(f"{block}.{rel_name}")
    return sorted(targets)


def matching_preset(unet: nn.Module, modules) -> str | None:
    """The preset that puts LoRA on exactly `modules` (full module paths) of `unet` (before injection), if one does."""
    wanted = set(modules)
    return next((preset for preset in UNET_PRESETS if set(unet_target_modules(unet, preset)) == wanted), None)


def text_encoder_target_modules(text_encoder: nn.Module) -> list[str]:
    """Full module paths (sorted) of the six linears of every CLIP encoder layer (flattened or nested model)."""
    targets = [
        name
        for name, module in text_encoder.named_modules()
        if _TEXT_ENCODER_PATTERN.fullmatch(name) and isinstance(module, nn.Linear)
    ]
    if not targets:
        raise ValueError(
            f"{type(text_encoder).__name__} has no CLIP encoder layers (`encoder.layers.N.self_attn.q_proj`, ...); "
            "is it a CLIP text encoder?"
        )
    return sorted(targets)
