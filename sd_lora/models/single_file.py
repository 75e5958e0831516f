"""Single-file Stable Diffusion checkpoints (the `.safetensors` A1111 and ComfyUI use): load and write.

A single-file checkpoint holds every network of an SD1.x, SD2.x or SDXL model under the original
(Stability / LDM / SGM) names (`checkpoint_layout` lists them), and nothing else: no configs, no tokenizer,
no scheduler. We supply those offline from small config skeletons shipped in `skeletons/<family>/` and the
CLIP tokenizer built from the BPE vocabulary an installed package ships (`clip_vocab`), and let diffusers'
own single-file conversion (`from_single_file` of each component, given a local config folder) turn the
weights into diffusers modules. Nothing is downloaded.

What a file is (family, prediction type, resolution) comes from `checkpoint_detect`, whose public names this
module re-exports as the one entry point for single files. `save_single_file` writes diffusers components back
into the original layout; a written file loads back bit-exactly through diffusers' `from_single_file` (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fsio import file_sha256, readable, temporary_beside, usual_permissions
from ..precision import vae_dtype
from .checkpoint_detect import (
    SAFE_SUFFIXES,
    WEAK_SOURCES,
    ZERO_TERMINAL_SNR_SCHEDULER,
    CheckpointInfo,
    check_checkpoint_file,
    detect_checkpoint,
    detect_from_shapes,
    read_pickle_checkpoint,
    read_safetensors_header,
    sidecar_yaml,
)
from .checkpoint_layout import FAMILIES, TEXT_ENCODERS, checkpoint_state_dict
from .streaming import parameter_count

__all__ = ["CheckpointInfo", "checkpoint_state_dict", "detect_checkpoint", "detect_from_shapes", "infer_family",
           "load_single_file", "read_safetensors_header", "save_single_file", "webui_hashes", "write_skeleton"]
SKELETONS = Path(__file__).parent / "skeletons"

_TOKENIZER_PAD = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # SD2's only tokenizer also pads with "!"
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


# ---------------------------------------------------------------------------------------------- loading


def webui_hashes(path: str | os.PathLike) -> dict[str, str]:
    """A checkpoint file's hashes as kohya records its base model in a LoRA's metadata, by which the WebUIs match
    the LoRA to the model: `ss_sd_model_hash`, AUTOMATIC1111's old short hash (8 hex digits of the SHA-256 of the
    64 KiB from 1 MiB on), and `ss_new_sd_model_hash`, the SHA-256 of the whole file (whose first 10 digits are
    the WebUI's short hash now)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        old = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return {"ss_sd_model_hash": old, "ss_new_sd_model_hash": file_sha256(path)}


def write_skeleton(family: str, directory: str | os.PathLike, *, prediction_type: str, resolution: int,
                   zero_terminal_snr: bool = False, tokenizer_cache: str | os.PathLike | None = None) -> Path:
    """A diffusers config folder (no weights) for a full-size `family` model: the shipped JSON configs with the
    sample size and prediction type of this checkpoint, plus the CLIP tokenizer files. Pass it as `config=` to
    diffusers' `from_single_file`."""
    from .clip_vocab import clip_tokenizer_dir

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    directory = Path(directory)
    shutil.copytree(SKELETONS / family, directory, dirs_exist_ok=True)
    unet_config = directory / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    config["sample_size"] = resolution // 8
    unet_config.write_text(json.dumps(config, indent=2))
    vae_config = directory / "vae" / "config.json"
    config = json.loads(vae_config.read_text())
    config["sample_size"] = resolution
    vae_config.write_text(json.dumps(config, indent=2))
    scheduler_config = directory / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_config.read_text())
    config["prediction_type"] = prediction_type
    if zero_terminal_snr:
        config.update(ZERO_TERMINAL_SNR_SCHEDULER)
    scheduler_config.write_text(json.dumps(config, indent=2))
    for tokenizer in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        pad = "!" if family == "sd2" else _TOKENIZER_PAD[tokenizer]
        shutil.copytree(clip_tokenizer_dir(pad, tokenizer_cache), directory / tokenizer, dirs_exist_ok=True)
    return directory


