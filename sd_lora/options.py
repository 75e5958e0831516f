"""Training options: one typed declaration per option.

Each field of `TrainConfig` is declared once with `option(...)`; from that declaration come the CLI flag
(`learning_rate` -> `--learning-rate`), the TOML key (`learning-rate`, `learning_rate` also accepted), the
`--help` text, validation of type, choices and range (`config.py`, which reads options from the command line
and TOML files), and the `ss_*` metadata key written into the LoRA file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compiling import COMPILE_MODES
from .fsio import public_name
from .sampling.prompts import MAX_CFG, MAX_STEPS
from .sampling.prompts import OPTION_FLAGS as PROMPT_OPTION_FLAGS
from .sampling.samplers import NAMES as SAMPLERS

LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
TARGET_PRESETS = ("attn-mlp", "attn", "cross-attn")
DEFAULT_RANK = 16
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")  # optim.py builds each; a test keeps them in step
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
FORMATS = ("kohya", "diffusers", "both")


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    ss: str | None = None,
    metavar: str | None = None,
    group: str = "training",
    fixed: bool = False,
    local_path: bool = False,
) -> Any:
    """Declare one option. `ss` names the kohya metadata key it is saved under, if any; `fixed` options
    cannot change when a run is resumed (the saved state would not fit them); `local_path` marks a string
    option that may name a file or folder on this machine (`Path` options are paths anyway), which the LoRA
    file's metadata records by its basename only (see `public_name`)."""
    meta = dict(
        help=help, choices=choices, min=min, max=max, min_exclusive=min_exclusive, ss=ss, metavar=metavar, group=group,
        fixed=fixed, local_path=local_path,
    )
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------------
    data: Path | None = option(None, "Folder of captioned images (kohya `N_name` repeat folders allowed).", group="data", fixed=True)
    dataset_config: Path | None = option(None, "kohya sd-scripts dataset config, TOML or .json (its --dataset_config), instead of --data: each subset's image_dir with its "
                                         "num_repeats, class_tokens, caption_extension and is_reg; its resolution, batch size, bucket and caption options "
                                         "become the run's when all subsets agree. Default output name: the file's stem.", metavar="FILE", group="data", fixed=True)
    caption_extension: str = option(".txt", "Extension of sidecar caption files.", group="data")
    skip_bad_images: bool = option(False, "Skip (and count) unreadable images instead of stopping.", group="data")
    resolution: int | None = option(
        None, "Training resolution in pixels (bucket area is about resolution^2). Default: the model's native size.",
        min=8, max=4096, ss="ss_resolution", group="data", fixed=True,
    )
    buckets: bool = option(True, "Aspect-ratio bucketing; --no-buckets trains on square centre crops.", ss="ss_enable_bucket", group="data", fixed=True)
    min_bucket_side: int | None = option(None, "Smallest bucket side in px. Default: resolution/2, rounded down to the bucket step (64 px for SD; at least one step).", min=8, ss="ss_min_bucket_reso", group="data", fixed=True)
    max_bucket_side: int | None = option(None, "Largest bucket side in px. Default: resolution*2.", min=8, ss="ss_max_bucket_reso", group="data", fixed=True)
    no_upscale: bool = option(False, "Never upscale small images; they get a bucket that fits inside them.", ss="ss_bucket_no_upscale", group="data", fixed=True)
    random_crop: bool = option(False, "Random instead of centre crops (needs fresh pixels each step: no latent cache).", ss="ss_random_crop", group="data")
    flip: bool = option(False, "Random horizontal flips (both variants are cached).", ss="ss_flip_aug", group="data")
    shuffle_tags: bool = option(False, "Shuffle comma-separated caption tags every step.", ss="ss_shuffle_caption", group="data")
    keep_tokens: int = option(0, "With --shuffle-tags or --tag-dropout, keep this many leading tags in place (e.g. the trigger word).", min=0, ss="ss_keep_tokens", group="data")
    caption_dropout: float = option(0.0, "Probability of training a sample with an empty caption.", min=0, max=1, ss="ss_caption_dropout_rate", group="data")
    tag_dropout: float = option(0.0, "Probability of leaving out each comma-separated tag after the first --keep-tokens (kohya's caption_tag_dropout_rate).",
                                min=0, max=1, ss="ss_caption_tag_dropout_rate", group="data")
    cache_latents: bool | None = option(
        None, "Encode every image with the VAE once before training. Default: on unless --random-crop.", ss="ss_cache_latents", group="data"
    )
    latent_cache_dir: Path | None = option(None, "Keep cached latents on disk here, keyed by image content, bucket, crop, flip and VAE, so later runs skip encoding.", group="data")
    num_workers: int = option(0, "DataLoader worker processes, started once for the run (0: the training process loads batches, a thread one batch ahead when latents are not cached).", min=0, max=64, group="data")
    # --- model --------------------------------------------------------------------------------------
    model: str | None = option(None, "Base model: a Hugging Face id, a local diffusers folder or a single-file checkpoint (SD1.x, SD2.x, SDXL). "
                               "Default: the built-in demo base model (64 px toy world), with options tuned for it.", ss="ss_sd_model_name", group="model", fixed=True, local_path=True)
    prediction_type: str | None = option(None, "Override the model's prediction type. Default: from its scheduler config.", choices=PREDICTION_TYPES, group="model", fixed=True)
    allow_unsafe_pickle: bool = option(False, "Allow a .ckpt/.pt --model: pickle files can run code when loaded (read with torch.load(weights_only=True) first).", group="model")
    model_config: Path | None = option(None, "Diffusers folder whose configs and tokenizers describe a single-file --model (default: built-in SD1.5/SD2.1/SDXL configs).", group="model", fixed=True)
    vae: str | None = option(None, "Replace the model's VAE (diffusers folder, single .safetensors file or Hub id), e.g. an fp16-safe SDXL VAE.", ss="ss_vae_name", group="model", fixed=True, local_path=True)
    zero_terminal_snr: bool = option(False, "Rescale the noise schedule to zero terminal SNR (Lin et al. 2023; needs v-prediction).", ss="ss_zero_terminal_snr", group="model", fixed=True)
    clip_skip: int = option(1, "Use the text encoder's N-th hidden state from the end (2 = penultimate). SDXL already conditions on the penultimate at 1, so N goes N-1 layers further back (2: the third from the end, as the SDXL pipeline's clip_skip=1; kohya ignores --clip_skip for SDXL).", min=1, max=12, ss="ss_clip_skip", group="model", fixed=True)
    max_token_length: int | None = option(
        None, "Caption tokens the text encoders read: 150 or 225 reads long (tag) captions in 75-token windows, each encoded as its own "
        "77-token sequence and joined, as kohya sd-scripts trains (A1111/Forge/ComfyUI read long prompts in windows too); sample grids too. Default (or 75): "
        "the first 75 tokens.", choices=(75, 150, 225), ss="ss_max_token_length", group="model", fixed=True)
    mixed_precision: str = option("auto", "Compute precision of the frozen base model; LoRA weights stay fp32. auto: bf16 on a GPU that has it (fp16 on older ones) and on a CPU with bf16 instructions (AVX512-BF16 or AMX) for full-size models, else no (fp32). fp16 needs a CUDA GPU.", choices=MIXED_PRECISION, ss="ss_mixed_precision", group="model")
    xformers: bool = option(False, "Use xformers memory-efficient attention (CUDA GPUs; default: PyTorch SDPA).", group="model")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.", ss="ss_gradient_checkpointing", group="model")
    threads: int | None = option(None, "CPU threads for PyTorch's operations (torch.set_num_threads). Default: PyTorch's choice, one per core "
                                 "(or OMP_NUM_THREADS). Small models run as fast on one thread and do not slow down when the machine is busy.",
                                 min=1, max=1024, group="model")
    compile: str = option("off", "torch.compile the U-Net for training: blocks (each down/mid/up block; shorter compile) or unet (one graph). The first step of each bucket shape pays the compile time.", choices=COMPILE_MODES, group="model")
    # --- LoRA ---------------------------------------------------------------------------------------
    rank: int | None = option(None, f"LoRA rank (network dim). Default: {DEFAULT_RANK}, or the --init-weights file's rank.", min=1, max=1024, ss="ss_network_dim", group="lora", fixed=True)
    alpha: float | None = option(None, "LoRA alpha; the update is scaled by alpha/rank. Default: equal to rank, or the --init-weights file's alpha.", min=0, min_exclusive=True, ss="ss_network_alpha", group="lora", fixed=True)
    lora_dropout: float = option(0.0, "Dropout on each LoRA layer's input (PEFT's lora_dropout; kohya's --network_dropout drops lora_down's outputs instead).", min=0, max=1, ss="ss_network_dropout", group="lora")
    targets: str = option("attn-mlp", "U-Net modules that get LoRA.", choices=TARGET_PRESETS, group="lora", fixed=True)
    init_weights: Path | None = option(None, "Start from an existing LoRA file (kohya, diffusers or PEFT format; from any trainer): it decides the rank, the alpha, the modules (--targets then only covers a component it has none for) and whether the text encoder trains (yes if it has modules for it: --no-train-text-encoder is then refused; --train-text-encoder beside a U-Net-only file adds a fresh text-encoder LoRA).", group="lora", fixed=True)
    train_text_encoder: bool | None = option(None, "Also train LoRA on the text encoder (six linears per layer). Default: no, or yes when the --init-weights file has text-encoder modules.", group="lora", fixed=True)
    # --- optimisation -------------------------------------------------------------------------------
    seed: int = option(42, "Random seed (data order, noise, timesteps, LoRA init).", min=0, max=2**63 - 1, ss="ss_seed", fixed=True)
    batch_size: int = option(1, "Images per batch (per device).", min=1, max=4096, ss="ss_batch_size_per_device", fixed=True)
    max_steps: int | None = option(None, "Optimizer steps to train. Set this or --epochs, not both; on the command line it replaces the --config file's --epochs.", min=1, ss="ss_max_train_steps")
    epochs: int | None = option(None, "Epochs to train (default 10 when --max-steps is not given). Set this or --max-steps, not both; on the command line it replaces the --config file's --max-steps.", min=1, ss="ss_num_epochs")
    # The learning rates and the weight decay are fixed on resume: the restored optimizer and schedule state keep the
    # saved values, so a new one would be recorded but not trained with. (A new --lr-scheduler or --lr-warmup-steps
    # does take effect.)
    learning_rate: float = option(1e-4, "Learning rate of the U-Net LoRA. Default: 1e-4; 1.0 with --optimizer prodigy, where it multiplies the step size Prodigy finds.", min=0, min_exclusive=True, max=1, ss="ss_learning_rate", fixed=True)
    text_encoder_lr: float | None = option(None, "Learning rate of the text-encoder LoRA. Default: --learning-rate.", min=0, min_exclusive=True, max=1, ss="ss_text_encoder_lr", fixed=True)
    lr_scheduler: str = option("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS, ss="ss_lr_scheduler")
    lr_warmup_steps: int = option(0, "Linear warm-up steps (not with --lr-scheduler constant, which has none).", min=0, ss="ss_lr_warmup_steps")
    lr_scheduler_num_cycles: int = option(1, "Cycles of --lr-scheduler cosine_with_restarts, each a cosine decay from the full rate (1: no restart).", min=1, max=10_000)
    lr_scheduler_power: float = option(1.0, "Exponent of --lr-scheduler polynomial's decay (1: the same as linear).", min=0, min_exclusive=True, max=100)
    optimizer: str = option("adamw", "Optimizer: adamw, adamw8bit (bitsandbytes, CUDA), adafactor, prodigy (prodigyopt; --learning-rate ~1.0).", choices=OPTIMIZERS, fixed=True)  # ss_optimizer: export.py
    weight_decay: float = option(1e-2, "Weight decay, for every --optimizer (the libraries' own default is 0 for Adafactor and Prodigy).", min=0, max=1, fixed=True)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", min=1, max=1024, ss="ss_gradient_accumulation_steps", fixed=True)
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0 disables).", min=0, ss="ss_max_grad_norm")
    min_snr_gamma: float | None = option(None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5 is typical.", min=0, min_exclusive=True, ss="ss_min_snr_gamma")
    noise_offset: float = option(0.0, "Noise offset (adds per-channel constant noise; 0.05-0.1 typical).", min=0, max=1, ss="ss_noise_offset")
    # --- outputs ------------------------------------------------------------------------------------
    output_dir: Path = option(Path("out"), "Folder for the LoRA file, samples, metrics and the resolved config.", group="output")
    output_name: str | None = option(None, "File name (without .safetensors). Default: the data folder's name.", ss="ss_output_name", group="output")
    save_every: int = option(0, "Also save <name>-stepNNNNNNNN.safetensors every N steps (0: only at the end).", min=0, group="output")
    format: str = option("kohya", "File format: kohya (WebUIs, ComfyUI and diffusers), diffusers (lora_A/lora_B, alpha baked in) or both.", choices=FORMATS, group="output")
    save_precision: str = option("fp16", "Precision of the saved LoRA tensors.", choices=SAVE_PRECISIONS, group="output")
    training_comment: str = option("", "Free text stored as ss_training_comment.", ss="ss_training_comment", group="output")
    sample_every: int = option(100, "Write a sample grid every N steps, plus at step 0 and at the end (0: none by step; with --sample-every-epochs 0 too, no sampling at all).", min=0, group="sampling")
    # Epoch schedules (kohya's save_every_n_epochs, sample_every_n_epochs, save_last_n_*); none has an ss_* key in kohya.
    save_every_epochs: int = option(0, "Also save <name>-NNNNNN.safetensors (kohya's epoch file name) at the end of every N-th epoch; the "
                                    "last epoch's weights are the final <name>.safetensors (0: no epoch files). Combines with --save-every: "
                                    "each writes its own files.", min=0, group="output")
    keep_saves: int = option(0, "Keep only the newest K files of --save-every and --save-every-epochs together (kohya's save_last_n_steps/"
                             "epochs, counted in files): after each new one is written, this run's older ones are deleted. Never "
                             "the final file, a save on Ctrl-C or other files in --output-dir (0: keep all).", min=0, group="output")
    sample_every_epochs: int = option(0, "Also write a sample grid at the end of every N-th epoch, samples/<name>-NNNNNN.png; the last "
                                      "epoch's is the end grid (0: none). Unlike kohya's sample_every_n_epochs it does not replace "
                                      "--sample-every: add --sample-every 0 for epoch grids only.", min=0, group="sampling")
    sample_prompts: Path | None = option(None, f"Prompt file, one per line, kohya options {PROMPT_OPTION_FLAGS}. Default: dataset captions.",
                                       group="sampling")
    sample_steps: int = option(20, "Denoising steps per sample.", min=1, max=MAX_STEPS, group="sampling")
    sample_cfg: float = option(7.5, "Classifier-free guidance scale of samples.", min=0, max=MAX_CFG, group="sampling")
    sample_sampler: str = option("ddim", "Sampler used for sample grids (kohya's names; a prompt's --ss overrides it).", choices=SAMPLERS, group="sampling")
    sample_seeds: int = option(2, "Seeds (grid columns) per prompt; seeds are 0..N-1.", min=1, max=16, group="sampling")
    # --- logging ------------------------------------------------------------------------------------
    log_with: str = option("none", "Also log the metrics (and sample grids) for TensorBoard: tensorboard (pip install 'sd_lora[tensorboard]'). "
                           "metrics.jsonl is written either way.", choices=("none", "tensorboard"), group="output")
    logging_dir: Path | None = option(None, "Folder of the TensorBoard runs (tensorboard --logdir DIR shows them); each run writes into its "
                                      "own subfolder <log-prefix><YYYYmmdd-HHMMSS>, a resumed run into the one it continues. Default: <output-dir>/logs.",
                                      group="output")
    log_prefix: str | None = option(None, "Start of the run's subfolder name under --logging-dir, before the date and time (kohya's --log_prefix). "
                                    "Default: <output-name>-.", group="output")
    # --- reliability --------------------------------------------------------------------------------
    save_state_every: int = option(0, "Write a full training state (LoRA, optimizer, schedule, RNGs, data position) every N steps and at the end (0: only on interrupt).", min=0, group="reliability")
    keep_states: int = option(2, "Keep only the newest K state folders.", min=1, group="reliability")
    resume: str | None = option(None, "Continue from a state folder: 'latest' (newest in --output-dir) or its path.", metavar="latest|DIR", group="reliability", local_path=True)
    nan_skip: int = option(0, "Skip up to N optimizer steps with a non-finite loss or gradient instead of stopping.", min=0, group="reliability")
    reg_data: Path | None = option(None, "Regularisation (prior-preservation) images: a folder like --data whose images and captions keep the base's "
                                   "behaviour while the LoRA learns (kohya's reg_data_dir). Each epoch sees as many of them as training images.", group="data", fixed=True)
    prior_loss_weight: float = option(1.0, "Loss weight of the regularisation images against the training images.", min=0, min_exclusive=True, max=100,
                                      ss="ss_prior_loss_weight", fixed=True)
    validation_split: float = option(0.0, "Hold out this fraction of the images (chosen by --seed) for a validation loss.", min=0, max=0.5,
                                     ss="ss_validation_split", group="reliability", fixed=True)
    validation_data: Path | None = option(None, "Folder of captioned images used only for the validation loss.", group="reliability", fixed=True)
    validate_every: int = option(50, "Compute the validation loss every N steps (and at the end) when validation images exist.", min=1, group="reliability")
    config: Path | None = option(None, "TOML file with any of these options (kebab-case keys); flags override it.", metavar="FILE", group="output")

    # ---------------------------------------------------------------------------------------------
    @property
    def effective_alpha(self) -> float | None:
        """--alpha, else the rank; None until one is known (before the run fills the default rank or reads
        the --init-weights file)."""
        value = self.rank if self.alpha is None else self.alpha
        return None if value is None else float(value)

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    @property
    def use_latent_cache(self) -> bool:
        return (not self.random_crop) if self.cache_latents is None else self.cache_latents

    @property
    def sampling(self) -> bool:
        """Whether the run draws sample grids (then also at step 0 and at the end)."""
        return bool(self.sample_every or self.sample_every_epochs)

    @property
    def samples_dir(self) -> Path:
        """The folder of the run's sample grids, never read as training images."""
        return self.output_dir / "samples"

    def to_dict(self, *, public: bool = False) -> dict[str, Any]:
        """Kebab-case keys, JSON/TOML-friendly values; `load_config` reads it back unchanged.

        `public=True`: for files users share (the LoRA's metadata), local paths are reduced to their basenames
        (`public_name`), so no user or folder name leaks; config.toml beside the outputs keeps them whole.
        """
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if public:
                value = self._public_value(f)
            out[key_of(f.name)] = str(value) if isinstance(value, Path) else value
        return out

    def _public_value(self, f: dataclasses.Field) -> Any:
        value = getattr(self, f.name)
        if isinstance(value, Path) or (f.metadata.get("local_path") and isinstance(value, str)):
            return public_name(str(value))
        return value

    def to_toml(self) -> str:
        """The resolved options as a --config file that reruns the run. Not `resume`: it says how this invocation
        started, not what the run is; recorded, `--config out/config.toml` resumed instead of rerunning (and failed
        in another --output-dir), and the resume command adds `--resume latest` itself."""
        lines = ["# Resolved sd_lora training configuration (unset options are omitted)."]
        for key, value in self.to_dict().items():
            if value is None or key in ("config", "resume"):
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def ss_metadata(self) -> dict[str, str]:
        """The options that have a kohya `ss_*` key, as the strings kohya writes (None -> "None")."""
        out = {}
        for f in dataclasses.fields(self):
            ss = f.metadata.get("ss")
            if ss:
                out[ss] = _ss_value(self._public_value(f))
        out["ss_network_alpha"] = _ss_value(self.effective_alpha)
        out["ss_text_encoder_lr"] = _ss_value(self.effective_text_encoder_lr if self.train_text_encoder else None)
        out["ss_unet_lr"] = _ss_value(self.learning_rate)
        validates = bool(self.validation_split or self.validation_data)  # (kohya writes None unless it was asked to)
        out["ss_validate_every_n_steps"] = _ss_value(self.validate_every if validates else None)
        return out


def key_of(name: str) -> str:
    """A field's CLI flag and TOML key, without the dashes: learning_rate -> learning-rate."""
    return name.replace("_", "-")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """`text` as a TOML basic string: characters outside the BMP (an emoji in a comment or a folder name) written
    as they are, where JSON's \\ud83e\\udd16 surrogate pairs are invalid TOML; TOML's forbidden control
    characters (DEL included, which JSON leaves raw) escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def _ss_value(value: Any) -> str:
    return "None" if value is None else str(value)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
