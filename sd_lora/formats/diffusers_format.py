"""The diffusers / PEFT LoRA file ("diffusers profile"): `unet.<path>.lora_A.weight`, `.lora_B.weight`.

The optional second export (lora-format.md §3). Keys, for every module:

- `unet.<diffusers module path>.lora_A.weight` / `.lora_B.weight` (SD1, SD2 and SDXL alike: diffusers paths,
  never SGM names);
- `text_encoder.text_model.<path>...` for the SD1/SD2 text encoder and SDXL's first one (`text_encoder_1` in
  our component vocabulary), `text_encoder_2.text_model.<path>...` for SDXL's second. The nested
  `text_model.` form is written even for transformers >= 5.6's flattened `CLIPTextModel`: diffusers strips it
  again for a flattened model, older diffusers/transformers and ComfyUI need it.

`lora_A` is kohya's `lora_down` (`(r, in[, kh, kw])`), `lora_B` its `lora_up` (`(out, r[, 1, 1])`).

**Alpha is baked into lora_B** (`lora_B = up * float32(alpha / r)`, so the file means alpha = r, scale 1).
The format has no alpha tensors (diffusers rejects a file that has them); the alternative, the PEFT config as
JSON under the metadata key `lora_adapter_metadata`, was not chosen because:
- only files carry metadata: a state dict passed to `pipe.load_lora_weights(dict)` has none, so the alpha
  would be silently lost on the in-memory path sd_lora's own `api.load_lora` takes;
- diffusers releases older than that metadata, ComfyUI and other `lora_A/lora_B` readers ignore it and would
  apply scale 1 to unscaled factors: a wrong result without any error. A baked file means the same in all.
The price: `alpha` itself is not kept. Reading a baked file gives alpha = r and the scaled up; converting that
back to kohya gives the same delta (to one float32 rounding of up, none at all when alpha / r is a power of two),
and from then on round trips are bit-exact. When alpha = r nothing is scaled and kohya -> diffusers -> kohya
is bit-exact. Files from other tools that do carry `lora_adapter_metadata` are read with their alphas.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from sd_lora.errors import UserError
from sd_lora.formats.kohya import HASH_KEY, tensor_data_sha256
from sd_lora.fsio import atomic_write_bytes
from sd_lora.lora.inject import LoraModuleWeights

# Component (our vocabulary, as in formats.kohya) -> key prefix. SDXL's first text encoder is `text_encoder` in
# a diffusers pipeline, `text_encoder_1` (kohya's lora_te1_) in ours.
COMPONENT_PREFIXES = {
    "unet": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_1": "text_encoder",
    "text_encoder_2": "text_encoder_2",
}
KEY_SUFFIXES = ("lora_A.weight", "lora_B.weight")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON PEFT config, per prefix ("unet.lora_alpha": 8, ...)
PEFT_PREFIX = "base_model.model."  # what PEFT's own `get_peft_model_state_dict` puts in front

# Top-level children of `CLIPTextTransformer`; in a flattened CLIPTextModel they sit at the model root.
_FLATTENED_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm")
_KEY_RE = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight)")


def nested_text_encoder_path(path: str) -> str:
    """`encoder.layers.0.mlp.fc1` (flattened CLIPTextModel) -> `text_model.encoder.layers.0.mlp.fc1`; other
    paths (already nested, or `text_projection`) unchanged."""
    return "text_model." + path if path.startswith(_FLATTENED_CLIP_ROOTS) else path


def diffusers_module_name(component: str, module_path: str) -> str:
    """`("text_encoder", "encoder.layers.0.mlp.fc1")` -> `"text_encoder.text_model.encoder.layers.0.mlp.fc1"`."""
    if component not in COMPONENT_PREFIXES:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENT_PREFIXES)}")
    if component != "unet":
        module_path = nested_text_encoder_path(module_path)
    return f"{COMPONENT_PREFIXES[component]}.{module_path}"


def bake_alpha(weights: LoraModuleWeights) -> LoraModuleWeights:
    """The same delta with alpha = r: `up * float32(alpha / r)`. Returns `weights` itself when alpha == r."""
    rank = weights.rank
    if float(weights.alpha) == float(rank):
        return weights
    scale = torch.tensor(float(weights.alpha) / rank, dtype=torch.float32)
    return LoraModuleWeights(down=weights.down, up=weights.up.float() * scale, alpha=float(rank))


def to_diffusers_state_dict(
    components: Mapping[str, Mapping[str, LoraModuleWeights]], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """`{"unet": {path: weights}, "text_encoder": {...}}` -> the flat diffusers/PEFT state dict, alpha baked in.

    SDXL: `{"unet", "text_encoder_1", "text_encoder_2"}` (as for `formats.kohya`); U-Net paths are always the
    diffusers paths. Tensors are contiguous CPU copies in `dtype`; the alpha scale is applied in float32 first.
    """
    if "text_encoder" in components and "text_encoder_1" in components:
        raise ValueError("components has both 'text_encoder' and 'text_encoder_1': the same pipeline component")
    state: dict[str, torch.Tensor] = {}
    for component in sorted(components):
        for path, weights in sorted(components[component].items()):
            down, up = weights.down, weights.up
            if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != up.shape[1]:
                raise ValueError(
                    f"{component} {path}: down {list(down.shape)} and up {list(up.shape)} are not a LoRA pair "
                    "(need down (r, in[, kh, kw]) and up (out, r[, 1, 1]) with the same rank r)"
                )
            baked = bake_alpha(weights)
            name = diffusers_module_name(component, path)
            if f"{name}.lora_A.weight" in state:
                raise ValueError(f"two modules map onto the diffusers name {name}")
            state[f"{name}.lora_A.weight"] = _to_cpu(baked.down, dtype)
            state[f"{name}.lora_B.weight"] = _to_cpu(baked.up, dtype)
    return state


def _to_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # copy=True: the file's tensors never alias the live training parameters.
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def from_diffusers_state_dict(
    state: Mapping[str, torch.Tensor],
    module_paths: Mapping[str, list[str]],
    *,
    source: str = "LoRA file",
    adapter_metadata: Mapping | None = None,
) -> dict[str, dict[str, LoraModuleWeights]]:
    """The inverse of `to_diffusers_state_dict`, resolved by name against each component's known module paths.

    `module_paths` is e.g. `{"unet": [...], "text_encoder": [...]}` (SDXL: `text_encoder_1`, `text_encoder_2`),
    the paths as the models name them. Keys may carry PEFT's `base_model.model.` in front of the module path, and
    text-encoder paths may be nested or flattened. Alpha: from `adapter_metadata` (diffusers'
    `lora_adapter_metadata`, parsed) when given, else r (the file was baked). Any key that is not a LoRA factor
    of a known module, or a module with only one factor, is refused in one `UserError` naming `source`.
    """
    lookup = diffusers_name_lookup(module_paths)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        match = _KEY_RE.fullmatch(key)
        name = strip_peft_prefix(match.group(1)) if match else None
        if name not in lookup:
            unknown.append(key)
            continue
        parts.setdefault(name, {})[match.group(2)] = tensor
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} keys are not LoRA factors of any module of this model: "
            f"{_preview(sorted(unknown))}. Was it trained for a different base model family?"
        )
    result: dict[str, dict[str, LoraModuleWeights]] = {component: {} for component in module_paths}
    broken = []
    for name, tensors in sorted(parts.items()):
        down, up = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if down is None or up is None:
            broken.append(f"{name} (has only {', '.join(sorted(tensors))})")
            continue
        if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != up.shape[1]:
            broken.append(f"{name} (lora_A {list(down.shape)} and lora_B {list(up.shape)} have different ranks)")
            continue
        component, path = lookup[name]
        alpha = adapter_alpha(adapter_metadata, COMPONENT_PREFIXES[component], name.split(".", 1)[1], down.shape[0])
        result[component][path] = LoraModuleWeights(down=down, up=up, alpha=alpha)
    if broken:
        raise UserError(f"{source}: {len(broken)} broken LoRA modules: {_preview(broken)}. The file is damaged.")
    return result


def save_diffusers_lora_file(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write a diffusers-profile `.safetensors` atomically, adding a correct `sshs_model_hash` to `metadata`.

    `state_dict` comes from `to_diffusers_state_dict`: only `lora_A.weight` / `lora_B.weight` keys (an alpha
    or any other key would make diffusers refuse the file). Metadata values must be strings.
    """
    from safetensors.torch import save

    bad = sorted(k for k in state_dict if not k.endswith(KEY_SUFFIXES))
    if bad:
        raise ValueError(f"not a diffusers-profile state dict; offending keys: {_preview(bad)}")
    not_str = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if not_str:
        raise TypeError(f"LoRA file metadata values must be strings; got non-strings for {_preview(not_str)}")
    tensors = dict(state_dict)
    data = save(tensors, metadata={**metadata, HASH_KEY: tensor_data_sha256(tensors)})
    return atomic_write_bytes(path, data)