def load_single_file(
    path: str | os.PathLike,
    *,
    prediction_type: str | None = None,
    allow_unsafe_pickle: bool = False,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    dtype_for: Callable[[int], torch.dtype] | None = None,
    tokenizer_cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Load a single-file checkpoint offline into diffusers components, on the CPU in `dtype` (or, with
    `dtype_for`, in the dtype it picks for the U-Net's parameter count, counted from the config before loading;
    SDXL's VAE stays fp32 under fp16 as `precision.vae_dtype` says).

    Returns `{"unet", "vae", "text_encoder", "tokenizer", ["text_encoder_2", "tokenizer_2"], "scheduler",
    "scheduler_config", "family", "prediction_type", "info"}` (`info`: the `CheckpointInfo`, print it).

    `config_dir`: a diffusers folder whose configs match this checkpoint's shapes (model_index.json, component
    config.json files, tokenizer(s), scheduler), used instead of the shipped full-size skeleton: for reduced
    or test-size models. Its scheduler's prediction type is used unless the checkpoint itself says otherwise
    (argument, `v_pred` key, metadata or .yaml). Nothing is downloaded: every config is a local file.
    """
    path = Path(path).expanduser()
    check_checkpoint_file(path, allow_unsafe_pickle)
    if path.suffix.lower() in SAFE_SUFFIXES:
        info = detect_checkpoint(path, prediction_type=prediction_type)  # header only: fails fast
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    else:
        state_dict, notes = read_pickle_checkpoint(path)
        info = detect_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, name=str(path),
                                  prediction_type=prediction_type, read_tensor=state_dict.get,
                                  sidecar_yaml=sidecar_yaml(path))
        info.evidence += notes

    with tempfile.TemporaryDirectory(prefix="sd_lora_skeleton_") as tmp:
        if config_dir is None:
            skeleton = write_skeleton(info.family, Path(tmp) / "skeleton", prediction_type=info.prediction_type,
                                      resolution=info.resolution, zero_terminal_snr=info.zero_terminal_snr,
                                      tokenizer_cache=tokenizer_cache)
        else:
            skeleton = _check_config_dir(Path(config_dir).expanduser(), info, path)
        if dtype_for is not None:
            from diffusers import UNet2DConditionModel

            dtype = dtype_for(parameter_count(UNet2DConditionModel, UNet2DConditionModel.load_config(str(skeleton / "unet"))))
        components = _load_components(state_dict, skeleton, info.family, path, dtype, shipped=config_dir is None)
        scheduler_config = json.loads((skeleton / "scheduler" / "scheduler_config.json").read_text())

    if config_dir is not None:
        vae_factor = 2 ** (len(components["vae"].config.block_out_channels) - 1)
        info.resolution = int(components["unet"].config.sample_size) * vae_factor
        info.evidence.append(f"configs and resolution {info.resolution} from {config_dir}")
        folder_pred = scheduler_config.get("prediction_type", "epsilon")
        if info.prediction_source in WEAK_SOURCES and folder_pred != info.prediction_type:
            info.prediction_type, info.prediction_source = folder_pred, "config"
            info.evidence.append(f"prediction type {folder_pred}: from {config_dir}/scheduler (no marker in the file)")
    scheduler_config["prediction_type"] = info.prediction_type
    if info.zero_terminal_snr:
        scheduler_config.update(ZERO_TERMINAL_SNR_SCHEDULER)
    components["scheduler"] = _scheduler(scheduler_config)
    components.update(scheduler_config=scheduler_config, family=info.family,
                      prediction_type=info.prediction_type, info=info)
    return components


def _check_config_dir(folder: Path, info: CheckpointInfo, path: Path) -> Path:
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"config folder {folder}: no model_index.json; pass a diffusers folder that matches {path.name}")
    try:
        model_index = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"config folder {folder}: cannot read model_index.json ({e})") from None
    wanted = set(TEXT_ENCODERS[info.family]) | {"unet", "vae", "scheduler", "tokenizer"}
    if info.family == "sdxl":
        wanted.add("tokenizer_2")
    missing = sorted(c for c in wanted if not (folder / c).is_dir())
    if missing or (("text_encoder_2" in model_index) != (info.family == "sdxl")):
        raise UserError(f"config folder {folder} does not fit the {info.family} checkpoint {path.name}"
                        + (f" (no {', '.join(m + '/' for m in missing)})" if missing else " (text encoder count differs)"))
    return folder


def conversion_error(e: Exception) -> str:
    """The first line of an error diffusers' single-file conversion raised, at most 300 characters, without the
    advice it appends for its own API."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return message.split(" If you want to instead overwrite")[0][:300]


def _load_components(state_dict: dict, skeleton: Path, family: str, path: Path, dtype: torch.dtype,
                     shipped: bool = True) -> dict[str, Any]:
    """Each component through diffusers' single-file conversion, as `<Pipeline>.from_single_file` does it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    config = str(skeleton)
    # float32: no torch_dtype, so diffusers casts each tensor to the freshly built module's float32 (its
    # ModelMixin.to would warn on every dtype cast); other dtypes are cast tensor by tensor while loading.
    torch_dtype = None if dtype == torch.float32 else dtype
    vae_torch_dtype = None if vae_dtype(family, dtype) == torch.float32 else dtype
    try:
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_single_file(state_dict, config=config, subfolder="unet",
                                                          local_files_only=True, torch_dtype=torch_dtype),
            "vae": AutoencoderKL.from_single_file(state_dict, config=config, subfolder="vae",
                                                  local_files_only=True, torch_dtype=vae_torch_dtype),
        }
        for name in TEXT_ENCODERS[family]:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            parts[name] = create_diffusers_clip_model_from_ldm(cls, state_dict, subfolder=name, config=config,
                                                               local_files_only=True, torch_dtype=torch_dtype)
            tokenizer = "tokenizer_2" if name == "text_encoder_2" else "tokenizer"
            parts[tokenizer] = CLIPTokenizer.from_pretrained(str(skeleton / tokenizer))
    except (ValueError, RuntimeError, KeyError, OSError) as e:  # shape mismatches, missing keys, bad configs
        message = conversion_error(e)
        if shipped:
            cause = (f"the file is damaged or its architecture differs from standard {family}; if it is a {family} model "
                     "of another size, pass --model-config with a diffusers folder of its architecture (configs and tokenizer)")
        else:  # the user's config folder is the likelier culprit than the file
            cause = (f"the config folder {skeleton} does not describe this file's architecture (or the file is damaged); "
                     f"give the diffusers folder this {family} checkpoint was made from instead")
        raise UserError(f"{path}: cannot load as {family} ({message}); {cause}") from None
    for name, module in parts.items():
        if isinstance(module, torch.nn.Module):
            empty = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
            if empty:
                raise UserError(f"{path}: the checkpoint has no weights for {len(empty)} {name} tensors "
                                f"(e.g. {', '.join(empty[:3])}); the file is incomplete or not standard {family}")
    return parts


def _scheduler(config: dict):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    return cls.from_config(config)


# ---------------------------------------------------------------------------------------------- writing


def infer_family(components: Mapping[str, Any]) -> str:
    """"sdxl" with a second text encoder; else "sd2" for OpenCLIP's text encoder (GELU), "sd1" for OpenAI's
    CLIP (quick GELU). The text encoder decides because it decides the checkpoint layout (OpenCLIP or CLIP)."""
    if components.get("text_encoder_2") is not None:
        return "sdxl"
    return "sd2" if components["text_encoder"].config.hidden_act == "gelu" else "sd1"


def save_single_file(
    components: Mapping[str, Any],
    path: str | os.PathLike,
    family: str | None = None,
    *,
    prediction_type: str | None = None,
    metadata: Mapping[str, str] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write diffusers components as one `.safetensors` checkpoint that A1111, ComfyUI and diffusers load.

    `components`: `pipe.components` or a dict with `unet`, `vae`, `text_encoder`, [`text_encoder_2`] and
    optionally `scheduler`; `family` defaults to `infer_family(components)`. The prediction type is
    `prediction_type`, else the scheduler's. v-prediction models get a `v_pred` key (and `ztsnr` when the
    scheduler has `rescale_betas_zero_snr`), the markers ComfyUI reads, plus `modelspec.prediction_type`. `extra_tensors` are copied unchanged
    (e.g. keys of a source checkpoint the diffusers modules do not hold, such as SD2's unused 24th text layer).
    `dtype` casts floating tensors (e.g. torch.float16 for a half-size file). Written atomically.

    Sharp edge: LoRA must be merged and unloaded first; a module with PEFT layers is refused.
    """
    path = Path(path)
    family = family or infer_family(components)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors only")
    for name in ("unet", *TEXT_ENCODERS[family]):
        if any("lora_" in n or ".base_layer." in n for n, _ in components[name].named_parameters()):
            raise ValueError(f"{name} has LoRA layers; merge and unload them before writing a checkpoint")
    scheduler_config = dict(getattr(components.get("scheduler"), "config", None) or {})
    pred = prediction_type or scheduler_config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be epsilon or v_prediction, got {pred!r}")
    tensors = checkpoint_state_dict(components, family)
    if pred == "v_prediction":
        tensors["v_pred"] = torch.zeros(0)
        if scheduler_config.get("rescale_betas_zero_snr"):
            tensors["ztsnr"] = torch.zeros(0)
    for key, tensor in (extra_tensors or {}).items():
        if key in tensors:
            raise ValueError(f"extra tensor {key!r} would overwrite a converted weight")
        tensors[key] = tensor
    tensors = _for_saving(tensors, dtype)

    unet, vae = components["unet"], components["vae"]
    resolution = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    architecture = ARCHITECTURES[family]
    if family == "sd2" and pred == "v_prediction":
        architecture = "stable-diffusion-v2-768-v"
    header = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": readable(path.stem),  # metadata must be UTF-8; a file name need not be
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
    }
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    _atomic_save(tensors, path, header)
    return path


def _for_saving(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing storage (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device (no data); load real weights before saving")
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ident in seen:
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[key] = t
    return out


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # In a temporary folder, not a temporary file: save_file replaces the file it is given (a new inode), which would
    # drop the lock that tells `fsio.remove_abandoned` the write is alive; the folder keeps it.
    with temporary_beside(path, folder=True) as tmp:  # removed if the save fails
        saved = tmp / path.name
        save_file(tensors, str(saved), metadata=metadata)
        with open(saved, "rb") as f:
            os.fsync(f.fileno())
        usual_permissions(saved)
        os.replace(saved, path)
        tmp.rmdir()
