"""The demo's defaults: the built-in base model and the training options tuned for it.

`python -m sd_lora.train --data datasets/chars`, with no other flag, trains on `BASE_MODEL_DIR` with
`DEFAULT_OPTIONS`: a few minutes on two CPU cores, and the zkchar character visibly appears in the samples
(`python -m sd_lora.demo.evaluate FILE` measures it).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..options import TrainConfig

HERE = Path(__file__).resolve().parent
BASE_MODEL_DIR = HERE / "base_model"
"""The demo base model: a small SD1-architecture diffusers folder pretrained on the toy world
(`python -m sd_lora.demo.pretrain` reproduces it)."""

SAMPLE_PROMPTS = HERE / "sample_prompts.txt"
"""The trigger alone, with backgrounds `datasets/chars` never shows, and one prompt without the trigger."""

REGULARIZATION_DIR = HERE / "regularization"
"""120 captioned toy-world scenes (`world.write_regularization_set`): trained beside zkchar as prior
preservation, they keep what the base draws for world prompts (without them every prompt drifts)."""

# Option name (a `TrainConfig` field) -> value, for a run without --model. Options the user sets win.
# Tuned on the demo base: min-SNR weighting and noise offset (as the base was pretrained) let the robot's
# shape form; the text-encoder LoRA binds the new words; tag dropout (keeping the trigger) teaches that
# "zkchar" alone means the robot (without it: 6% instead of 17% of trigger images); the regularisation scenes
# hold prior drift down. 1000 steps: 600 found the robot in 11%, 1000 in 17% (rank 32 or lr 5e-3: no better).
# On the batch-64 base: 17% with --prior-loss-weight 1, 0.25, 0.1 or 0.05 alike, drift 0.075; without the
# regularisation scenes 44%, but drift 0.29 (two seeds of the base differ by 0.124).
# One CPU thread: this model's ops are too small to share out (1000 steps took 2 min 56 s on one thread, the same as
# on two idle cores), and two threads on a busy 2-core machine wait on each other: the whole default command took
# 3 min 45 s with --threads 1 and 7 min 19 s with --threads 2, back to back.
DEFAULT_OPTIONS: dict[str, object] = {
    "threads": 1,
    "resolution": 64,
    "max_steps": 1000,
    "batch_size": 4,
    "rank": 16,
    "learning_rate": 3e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 20,
    "train_text_encoder": True,
    "min_snr_gamma": 5.0,
    "noise_offset": 0.1,
    "flip": True,
    "tag_dropout": 0.5,
    "keep_tokens": 1,
    "reg_data": REGULARIZATION_DIR,
    "sample_prompts": SAMPLE_PROMPTS,
    "sample_every": 500,
    "sample_steps": 20,
    "sample_cfg": 5.0,
}


def demo_options(explicit: dict[str, object]) -> dict[str, object]:
    """The options a run without --model gets: the demo base and `DEFAULT_OPTIONS`, less those `explicit`
    (the options the user set) decides, and less the demo defaults that only fit what the user changed: a
    user's --epochs replaces the demo's --max-steps and its warm-up (the run's length is not known until the
    data is scanned), an --init-weights file decides the rank and whether the text encoder trains, a shorter
    --max-steps gets a proportionally shorter warm-up, --lr-scheduler constant (which cannot warm up) none,
    --optimizer prodigy its own learning rate (1.0, set by `config.load_config` before this), and with tag
    dropout off (no --shuffle-tags) there is no first tag to keep. So a problem found in the options is always
    about a value the user set."""
    options: dict[str, object] = {"model": str(BASE_MODEL_DIR)}
    for name, value in DEFAULT_OPTIONS.items():
        if name in explicit or (name == "max_steps" and "epochs" in explicit):
            continue
        if name in ("rank", "train_text_encoder") and "init_weights" in explicit:
            continue  # the --init-weights file decides them
        options[name] = value
    if not explicit.get("tag_dropout", DEFAULT_OPTIONS["tag_dropout"]) and not explicit.get("shuffle_tags"):
        options.pop("keep_tokens", None)
    steps = explicit.get("max_steps")
    if "lr_warmup_steps" not in explicit and isinstance(steps, int):
        if steps > 0:
            options["lr_warmup_steps"] = min(int(DEFAULT_OPTIONS["lr_warmup_steps"]), steps // 10)
        else:  # refused for itself; no warm-up problem on top of it
            options.pop("lr_warmup_steps", None)
    if "lr_warmup_steps" not in explicit and "epochs" in explicit:
        options.pop("lr_warmup_steps", None)
    if "lr_warmup_steps" not in explicit and explicit.get("lr_scheduler") == "constant":
        options.pop("lr_warmup_steps", None)
    return options


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


def is_demo_base(model: str | None) -> bool:
    return model is not None and Path(model).resolve() == BASE_MODEL_DIR


def announce_demo(config: TrainConfig, show: bool = True) -> None:
    """Refuse if the demo base is missing; else (with `show`) say that the run uses it, with the demo options in effect."""
    if not (BASE_MODEL_DIR / "model_index.json").is_file():
        raise UserError(f"no --model given and the demo base model is missing from {BASE_MODEL_DIR}; reinstall sd_lora, "
                        "rebuild it with python -m sd_lora.demo.pretrain, or pass --model")
    if not show:
        return
    shown = ", ".join(f"{name.replace('_', '-')} {getattr(config, name)}" for name in DEFAULT_OPTIONS
                      if name not in ("sample_prompts", "reg_data"))
    print(f"no --model: training the built-in demo base model ({BASE_MODEL_DIR.name}, a 64 px toy world) with {shown}; "
          "pass --model to train your own base model")
