"""Write the trained LoRA as a portable kohya/WebUI `.safetensors` with its metadata.

This is where training facts (config, dataset, model family, progress) meet the file format: the
format module itself (`formats.kohya`) knows nothing about training.
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .config import TrainConfig
from .formats.diffusers_format import save_diffusers_lora_file, to_diffusers_state_dict
from .formats.kohya import save_lora_file, to_kohya_state_dict
from .formats.modelspec import family_metadata
from .formats.sgm import sgm_module_map
from .lora.inject import lora_weights
from .optim import kohya_description

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def trained_modules(model, train_text_encoder: bool) -> dict[str, torch.nn.Module]:
    """The plain (never DDP-wrapped) modules that carry trained LoRA, by component name: "unet", and
    "text_encoder" (SD1/SD2) or "text_encoder_1" + "text_encoder_2" (SDXL) when they were trained."""
    modules = {"unet": model.unet}
    if train_text_encoder:
        names = ["text_encoder_1", "text_encoder_2"] if model.family == "sdxl" else ["text_encoder"]
        modules.update(zip(names, model.text_encoders))
    return modules


def lora_components(model, train_text_encoder: bool) -> dict:
    """{component: {module path: LoraModuleWeights}} for every module that carries LoRA."""
    return {name: lora_weights(module) for name, module in trained_modules(model, train_text_encoder).items()}


def sgm_paths(model) -> dict[str, str] | None:
    """SDXL U-Net modules are written under kohya's original Stability (SGM) names."""
    return sgm_module_map(model.unet) if model.family == "sdxl" else None


def new_session_id() -> int:
    """kohya's `ss_session_id`: a random integer in [0, 2**32] per training process, which tells the files of one
    session from another's; a resumed run is a new session, as in kohya (unlike `ss_training_started_at`, which
    keeps the run's first start). Drawn from the OS: the `random` module is seeded with --seed, so every run of a
    seed would share its id."""
    return random.SystemRandom().randint(0, 2**32)


def training_metadata(
    config: TrainConfig,
    *,
    family: str,
    prediction_type: str,
    run_metadata: dict[str, str],
    started_at: float,
    step: int,
    epoch: int,
    total_steps: int | None = None,
    total_epochs: int | None = None,
    targets: str | None = None,
    processes: int = 1,
    session_id: int | None = None,
) -> dict[str, str]:
    """All metadata strings for one saved file: options, the run's own (`run_metadata`: the dataset's, the base
    model file's hashes), family/modelspec, progress. `total_steps` and `total_epochs`: the run's length as
    trained (kohya writes both, whichever option set it); `targets`: the preset the U-Net modules match (default:
    --targets); `processes`: the run's processes (GPUs), which multiply the images per optimizer step (kohya's
    `ss_total_batch_size`); `session_id`: the process's `new_session_id`."""
    resolution = (config.resolution, config.resolution)
    meta = config.ss_metadata()
    meta.update(run_metadata)
    meta.update(
        family_metadata(
            family=family,
            prediction_type=prediction_type,
            resolution=resolution,
            title=config.output_name,
            date=datetime.fromtimestamp(started_at, tz=timezone.utc),
        )
    )
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_optimizer": kohya_description(config.optimizer, config.weight_decay),
            "ss_network_args": json.dumps({"targets": targets or config.targets, "train_text_encoder": config.train_text_encoder}),
            "ss_resolution": str(resolution),
            "ss_training_started_at": str(started_at),
            "ss_training_finished_at": str(time.time()),
            "ss_steps": str(step),
            "ss_total_batch_size": str(config.batch_size * config.gradient_accumulation_steps * processes),
            "ss_epoch": str(epoch),
            "ss_text_encoder_trained": str(config.train_text_encoder),  # kohya writes it implicitly via network_train_*_only
            "sd_lora_config": json.dumps(config.to_dict(public=True), default=str),  # basenames: files get shared
        }
    )
    if session_id is not None:
        meta["ss_session_id"] = str(session_id)
    if total_steps is not None:
        meta["ss_max_train_steps"] = str(total_steps)
    if total_epochs is not None:
        meta["ss_num_epochs"] = str(total_epochs)
    return meta


def export_lora(path: Path, components: dict, metadata: dict[str, str], save_precision: str, *, sgm_paths=None,
                file_format: str = "kohya") -> list[Path]:
    """Write `path` in the kohya profile and/or `<stem>-diffusers.safetensors` in the diffusers profile
    (`file_format` kohya | diffusers | both), tensors in `save_precision`, metadata plus `sshs_model_hash`,
    each written atomically. Returns the paths written."""
    dtype = SAVE_DTYPES[save_precision]
    written = []
    if file_format in ("kohya", "both"):
        written.append(save_lora_file(path, to_kohya_state_dict(components, dtype=dtype, sgm_paths=sgm_paths), metadata))
    if file_format in ("diffusers", "both"):
        target = path if file_format == "diffusers" else path.with_name(f"{path.stem}-diffusers{path.suffix}")
        written.append(save_diffusers_lora_file(target, to_diffusers_state_dict(components, dtype), baked_metadata(metadata, components)))
    return written


def baked_metadata(metadata: dict[str, str], components: dict) -> dict[str, str]:
    """`metadata` for the diffusers profile, whose lora_B has alpha / r baked in (the file means alpha = r):
    ss_network_alpha says the rank, as `convert --to diffusers` writes it, not the alpha the factors no longer need."""
    ranks = {w.rank for modules in components.values() for w in modules.values()}
    if "ss_network_alpha" not in metadata or len(ranks) != 1:
        return metadata
    return {**metadata, "ss_network_alpha": str(float(ranks.pop()))}
