"""The kohya / WebUI LoRA file ("portable profile"): names, tensors, hash and the .safetensors file itself.

This is the one module that speaks the format's vocabulary (`lora_unet_`, `lora_te_`, `lora_down`, `lora_up`,
`alpha`, `sshs_model_hash`); everything else in sd_lora talks about module paths and `LoraModuleWeights`. The
contract it follows is /work/shared/reference/lora-format.md:

- every key is `<name>.lora_down.weight`, `<name>.lora_up.weight` or `<name>.alpha` (0-d), exactly three per
  module, and every `<name>` starts with `lora_unet_`, `lora_te_`, `lora_te1_` or `lora_te2_`;
- `<name>` = prefix + module path with `.` -> `_`; text encoder paths always in the nested Hugging Face form
  (`text_model.encoder.layers.N...`), even from a flattened transformers >= 5.6 `CLIPTextModel`;
- SDXL: the U-Net module path is the original SGM one (`input_blocks.4.1...`, as kohya writes it), the text
  encoders are `text_encoder_1` (`lora_te1_`) and `text_encoder_2` (`lora_te2_`). Callers pass
  `sgm_paths=formats.sgm.sgm_module_map(unet)` to every naming function; without it U-Net names are the
  diffusers paths (SD1.x / SD2.x);
- `delta_W = (alpha / r) * up @ down`; a missing alpha means alpha = r;
- `sshs_model_hash` is the sha256 of the tensor-data bytes (what follows the 8-byte length and JSON header).

Names are mapped back to module paths by lookup against the model's known paths, never by guessing where
an `_` was a `.`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from sd_lora.errors import UserError
from sd_lora.fsio import atomic_write_bytes
from sd_lora.lora.inject import LoraModuleWeights

# Component name (as in a diffusers pipeline) -> kohya key prefix. SDXL uses unet + text_encoder_1/_2, and
# SGM names for the U-Net (the `sgm_paths` argument below).
COMPONENT_PREFIXES = {
    "unet": "lora_unet",
    "text_encoder": "lora_te",
    "text_encoder_1": "lora_te1",
    "text_encoder_2": "lora_te2",
}
KEY_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
HASH_KEY = "sshs_model_hash"
# Hashes of one file's bytes: written for the file they describe, never copied to another (convert, resize). kohya's
# sshs_legacy_hash (read by sd-webui-additional-networks in place of hashing the file) and modelspec.hash_sha256.
FILE_HASH_KEYS = (HASH_KEY, "sshs_legacy_hash", "modelspec.hash_sha256")
# Measured on the trained weight changes themselves (the best validation loss and its step): still true of a file
# that holds the same changes (convert), not of an approximation of them (resize), so never copied to one.
MEASURED_KEYS = ("ss_validation_loss_best", "ss_validation_best_step")

# Top-level children of `CLIPTextTransformer`; in a flattened CLIPTextModel they sit at the model root.
_FLATTENED_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm")
_KEY_RE = re.compile(r"(lora_(?:unet|te|te1|te2)_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)")


def kohya_module_name(component: str, module_path: str, *, sgm_paths: Mapping[str, str] | None = None) -> str:
    """`("unet", "down_blocks.0.attentions.0.proj_in")` -> `"lora_unet_down_blocks_0_attentions_0_proj_in"`.

    Text encoders: a flattened `CLIPTextModel` path (`encoder.layers.0.self_attn.q_proj`) gets its
    `text_model.` back, as every loader expects `lora_te_text_model_encoder_layers_0_self_attn_q_proj`.

    SDXL: with `sgm_paths` (diffusers U-Net path -> SGM path, from `formats.sgm.sgm_module_map(unet)`) a
    "unet" path is written under its SGM name: `down_blocks.1.attentions.0.proj_in` ->
    `lora_unet_input_blocks_4_1_proj_in`. A U-Net path missing from `sgm_paths` raises `ValueError`.
    """
    if component not in COMPONENT_PREFIXES:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENT_PREFIXES)}")
    if component == "unet" and sgm_paths is not None:
        if module_path not in sgm_paths:
            raise ValueError(
                f"U-Net module {module_path!r} has no entry in sgm_paths; build them with "
                "sd_lora.formats.sgm.sgm_module_map(unet) from the same U-Net"
            )
        module_path = sgm_paths[module_path]
    if component != "unet" and module_path.startswith(_FLATTENED_CLIP_ROOTS):
        module_path = "text_model." + module_path
    return f"{COMPONENT_PREFIXES[component]}_{module_path.replace('.', '_')}"


def _names_to_paths(
    module_paths: dict[str, list[str]], sgm_paths: Mapping[str, str] | None = None
) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, module path); refuses two paths that collapse onto one name."""
    lookup: dict[str, tuple[str, str]] = {}
    for component, paths in module_paths.items():
        for path in paths:
            name = kohya_module_name(component, path, sgm_paths=sgm_paths)
            if name in lookup and lookup[name] != (component, path):
                raise ValueError(f"{lookup[name]} and {(component, path)} both map to the kohya name {name}")
            lookup[name] = (component, path)
    return lookup


