"""Bake LoRAs into a base model: every targeted layer gets `W += weight * (alpha / r) * up @ down`.

The result is an ordinary model with no LoRA machinery, written as a diffusers folder (`save_pretrained`; any
diffusers tool loads it with `from_pretrained`) or, for an output ending in `.safetensors`, as a single-file
checkpoint in the original LDM/SGM layout that A1111 and ComfyUI load (`models.single_file`). The base is a
diffusers folder, a Hub id in the local cache, or a single-file checkpoint. SD1.x, SD2.x and SDXL.

LoRA files are read by `formats.readers` (kohya, diffusers/PEFT, old diffusers keys), resolved against this
model's own layers and checked against their shapes before anything is changed. Used by
`python -m sd_lora.merge --model BASE --lora F[:w] --output DIR|FILE.safetensors`, and by `extract`'s tests to
make a "fine-tuned" model whose difference from the base is known exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sd_lora.errors import UserError
from sd_lora.export import SAVE_DTYPES
from sd_lora.formats.architecture import architecture_of_pipeline, family_of_config
from sd_lora.formats.readers import read_any_lora, require_exact, shape_mismatches
from sd_lora.fsio import public_name, temporary_beside
from sd_lora.lora import maths
from sd_lora.lora.inject import LoraModuleWeights
from sd_lora.models.load import CHECKPOINT_SUFFIXES, HUB_ID, is_checkpoint_file

BAKE_RECORD = "sd_lora_baked_loras.json"  # in a diffusers folder output: which LoRAs, which weights
BAKE_METADATA_KEY = "sd_lora_baked_loras"  # the same record in a single-file output's metadata


def lora_components(pipe) -> dict[str, nn.Module]:
    """The pipeline's LoRA-carrying models under their kohya component names (`formats.kohya.COMPONENT_PREFIXES`)."""
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        return {"unet": pipe.unet, "text_encoder_1": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def apply_lora(model: nn.Module, modules: dict[str, LoraModuleWeights], weight: float = 1.0) -> None:
    """In place: `W += weight * delta` for every module (delta in float32, then cast to the layer's dtype).

    Sharp edge: calling it twice adds the LoRA twice. Check shapes first (`formats.readers.shape_mismatches`); this
    asserts.
    """
    layers = dict(model.named_modules())
    with torch.no_grad():
        for path, w in modules.items():
            layer_weight = layers[path].weight
            change = weight * maths.delta(w, torch.float32).to(layer_weight.device)
            assert change.shape == layer_weight.shape, (path, change.shape, layer_weight.shape)
            layer_weight.copy_((layer_weight.to(torch.float32) + change).to(layer_weight.dtype))


def bake_loras(pipe, loras: Sequence[tuple[str | Path, float]]) -> list[dict]:
    """Apply every `(file, weight)` to `pipe` in place, all or nothing: every file is read and checked first.

    Returns one summary per file: `{"file", "weight", "modules": {component: count}}`.
    """
    architecture = architecture_of_pipeline(pipe)
    resolved, problems = [], []
    for path, weight in loras:
        lora = read_any_lora(path, architecture=architecture)
        require_exact(lora, "bake")
        problems += [f"{path}: {p}" for p in shape_mismatches(lora, architecture)]
        resolved.append((path, weight, lora.components))
    if problems:
        raise UserError(
            f"{len(problems)} LoRA modules do not fit the base model's layers: {_preview(problems, 3)}. "
            "The LoRA was trained for a different base model (family or size)."
        )
    components = lora_components(pipe)
    summary = []
    for path, weight, per_component in resolved:
        for component, modules in per_component.items():
            apply_lora(components[component], modules, weight)
        counts = {c: len(m) for c, m in per_component.items() if m}
        summary.append({"file": str(path), "weight": weight, "modules": counts})
    return summary


def load_pipeline(model: str, *, config_dir: str | Path | None = None, allow_unsafe_pickle: bool = False):
    """A pipeline (float32, CPU) from a diffusers folder, a cached Hub id, or a single-file checkpoint.

    `config_dir` / `allow_unsafe_pickle`: for single-file checkpoints, see `models.single_file.load_single_file`.
    """
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    if is_checkpoint_file(model):
        return _pipeline_from_single_file(path, config_dir, allow_unsafe_pickle)
    if path.is_file():
        raise UserError(f"--model {model}: not a checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)}) or a diffusers folder")
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(
            f"--model {model}: not a diffusers model folder (no model_index.json); pass the folder that holds it"
        )
    if not path.exists() and not HUB_ID.match(model):
        raise UserError(f"--model {model}: no such file or folder, and not a Hugging Face id of the form 'org/name'")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model)  # float32 by default
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model}: cannot load it as a diffusers pipeline ({str(e).splitlines()[0]})") from None
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise UserError(
            f"--model {model}: {type(pipe).__name__} is not a Stable Diffusion pipeline (no unet / text_encoder)"
        )
    return pipe


