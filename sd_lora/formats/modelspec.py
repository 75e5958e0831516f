"""Model-family metadata for a LoRA file: kohya's `ss_base_model_version` / `ss_v2` and Stability's modelspec.

A1111 decides a LoRA's family from `ss_base_model_version` / `ss_v2` and hides LoRAs that do not match the
loaded checkpoint, so these must be right. Values follow kohya sd-scripts (`library/sai_model_spec.py`,
`get_model_version_str_for_sd1_sd2`): architecture `stable-diffusion-v1/lora`, `stable-diffusion-v2-512/lora`
(SD2 epsilon) or `stable-diffusion-v2-768-v/lora` (SD2 v-prediction), implementation `diffusers` for SD1/SD2
LoRA, prediction type `epsilon` or `v`. Every value is a string (the safetensors header allows nothing else).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' scheduler names
MODELSPEC_VERSION = "1.0.1"
# kohya's ss_base_model_version per family (epsilon prediction; `family_metadata` adds `_v` for v-prediction)
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def missing_family_metadata(metadata: Mapping[str, str], family: str | None) -> dict[str, str]:
    """`ss_base_model_version` / `ss_v2` for `family`, each when `metadata` lacks it; {} when it has both or the
    family is unknown. For the tools that rewrite existing files (`convert`, `merge`, `resize`): A1111 takes an
    SDXL LoRA without `ss_base_model_version`, and an SD2 LoRA without `ss_v2` = "True" (its only SD2 test, whatever
    `ss_base_model_version` says), for SD1 and hides it on the right checkpoints. What the file already says is
    never changed (e.g. `sd_v2_v`, which the keys cannot tell from `sd_v2`). An SD1 / SD2 file whose modelspec
    says v-prediction (`modelspec.prediction_type` `v`, or the `stable-diffusion-v2-768-v` architecture) gets the
    `_v` version kohya writes for it, not a version that contradicts its own modelspec.
    """
    if family is None:
        return {}
    added = {}
    if "ss_base_model_version" not in metadata:
        v_pred = (metadata.get("modelspec.prediction_type") == "v"
                  or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-v2-768-v"))
        added["ss_base_model_version"] = BASE_MODEL_VERSIONS[family] + ("_v" if v_pred and family != "sdxl" else "")
    if "ss_v2" not in metadata:
        added["ss_v2"] = str(family == "sd2")
    return added



def family_metadata(
    *, family: str, prediction_type: str, resolution: tuple[int, int], title: str, date: datetime | str
) -> dict[str, str]:
    """The family-dependent metadata of a LoRA file for `family` ("sd1" | "sd2" | "sdxl").

    `resolution` is (width, height) of training; `date` a datetime (written as ISO 8601 to the second) or an
    ISO 8601 string (checked, written unchanged). An SD1 model fine-tuned for v-prediction is written the way
    kohya writes it: `ss_base_model_version` `sd_v1_v`, architecture `stable-diffusion-v1/lora`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
    width, height = resolution
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ValueError(f"resolution must be two positive integers (width, height), got {resolution!r}")
    if not isinstance(title, str):
        raise TypeError(f"title must be a string, got {type(title).__name__}")
    v_pred = prediction_type == "v_prediction"

    implementation = "diffusers"
    if family == "sdxl":
        # kohya writes sdxl_base_v1-0 for every SDXL-architecture model (v-prediction ones too: the
        # prediction type goes in modelspec); A1111 recognises SDXL LoRAs by the "sdxl_" prefix.
        version, architecture = BASE_MODEL_VERSIONS["sdxl"], "stable-diffusion-xl-v1-base"
        implementation = "https://github.com/Stability-AI/generative-models"
    else:
        version = BASE_MODEL_VERSIONS[family]
        if v_pred:
            version += "_v"
        if family == "sd1":
            architecture = "stable-diffusion-v1"
        else:
            architecture = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    return {
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": _iso_date(date),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }


def _iso_date(date: datetime | str) -> str:
    if isinstance(date, datetime):
        return date.replace(microsecond=0).isoformat()
    try:
        datetime.fromisoformat(date)
    except (TypeError, ValueError):
        raise ValueError(f"date must be a datetime or an ISO 8601 string, got {date!r}") from None
    return date