def diffusers_name_lookup(module_paths: Mapping[str, list[str]]) -> dict[str, tuple[str, str]]:
    """diffusers module name (`unet.x`, `text_encoder.text_model.x`) -> (component, path), for every path.

    Text encoders are found under both the nested and the flattened spelling (diffusers accepts both)."""
    lookup: dict[str, tuple[str, str]] = {}
    for component, paths in module_paths.items():
        prefix = COMPONENT_PREFIXES[component]
        for path in paths:
            names = {diffusers_module_name(component, path)}
            if component != "unet":
                names.add(f"{prefix}.{path.removeprefix('text_model.')}")
            for name in names:
                if lookup.setdefault(name, (component, path)) != (component, path):
                    raise ValueError(f"{lookup[name]} and {(component, path)} both map to the diffusers name {name}")
    return lookup


def strip_peft_prefix(name: str) -> str:
    """`unet.base_model.model.x` / `base_model.model.unet.x` -> `unet.x` (PEFT's wrapper prefix, anywhere in front)."""
    if name.startswith(PEFT_PREFIX):
        return name[len(PEFT_PREFIX) :]
    head, dot, rest = name.partition(".")
    if dot and rest.startswith(PEFT_PREFIX):
        return f"{head}.{rest[len(PEFT_PREFIX):]}"
    return name


def parse_adapter_metadata(metadata: Mapping[str, str], source: str = "LoRA file") -> dict | None:
    """diffusers' `lora_adapter_metadata` header entry as a dict, or None when absent."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as e:
        message = f"{source}: metadata {ADAPTER_METADATA_KEY} is not valid JSON ({e}); the file is damaged"
        raise UserError(message) from None
    if not isinstance(parsed, dict):
        raise UserError(f"{source}: metadata {ADAPTER_METADATA_KEY} should be a JSON object")
    return parsed


def adapter_alpha(adapter_metadata: Mapping | None, prefix: str, module_name: str, rank: int) -> float:
    """kohya alpha (scale * r) of one module under diffusers' per-prefix PEFT config, or r without a config.

    PEFT's rules: `alpha_pattern` keys are regexes matched against the end of the module name (its
    `get_pattern_key`), the default `lora_alpha` is 8, and `use_rslora` scales by alpha / sqrt(r).
    """
    if not adapter_metadata:
        return float(rank)
    config = {k[len(prefix) + 1 :]: v for k, v in adapter_metadata.items() if k.startswith(prefix + ".")}
    if not config:
        return float(rank)
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # scale alpha / sqrt(r) == kohya alpha' / r
    return alpha


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
