"""What a single-file Stable Diffusion checkpoint is, from its names and shapes: family, prediction type,
resolution, and the evidence for each (`CheckpointInfo`); and reading the file safely.

`detect_checkpoint` reads only the safetensors header (one tensor more for SD2's v-prediction statistic); see
`detect_from_shapes` for the rules. Pickled checkpoints (`.ckpt`, `.pt`, ...) can run arbitrary code when
unpickled, so they are read only when the caller allows it, and then with `torch.load(weights_only=True)` first.
`models.single_file` loads and writes what this module recognises.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint_layout import TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIXES
from .streaming import read_header

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONTEXT_DIMS = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}  # SD2: 768 when v-prediction (SD2.x-768-v)

# ComfyUI's SD2 rule (comfy/supported_models.py, SD20.model_type): this bias is spread wider in v-models.
SD2_V_STAT_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STAT_THRESHOLD = 0.09
_NAME_HINT_V = re.compile(r"(?:^|[-_ .])(?:v[-_ ]?pred(?:iction)?|768[-_ ]?v)(?:[-_ .]|$)", re.IGNORECASE)
_YAML_V = re.compile(r"^\s*parameterization\s*:\s*['\"]?v['\"]?\s*(?:#.*)?$", re.MULTILINE)
# A zero-terminal-SNR model's scheduler (Lin et al. 2024, arXiv:2305.08891): betas rescaled so that the last
# step has SNR 0, and "trailing" spacing so that sampling starts at that step (t = 999), not at 951 as "leading" does.
ZERO_TERMINAL_SNR_SCHEDULER = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
WEAK_SOURCES = ("statistic", "file name", "default")  # prediction-type evidence a config folder may overrule


@dataclass
class CheckpointInfo:
    """What a checkpoint is, and why we think so (`evidence`, one line per fact, for printing)."""

    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    resolution: int  # native side in pixels
    evidence: list[str] = field(default_factory=list)
    zero_terminal_snr: bool = False  # a `ztsnr` key: trained with zero terminal SNR (rescaled betas)
    prediction_source: str = "default"  # "argument" | "key" | "metadata" | "yaml" | "config" | WEAK_SOURCES

    def describe(self) -> str:
        ztsnr = ", zero terminal SNR" if self.zero_terminal_snr else ""
        head = f"{self.family}, {self.prediction_type}{ztsnr}, {self.resolution}px"
        return "\n".join([head] + [f"  - {line}" for line in self.evidence])

    def __str__(self) -> str:
        return self.describe()


# ---------------------------------------------------------------------------------------------- detection


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) from a `.safetensors` header, without reading any tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, _ = read_header(f, path.stat().st_size)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid .safetensors file ({e}); the download may be incomplete") from None
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(int(d) for d in v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}
    return shapes, {str(k): str(v) for k, v in metadata.items()}


def detect_checkpoint(path: str | os.PathLike, *, prediction_type: str | None = None,
                      allow_unsafe_pickle: bool = False) -> CheckpointInfo:
    """Family, prediction type and resolution of a single-file checkpoint (names and shapes; one tensor for SD2)."""
    path = Path(path).expanduser()
    check_checkpoint_file(path, allow_unsafe_pickle)
    if path.suffix.lower() in SAFE_SUFFIXES:
        shapes, metadata = read_safetensors_header(path)
        return detect_from_shapes(shapes, metadata=metadata, name=str(path), prediction_type=prediction_type,
                                  read_tensor=lambda key: _read_one_tensor(path, key), sidecar_yaml=sidecar_yaml(path))
    state_dict, notes = read_pickle_checkpoint(path)
    info = detect_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, name=str(path),
                              prediction_type=prediction_type, read_tensor=state_dict.get, sidecar_yaml=sidecar_yaml(path))
    info.evidence += notes
    return info


def detect_from_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    metadata: Mapping[str, str] | None = None,
    name: str = "checkpoint",
    prediction_type: str | None = None,
    read_tensor: Callable[[str], torch.Tensor | None] | None = None,
    sidecar_yaml: Path | None = None,
) -> CheckpointInfo:
    """Detect from key -> shape (plus the safetensors metadata and, for SD2's heuristic, one tensor).

    Family, from the text encoders' key prefixes (the U-Net's keys are the same across families):
      - SDXL: `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG) and the U-Net's `label_emb` (text_time)
      - SD2.x: `cond_stage_model.model.*` (OpenCLIP ViT-H)
      - SD1.x: `cond_stage_model.transformer.*` (CLIP ViT-L)
    The cross-attention width (`attn2.to_k` input: 768 / 1024 / 2048) is reported as corroboration.

    Prediction type, first hit wins (the source is kept in `prediction_source`):
      1. `prediction_type` argument (the user's `--prediction-type`)
      2. a `v_pred` key (ComfyUI's convention, NoobAI-style v-pred SDXL; `ztsnr` adds zero terminal SNR)
      3. safetensors metadata `modelspec.prediction_type` (`v` / `epsilon`), which our writer sets
      4. an A1111 sidecar `<name>.yaml` with `parameterization: "v"` (without it: epsilon)
      5. SD2 only: ComfyUI's heuristic, std of `output_blocks.11.1.transformer_blocks.0.norm1.bias` > 0.09
      6. a file-name hint (`v-pred`, `vpred`, `768-v`)
      7. epsilon. SD2 768-v and 512-base checkpoints have identical keys, so an SD2 file that reaches this
         step says so in the evidence and asks for `--prediction-type`.
    Resolution: metadata `modelspec.resolution`, else 512 (SD1, SD2 epsilon), 768 (SD2 v), 1024 (SDXL).
    """
    metadata = dict(metadata or {})
    keys = set(shapes)
    prefixes = {k.split(".", 1)[0] for k in keys}
    first_conv = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first_conv is None:
        raise UserError(_not_a_checkpoint(name, keys, prefixes))
    if len(first_conv) != 4 or first_conv[1] != 4:
        channels = first_conv[1] if len(first_conv) > 1 else "?"
        raise UserError(f"{name}: the U-Net takes {channels} input channels (an inpainting or instruct-pix2pix "
                        "model?); only text-to-image checkpoints with 4 latent channels can be trained")

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    evidence = []
    if has("conditioner.embedders.1.model.") and UNET_PREFIX + "label_emb.0.0.weight" in keys:
        family = "sdxl"
        evidence.append("conditioner.embedders.1.model.* (OpenCLIP ViT-bigG) and U-Net label_emb: SDXL")
    elif has("conditioner.embedders.0.model."):
        raise UserError(f"{name}: an SDXL refiner checkpoint (one OpenCLIP text encoder, no CLIP ViT-L); "
                        "LoRAs are trained on a base model: pass an SDXL base checkpoint")
    elif has("cond_stage_model.model."):
        family = "sd2"
        evidence.append("cond_stage_model.model.* (OpenCLIP ViT-H text encoder): SD2.x")
    elif has("cond_stage_model.transformer."):
        family = "sd1"
        evidence.append("cond_stage_model.transformer.* (CLIP ViT-L text encoder): SD1.x")
    else:
        raise UserError(f"{name}: has a U-Net (model.diffusion_model.*) but no text encoder "
                        "(cond_stage_model.* or conditioner.embedders.*); a U-Net-only file cannot be trained. "
                        "Pass a full checkpoint or a diffusers folder")
    missing = [p for p in _required_prefixes(family) if not has(p)]
    if missing == [VAE_PREFIXES[0]] and has(VAE_PREFIXES[1]):
        missing = []
    if missing:
        raise UserError(f"{name}: {family} checkpoint without {', '.join(p + '*' for p in missing)} "
                        "(a pruned or partial file); pass a full checkpoint with U-Net, VAE and text encoders")

    context = next((s[-1] for k, s in sorted(shapes.items())
                    if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and s), None)
    standard = context == CONTEXT_DIMS[family]
    evidence.append(f"cross-attention context width {context}" +
                    ("" if standard else f" (not {CONTEXT_DIMS[family]}: a non-standard or test-size model)"))

    ztsnr = "ztsnr" in keys
    pred, source, why = _prediction_type(family, keys, metadata, name, prediction_type, read_tensor, sidecar_yaml)
    evidence.append(f"prediction type {pred}: {why}")
    if ztsnr:
        evidence.append("`ztsnr` key: trained with zero terminal SNR")

    resolution = _metadata_resolution(metadata)
    if resolution is not None:
        evidence.append(f"resolution {resolution}: metadata modelspec.resolution")
    else:
        resolution = 768 if family == "sd2" and pred == "v_prediction" else DEFAULT_RESOLUTION[family]
        evidence.append(f"resolution {resolution}: the {family} default" +
                        (" for v-prediction (SD2.x-768-v)" if family == "sd2" else ""))
    return CheckpointInfo(family, pred, resolution, evidence, zero_terminal_snr=ztsnr, prediction_source=source)


def _prediction_type(family, keys, metadata, name, override, read_tensor, sidecar_yaml) -> tuple[str, str, str]:
    """(prediction type, source, human-readable reason); see `detect_from_shapes` for the order."""
    if override is not None:
        if override not in ("epsilon", "v_prediction"):
            raise UserError(f"--prediction-type {override}: must be epsilon or v_prediction")
        return override, "argument", "set by --prediction-type"
    if "v_pred" in keys:
        return "v_prediction", "key", "`v_pred` key in the checkpoint (ComfyUI/NoobAI convention)"
    spec = metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "metadata", f"metadata modelspec.prediction_type = {spec!r}"
    if spec in ("epsilon", "eps"):
        return "epsilon", "metadata", f"metadata modelspec.prediction_type = {spec!r}"
    if sidecar_yaml is not None and sidecar_yaml.is_file():
        try:
            text = sidecar_yaml.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = None
        if text is not None:
            v = bool(_YAML_V.search(text))
            return ("v_prediction" if v else "epsilon"), "yaml", (
                f"{sidecar_yaml.name} beside the checkpoint " + ("has parameterization: v" if v else "has no parameterization: v"))
    if family == "sd2" and read_tensor is not None and SD2_V_STAT_KEY in keys:
        bias = read_tensor(SD2_V_STAT_KEY)
        if bias is not None:
            std = float(torch.std(bias.float(), unbiased=False))
            v = std > SD2_V_STAT_THRESHOLD
            return ("v_prediction" if v else "epsilon"), "statistic", (
                f"std of output_blocks.11.1...norm1.bias = {std:.3f} {'>' if v else '<='} {SD2_V_STAT_THRESHOLD} "
                "(ComfyUI's SD2 heuristic; pass --prediction-type to overrule)")
    stem = Path(name).stem
    if _NAME_HINT_V.search(stem):
        return "v_prediction", "file name", f"the file name {stem!r} says v-prediction (pass --prediction-type to overrule)"
    if family == "sd2":
        return "epsilon", "default", ("no marker found; SD2 768-v and 512-base checkpoints have identical keys, so "
                                      "this assumes epsilon: pass --prediction-type v_prediction for a 768-v model")
    return "epsilon", "default", "no v-prediction marker (v_pred key, metadata, .yaml)"


def _metadata_resolution(metadata: Mapping[str, str]) -> int | None:
    match = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+)\s*)?", metadata.get("modelspec.resolution", ""))
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def _required_prefixes(family: str) -> list[str]:
    vae = "first_stage_model."  # "vae." is accepted in its place below
    return [UNET_PREFIX, vae] + [prefix.split("text_model.")[0] for _, prefix in TEXT_ENCODERS[family].values()]


def _not_a_checkpoint(name: str, keys: set[str], prefixes: set[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) and "lora" in k for k in keys):
        return f"{name}: is a LoRA file, not a base model; pass it to the tools that take LoRAs"
    if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in keys):
        return (f"{name}: holds one diffusers component (diffusers key names), not a single-file checkpoint; "
                "pass the diffusers folder that contains it (with model_index.json)")
    if any(k.startswith(UNET_PREFIX + p) for k in keys for p in ("joint_blocks", "double_blocks")):
        return f"{name}: an SD3/Flux-family checkpoint; supported are SD1.x, SD2.x and SDXL"
    shown = ", ".join(sorted(prefixes)[:6])
    return (f"{name}: not a Stable Diffusion checkpoint (no model.diffusion_model.input_blocks.0.0.weight; "
            f"top-level names: {shown}); supported are SD1.x, SD2.x and SDXL single-file checkpoints")


# ---------------------------------------------------------------------------------------------- reading


def check_checkpoint_file(path: Path, allow_unsafe_pickle: bool) -> None:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_unsafe_pickle:
            raise UserError(
                f"{path}: {suffix} files are Python pickles, and loading a pickle can run arbitrary code "
                "hidden in it. Convert the file to .safetensors (or download the .safetensors version), or, if "
                "you trust its source, pass --allow-unsafe-pickle")
    elif suffix not in SAFE_SUFFIXES:
        raise UserError(f"{path}: unknown checkpoint type {suffix!r}; expected "
                        f"{', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)}")


def read_pickle_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a pickled checkpoint: `weights_only=True` first, full unpickling only if that refuses.

    Only call this after the user allowed pickles (`_check_file`). Returns the flat state dict (unwrapped from
    `{"state_dict": ...}`, non-tensor entries such as `global_step` dropped) and notes on how it was read.
    """
    import pickle
    import zipfile

    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        notes = ["read with torch.load(weights_only=True)"]
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as e2:  # noqa: BLE001 - any failure of a foreign pickle is the file's problem
            raise UserError(f"{path}: cannot unpickle ({type(e2).__name__}: {e2})") from None
        notes = [f"read with full unpickling, as --allow-unsafe-pickle permits (weights_only refused: {first[:120]})"]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); the file may be "
                        "damaged or incomplete") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise UserError(f"{path}: holds no tensors (a {type(obj).__name__}); not a model checkpoint")
    return tensors, notes


def _read_one_tensor(path: Path, key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key) if key in f.keys() else None


def sidecar_yaml(path: Path) -> Path:
    return path.with_suffix(".yaml")
