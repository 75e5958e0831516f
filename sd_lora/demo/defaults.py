"""The demo's defaults: the built-in base model and the training options tuned for it.

`python -m sd_lora.train --data datasets/chars`, with no other flag, trains on `BASE_MODEL_DIR` with
`DEFAULT_OPTIONS`: a few minutes on two CPU cores, and the zkchar character visibly appears in the samples
(`python -m sd_lora.demo.evaluate FILE` measures it).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE_MODEL_DIR = HERE / "base_model"
"""The demo base model: a small SD1-architecture diffusers folder pretrained on the toy world
(`python -m sd_lora.demo.pretrain` reproduces it)."""

SAMPLE_PROMPTS = HERE / "sample_prompts.txt"
"""The trigger alone, with backgrounds `datasets/chars` never shows, and one prompt without the trigger."""

# Option name (a `TrainConfig` field) -> value, for a run without --model. Options the user sets win.
DEFAULT_OPTIONS: dict[str, object] = {
    "resolution": 64,
    "max_steps": 300,
    "batch_size": 4,
    "rank": 8,
    "learning_rate": 1e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 20,
    "flip": True,
    "sample_prompts": SAMPLE_PROMPTS,
    "sample_every": 100,
    "sample_steps": 20,
    "sample_cfg": 5.0,
}


def default_arguments() -> list[str]:
    """`DEFAULT_OPTIONS` as command-line flags (after `--model BASE_MODEL_DIR`): the default run, spelled out."""
    args = ["--model", str(BASE_MODEL_DIR)]
    for name, value in DEFAULT_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args