def config_dir_problems(model: str | None, config_dir: Path | None, *, flag: str = "--model",
                        config_flag: str = "--model-config") -> list[str]:
    """What is wrong with `config_dir` for `model`, before anything is loaded ([] when nothing; None: not given).

    `config_dir` means what train's --model-config means: the diffusers folder whose configs and tokenizer describe a
    single-file checkpoint that is not a standard SD1.5 / SD2.1 / SDXL size. `flag` / `config_flag` are the two
    options as the calling tool spells them (extract: --base / --base-config, --tuned / --tuned-config).
    """
    if config_dir is None:
        return []
    problems = []
    if not (Path(config_dir).expanduser() / "model_index.json").is_file():
        problems.append(f"{config_flag} {config_dir}: not a diffusers folder (no model_index.json); pass the folder "
                        f"whose configs and tokenizer describe the {flag} checkpoint")
    if model is None:
        problems.append(f"{config_flag} {config_dir} describes a single-file {flag} checkpoint; without {flag} it has "
                        f"no meaning. Drop {config_flag}, or give {flag}.")
    elif not is_checkpoint_file(model):
        problems.append(f"{config_flag} {config_dir}: only a single-file {flag} checkpoint "
                        f"({'/'.join(CHECKPOINT_SUFFIXES)}) needs a config folder, and {flag} {model} is not one (a "
                        f"diffusers folder or Hub id brings its own configs); drop {config_flag}")
    return problems



def _pipeline_from_single_file(path: Path, config_dir, allow_unsafe_pickle: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sd_lora.models.single_file import load_single_file

    parts = load_single_file(path, config_dir=config_dir, allow_unsafe_pickle=allow_unsafe_pickle)
    print(f"model {path}: {parts['info'].describe()}")
    common = {k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    if parts["family"] == "sdxl":
        return StableDiffusionXLPipeline(
            **common, text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"], add_watermarker=False
        )
    return StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def save_pipeline(pipe, output: Path, record: dict) -> Path:
    """`save_pretrained` into a fresh temporary folder beside `output`, then rename: no half-written model."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output}: already exists; choose a new folder name or remove it first")
    output.parent.mkdir(parents=True, exist_ok=True)
    with temporary_beside(output, folder=True) as tmp:  # not mkdtemp's 0700: the model is for others to read too
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / BAKE_RECORD).write_text(json.dumps(record, indent=2))
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(tmp, output)
    return output


def save_single_file_checkpoint(pipe, output: Path, record: dict, dtype: torch.dtype) -> Path:
    """The baked model as one `.safetensors` in the original layout (atomic; see `models.single_file`)."""
    from sd_lora.models.single_file import save_single_file

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    family = family_of_config(dict(pipe.unet.config), sdxl_text_encoders=sdxl)
    metadata = {BAKE_METADATA_KEY: json.dumps(record)}
    return save_single_file(pipe.components, output, family, metadata=metadata, dtype=dtype)


def bake_model(
    model: str,
    loras: Sequence[tuple[str | Path, float]],
    output: str | Path,
    *,
    save_precision: str = "fp32",
    config_dir: str | Path | None = None,
    allow_unsafe_pickle: bool = False,
) -> Path:
    """Load `model`, bake `loras` into it, write `output`: a `.safetensors` single-file checkpoint (original
    layout), else a diffusers folder. Prints a summary. `config_dir`: configs for a non-standard single-file
    base (e.g. a tiny test model); see `models.single_file.load_single_file`."""
    output = Path(output)
    single_file = output.suffix.lower() == ".safetensors"
    if save_precision not in SAVE_DTYPES:
        raise UserError(f"--save-precision {save_precision}: choose one of {', '.join(SAVE_DTYPES)}")
    if output.exists() and (single_file or not output.is_dir() or any(output.iterdir())):  # before the slow part
        raise UserError(f"--output {output}: already exists; choose a new name or remove it first")
    pipe = load_pipeline(model, config_dir=config_dir, allow_unsafe_pickle=allow_unsafe_pickle)
    summary = bake_loras(pipe, loras)
    dtype = SAVE_DTYPES[save_precision]
    # The record travels with the shared model: paths by `public_name`, so no user or folder name leaks.
    loras_record = [{**entry, "file": public_name(entry["file"])} for entry in summary]
    record = {"base_model": public_name(str(model)), "loras": loras_record, "precision": save_precision}
    if single_file:
        save_single_file_checkpoint(pipe, output, record, dtype)
    else:
        for component in pipe.components.values():
            # only when needed: diffusers warns on every ModelMixin.to(dtype), even a no-op one
            if isinstance(component, nn.Module) and any(p.dtype != dtype for p in component.parameters()):
                component.to(dtype)
        save_pipeline(pipe, output, record)
    for entry in summary:
        counts = ", ".join(f"{c} {n}" for c, n in entry["modules"].items())
        print(f"baked {entry['file']} x {entry['weight']:g}: {counts} modules")
    kind = "single-file checkpoint, original layout" if single_file else "diffusers folder"
    print(f"wrote {output} ({kind}, {save_precision})")
    return output


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