def to_kohya_state_dict(
    components: dict[str, dict[str, LoraModuleWeights]],
    dtype: torch.dtype = torch.float32,
    *,
    sgm_paths: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """`{"unet": {path: weights}, "text_encoder": {...}}` -> the flat kohya state dict, ready to save.

    SDXL: `{"unet": ..., "text_encoder_1": ..., "text_encoder_2": ...}` with
    `sgm_paths=sgm_module_map(unet)`, so U-Net modules get kohya's SGM names (see `kohya_module_name`).

    `down`/`up` are stored in `dtype` (contiguous CPU copies). `alpha` is always stored as a float32 0-d
    tensor, whatever `dtype`: loaders read it with `.item()`, and an alpha like 0.3 would be rounded in
    fp16/bf16, silently changing the LoRA's scale (kohya itself stores alpha in the save dtype).
    """
    _names_to_paths({c: list(w) for c, w in components.items()}, sgm_paths)  # collision check
    state: dict[str, torch.Tensor] = {}
    for component in sorted(components):
        for path, w in sorted(components[component].items()):
            name = kohya_module_name(component, path, sgm_paths=sgm_paths)
            if w.down.ndim not in (2, 4) or w.up.ndim != w.down.ndim or w.down.shape[0] != w.up.shape[1]:
                raise ValueError(
                    f"{component} {path}: down {list(w.down.shape)} and up {list(w.up.shape)} are not a LoRA pair "
                    "(need down (r, in[, kh, kw]) and up (out, r[, 1, 1]) with the same rank r)"
                )
            state[f"{name}.lora_down.weight"] = _to_cpu(w.down, dtype)
            state[f"{name}.lora_up.weight"] = _to_cpu(w.up, dtype)
            state[f"{name}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return state


def _to_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # copy=True: the file's tensors never alias the live training parameters.
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def from_kohya_state_dict(
    state: dict[str, torch.Tensor],
    module_paths: dict[str, list[str]],
    *,
    source: str = "LoRA file",
    sgm_paths: Mapping[str, str] | None = None,
) -> dict[str, dict[str, LoraModuleWeights]]:
    """The inverse of `to_kohya_state_dict`, resolved by name against each component's known module paths.

    `module_paths` is e.g. `{"unet": unet_target_modules(unet), "text_encoder": [...]}`. Returns one dict per
    component in `module_paths` (empty when the file has nothing for it), keyed by the diffusers module paths
    (also for SDXL: pass `sgm_paths` from `sgm_module_map` of the same U-Net architecture). `source` (the file
    path) names the file in error messages.
    """
    lookup = _names_to_paths(module_paths, sgm_paths)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        match = _KEY_RE.fullmatch(key)
        if match is None or match.group(1) not in lookup:
            unknown.append(key)
            continue
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} keys do not match any LoRA module of this model: {_preview(sorted(unknown))}. "
            "Was it trained for a different base model family or target preset?"
        )

    result: dict[str, dict[str, LoraModuleWeights]] = {component: {} for component in module_paths}
    incomplete = []
    for name, tensors in sorted(parts.items()):
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            incomplete.append(f"{name} (has only {', '.join(sorted(tensors))})")
            continue
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != up.shape[1]:
            incomplete.append(f"{name} (down {list(down.shape)} and up {list(up.shape)} have different ranks)")
            continue
        alpha = float(tensors["alpha"].item()) if "alpha" in tensors else float(down.shape[0])
        component, path = lookup[name]
        result[component][path] = LoraModuleWeights(down=down, up=up, alpha=alpha)
    if incomplete:
        raise UserError(
            f"{source}: {len(incomplete)} broken LoRA modules: {_preview(incomplete)}. "
            "The file is damaged; export it again."
        )
    return result


def _data_section(file_bytes: bytes) -> bytes:
    """The tensor-data bytes of a safetensors file: everything after the 8-byte length and the JSON header."""
    (header_len,) = struct.unpack("<Q", file_bytes[:8])
    return file_bytes[8 + header_len :]


def tensor_data_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) of the tensor-data bytes `save_lora_file` will write: the value of `sshs_model_hash`.

    The data section does not depend on the metadata (safetensors orders tensors by dtype and name and pads
    only the JSON header), so it can be hashed before the metadata is known.
    """
    from safetensors.torch import save

    return hashlib.sha256(_data_section(save(state_dict))).hexdigest()


def _check_portable_keys(state_dict: dict[str, torch.Tensor]) -> None:
    """Our invariant: only the three kohya tensors per module, nothing else (diffusers raises on leftovers)."""
    per_module: dict[str, set[str]] = {}
    bad = []
    for key in state_dict:
        match = _KEY_RE.fullmatch(key)
        if match is None:
            bad.append(key)
        else:
            per_module.setdefault(match.group(1), set()).add(match.group(2))
    bad += [f"{name} ({sorted(s)})" for name, s in per_module.items() if s != set(KEY_SUFFIXES)]
    if bad:
        raise ValueError(f"not a portable kohya LoRA state dict; offending keys/modules: {_preview(sorted(bad))}")


def save_lora_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a kohya LoRA `.safetensors` atomically, adding `sshs_model_hash` to `metadata` (nothing else).

    All metadata keys and values must already be strings (the safetensors header allows nothing else).
    """
    from safetensors.torch import save

    not_str = [f"{k!r}: {type(v).__name__}" for k, v in metadata.items() if not isinstance(v, str)]
    not_str += [f"key {k!r}" for k in metadata if not isinstance(k, str)]
    if not_str:
        raise TypeError(f"LoRA file metadata values must be strings; got {_preview(not_str)}")
    if HASH_KEY in metadata:
        raise ValueError(f"metadata must not contain {HASH_KEY!r}; save_lora_file computes it")
    _check_portable_keys(state_dict)

    digest = tensor_data_sha256(state_dict)
    data = save(state_dict, metadata={**metadata, HASH_KEY: digest})
    if hashlib.sha256(_data_section(data)).hexdigest() != digest:  # "write it right or not at all"
        raise RuntimeError("safetensors tensor data changed when metadata was added; sshs_model_hash would be wrong")
    return atomic_write_bytes(path, data)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a LoRA `.safetensors`: `(tensors, metadata)`; a `UserError` names the file when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a LoRA file; pass the .safetensors file itself")
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file. Check the path.")
    data = path.read_bytes()
    not_safetensors = UserError(
        f"{path}: not a readable .safetensors file (truncated, corrupt or another format). "
        "Export the LoRA again or pass a kohya-format .safetensors file."
    )
    if len(data) < 8:
        raise not_safetensors
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise not_safetensors
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except (ValueError, SafetensorError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{not_safetensors} ({e})") from e
    if not isinstance(header, dict):
        raise not_safetensors
    metadata = header.get("__metadata__") or {}
    return tensors, dict(metadata)


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
