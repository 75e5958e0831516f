"""Reading the training options (declared in `options.py`) from the command line and TOML files, and
checking them.

Precedence: defaults < TOML file given with `--config` < flags on the command line. A kohya dataset config
(`--dataset-config`) sets the run options it names; a flag or `--config` value that contradicts it is an error. Without `model` the
run trains the built-in demo base, and the demo's tuned options (`sd_lora.demo.defaults`) replace the
defaults of the options the user did not set. Every problem is collected and reported together
(`ConfigError`) before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from .data.kohya_dataset_config import KOHYA_CAPTION_EXTENSION, RUN_OPTIONS, read_dataset_config, run_options
from .errors import ConfigError, UserError
from .fsio import is_within, readable
from .options import FIELDS, TrainConfig, key_of


def _base_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(python type, optional?) of a field annotation such as `int | None`."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


# --- conversion and validation ---------------------------------------------------------------------


def _warmup_ratio_hint(name: str, value: Any) -> str:
    """kohya (since 2024) reads an lr_warmup_steps below 1 as a share of the run's steps; say so, not just "whole"."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        return ""
    if name != "lr_warmup_steps" or not 0 < share < 1:
        return ""
    return (f" (kohya reads a value below 1 as a share of the run's steps; sd_lora counts steps: give {share:g} times the "
            "run's total steps (--max-steps, or the total a run prints at its start))")


def _convert(name: str, value: Any, source: str, problems: list[str]) -> Any:
    """Check/convert one raw value (from TOML or argparse) to the field's type; record problems."""
    f = FIELDS[name]
    kind, optional = _base_type(f)
    where = f"{source}: {key_of(name)}"
    if value is None:
        if optional:
            return None
        problems.append(f"{where} cannot be empty")
        return dataclasses.MISSING
    if kind is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where} = {value!r} must be true or false")
        return dataclasses.MISSING
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            problems.append(f"{where} = {value!r} must be a whole number{_warmup_ratio_hint(name, value)}")
            return dataclasses.MISSING
        try:
            return int(value)
        except ValueError:
            problems.append(f"{where} = {value!r} must be a whole number{_warmup_ratio_hint(name, value)}")
            return dataclasses.MISSING
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            problems.append(f"{where} = {value!r} must be a number")
            return dataclasses.MISSING
        try:
            number = float(value)
        except ValueError:
            problems.append(f"{where} = {value!r} must be a number")
            return dataclasses.MISSING
        except OverflowError:  # a TOML integer beyond a float's range
            number = math.inf
        if not math.isfinite(number):
            problems.append(f"{where} = {value!r} must be a finite number")
            return dataclasses.MISSING
        return number
    if kind is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            problems.append(f"{where} = {value!r} must be a path")
            return dataclasses.MISSING
        # The shell leaves ~ alone in --flag=~/x and in TOML strings; --model and --vae expand it when loading.
        return Path(value).expanduser()
    if not isinstance(value, str):
        problems.append(f"{where} = {value!r} must be a string")
        return dataclasses.MISSING
    if value == "" and f.metadata["local_path"]:  # not "unset": --vae "" trained with the model's own VAE, recorded as the cwd's name
        problems.append(f"{where} = '' is empty; name the {key_of(name)} (see --help) or leave the option out")
        return dataclasses.MISSING
    return value


def _check_range(config: TrainConfig, problems: list[str]) -> None:
    for name, f in FIELDS.items():
        value = getattr(config, name)
        meta = f.metadata
        if value is None or isinstance(value, bool):
            continue
        flag = f"--{key_of(name)}"
        if isinstance(value, (str, Path)) and readable(value) != str(value):
            problems.append(f"{flag} {readable(value)!r}: not valid UTF-8 (the bytes shown as \ufffd), which config.toml and "
                            "the LoRA's metadata cannot record; rename it using UTF-8 characters")
            continue
        if meta["choices"] and value not in meta["choices"]:
            choices = [str(c) for c in meta["choices"]]  # (some are numbers: --max-token-length)
            close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{flag} {value!r} is not supported{hint}; choose one of: {', '.join(choices)}")
        lo, hi = meta["min"], meta["max"]
        if lo is not None and (value < lo or (meta["min_exclusive"] and value == lo)):
            op = ">" if meta["min_exclusive"] else ">="
            problems.append(f"{flag} {value} is out of range: it must be {op} {lo:g}")
        if hi is not None and value > hi:
            problems.append(f"{flag} {value} is out of range: it must be <= {hi:g}")


def _check_combinations(c: TrainConfig, problems: list[str], from_dataset_config: frozenset[str] = frozenset()) -> None:
    if c.data is not None and c.dataset_config is not None:
        problems.append(f"--data {c.data} and --dataset-config {c.dataset_config} are both set; the dataset config lists every "
                        "image folder (kohya ignores --train_data_dir with it): add the folder to it as a [[datasets.subsets]], or drop one")
    elif c.dataset_config is not None:
        pass  # read (and its problems reported) by load_config
    elif c.data is None:
        problems.append("--data is required: the folder of captioned images to train on (or --dataset-config: a kohya dataset config TOML)")
    elif not c.data.exists():
        problems.append(f"--data {c.data}: folder not found")
    elif not c.data.is_dir():
        problems.append(f"--data {c.data}: is a file, not a folder of images")
    if c.sample_prompts is not None and not c.sample_prompts.is_file():
        problems.append(f"--sample-prompts {c.sample_prompts}: " + ("is a folder; pass the .txt file in it with one prompt per line"
                                                                    if c.sample_prompts.is_dir() else "file not found"))
    if c.init_weights is not None and not c.init_weights.is_file():
        problems.append(f"--init-weights {c.init_weights}: " + ("is a folder; pass the LoRA .safetensors file in it"
                                                                  if c.init_weights.is_dir() else "file not found"))
    if c.model_config is not None and not (c.model_config / "model_index.json").is_file():
        problems.append(f"--model-config {c.model_config}: not a diffusers folder (no model_index.json)")
    if c.config is not None and not c.config.is_file():
        problems.append(f"--config {c.config}: file not found")
    if c.max_steps is not None and c.epochs is not None:
        problems.append(f"--max-steps {c.max_steps} and --epochs {c.epochs} are both set; set only one of them")
    if c.lr_scheduler == "constant" and c.lr_warmup_steps:  # diffusers' "constant" ignores num_warmup_steps
        problems.append(f"--lr-warmup-steps {c.lr_warmup_steps} has no effect with --lr-scheduler constant; use "
                        "constant_with_warmup (or another scheduler), or drop --lr-warmup-steps")
    if c.lr_scheduler_num_cycles != 1 and c.lr_scheduler != "cosine_with_restarts":
        problems.append(f"--lr-scheduler-num-cycles {c.lr_scheduler_num_cycles} only applies to --lr-scheduler cosine_with_restarts "
                        f"(got {c.lr_scheduler}); switch to it or drop the option")
    if c.lr_scheduler_power != 1 and c.lr_scheduler != "polynomial":
        problems.append(f"--lr-scheduler-power {c.lr_scheduler_power:g} only applies to --lr-scheduler polynomial (got "
                        f"{c.lr_scheduler}); switch to it or drop the option")
    if c.max_steps is not None and c.max_steps >= 1 and c.lr_warmup_steps > c.max_steps:  # (< 1 is its own problem)
        problems.append(f"--lr-warmup-steps {c.lr_warmup_steps} is longer than the run (--max-steps {c.max_steps}); use at most "
                        f"{c.max_steps}, or raise --max-steps")
    if c.keep_saves and not c.save_every and not c.save_every_epochs:
        problems.append(f"--keep-saves {c.keep_saves} keeps the newest intermediate files, but none are saved; add --save-every N "
                        "or --save-every-epochs N, or drop --keep-saves")
    # A kohya dataset config may keep tokens without shuffling them (kohya accepts it; it does nothing).
    if c.keep_tokens and not c.shuffle_tags and not c.tag_dropout and "keep_tokens" not in from_dataset_config:
        problems.append(f"--keep-tokens {c.keep_tokens} only has an effect with --shuffle-tags or --tag-dropout; add one or drop --keep-tokens")
    if c.no_upscale and not c.buckets:
        problems.append("--no-upscale only changes how images are fitted to aspect-ratio buckets, which --no-buckets turns off; "
                        "drop one of them")
    if c.random_crop and c.cache_latents:
        problems.append("--cache-latents cannot be combined with --random-crop (each step needs a fresh crop); drop one")
    if c.resolution is not None and c.min_bucket_side is not None and c.min_bucket_side > c.resolution:
        problems.append(f"--min-bucket-side {c.min_bucket_side} is larger than --resolution {c.resolution}")
    if c.resolution is not None and c.max_bucket_side is not None and c.max_bucket_side < c.resolution:
        problems.append(f"--max-bucket-side {c.max_bucket_side} is smaller than --resolution {c.resolution}")
    if c.validation_split and c.validation_data is not None:
        problems.append("--validation-split and --validation-data are both set; use one of them")
    if c.reg_data is not None and c.dataset_config is not None:
        problems.append(f"--reg-data {c.reg_data} cannot be combined with --dataset-config; add the folder to the dataset config "
                        "as a [[datasets.subsets]] with is_reg = true")
    elif c.reg_data is not None and not c.reg_data.is_dir():
        problems.append(f"--reg-data {c.reg_data}: folder not found")
    if c.prior_loss_weight != 1.0 and c.reg_data is None and c.dataset_config is None:  # (a dataset config's is_reg: load_config)
        problems.append(f"--prior-loss-weight {c.prior_loss_weight:g} weighs regularisation images, but there are none; add --reg-data DIR")
    if c.validate_every != FIELDS["validate_every"].default and not c.validation_split and c.validation_data is None:
        problems.append(f"--validate-every {c.validate_every} has no effect without validation images; add --validation-split 0.1 "
                        "or --validation-data DIR, or drop --validate-every")
    if c.validation_data is not None and not c.validation_data.is_dir():
        problems.append(f"--validation-data {c.validation_data}: folder not found")
    # A folder inside --data is left out of its scan (data_setup.other_image_folders); --data itself, or one holding it, cannot be.
    for flag, folder, why in (("--validation-data", c.validation_data, "its images would be held out and trained on (the validation "
                                                                       "loss would measure training images); use --validation-split 0.1 or"),
                              ("--reg-data", c.reg_data, "its images would train twice, once as regularisation images;")):
        if folder is not None and c.data is not None and folder.is_dir() and is_within(c.data.resolve(), folder.resolve()):
            problems.append(f"{flag} {folder} is the --data folder {c.data} or holds it: {why} pass a folder of other images")
    if c.resume not in (None, "latest") and not Path(c.resume).expanduser().is_dir():
        problems.append(f"--resume {c.resume}: no such state folder; pass 'latest' or a folder like {c.output_dir}/state-00000100")
    if c.latent_cache_dir is not None and (c.cache_latents is False or c.random_crop):
        problems.append("--latent-cache-dir needs cached latents; drop it, or drop --no-cache-latents/--random-crop")
    if c.optimizer == "prodigy" and c.learning_rate < 0.1:
        problems.append(f"--optimizer prodigy learns its own step size: --learning-rate is a multiplier, use about 1.0 (got {c.learning_rate:g})")
    if c.optimizer == "prodigy" and c.text_encoder_lr is not None and c.text_encoder_lr != c.learning_rate:
        # Prodigy shares one learned step size across groups and refuses groups with different lr values.
        problems.append(f"--text-encoder-lr {c.text_encoder_lr:g}: --optimizer prodigy uses one learning rate for the U-Net and the "
                        f"text encoder (--learning-rate {c.learning_rate:g}); drop --text-encoder-lr")
    if c.text_encoder_lr is not None and (c.train_text_encoder is False or (c.train_text_encoder is None and c.init_weights is None)):
        problems.append("--text-encoder-lr is set but the text encoder is not trained; add --train-text-encoder")
    if c.log_with == "none" and (c.logging_dir is not None or c.log_prefix is not None):
        flag = "--logging-dir" if c.logging_dir is not None else "--log-prefix"
        problems.append(f"{flag} only applies to TensorBoard logs, which are off; add --log-with tensorboard or drop {flag}")
    if c.log_prefix is not None and any(ch in c.log_prefix for ch in '/\\:*?"<>|'):
        problems.append(f"--log-prefix {c.log_prefix!r} must be part of a folder name, without path separators; use --logging-dir for the folder")
    elif c.log_prefix is not None and len(os.fsencode(c.log_prefix)) + _LOG_PREFIX_EXTRA > NAME_MAX:
        problems.append(f"--log-prefix {c.log_prefix[:20]!r}... is {len(os.fsencode(c.log_prefix))} bytes long; the run's folder adds "
                        f"{_LOG_PREFIX_EXTRA} (e.g. 20240101-120000-2) and a folder name holds at most {NAME_MAX} bytes: use at most "
                        f"{NAME_MAX - _LOG_PREFIX_EXTRA}")
    if not c.caption_extension.startswith(".") or len(c.caption_extension) < 2:
        problems.append(f"--caption-extension {c.caption_extension!r} must start with a dot, e.g. '.txt' or '.caption'")
    if c.output_name is not None and (not c.output_name or any(ch in c.output_name for ch in '/\\:*?"<>|')):
        problems.append(f"--output-name {c.output_name!r} must be a plain file name without path separators")
    elif c.output_name is not None and c.output_name.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        stem = c.output_name.rsplit(".", 1)[0]  # kohya appends the extension too: it wrote NAME.safetensors.safetensors
        problems.append(f"--output-name {c.output_name!r} is the name without its extension: use --output-name {stem!r} "
                        f"(the LoRA becomes {stem}.safetensors)")
    elif c.output_name is not None and c.output_name.startswith("."):  # also "." and "..": a hidden file
        problems.append(f"--output-name {c.output_name!r} must not start with a dot (the LoRA file would be hidden); "
                        "use a plain name such as 'zkchar'")
    elif c.output_name is not None and (problem := output_name_length_problem(c.output_name)):
        problems.append(f"--output-name {c.output_name[:20]!r}... is {problem}")


# The longest file name a run writes from --output-name: the temporary file of a Ctrl-C save's -diffusers sibling
# (fsio.atomic_write_bytes), .<name>-step00000000-last-good-diffusers.safetensors.XXXXXXXX.tmp.
_OUTPUT_NAME_EXTRA = len(".-step00000000-last-good-diffusers.safetensors.XXXXXXXX.tmp")
NAME_MAX = 255  # bytes in one file name (ext4, APFS; NTFS counts 255 UTF-16 units)
_LOG_PREFIX_EXTRA = len("YYYYmmdd-HHMMSS-99")  # tensorboard_log.new_run: the start time, -2 for a second run that second


def output_name_length_problem(name: str) -> str | None:
    """Why the files of output name `name` could not be written (a name too long for the file system), or None: found
    before training, not when its first file is saved."""
    size = len(os.fsencode(name))
    if size + _OUTPUT_NAME_EXTRA <= NAME_MAX:
        return None
    return (f"{size} bytes long; its files' names add up to {_OUTPUT_NAME_EXTRA} more (e.g. -step00000010-last-good-diffusers"
            f".safetensors) and a file name holds at most {NAME_MAX} bytes: use a name of at most {NAME_MAX - _OUTPUT_NAME_EXTRA} bytes")


def validate(config: TrainConfig) -> None:
    """Raise one ConfigError listing every problem in `config`."""
    problems: list[str] = []
    _check_range(config, problems)
    _check_combinations(config, problems)
    if problems:
        raise ConfigError(problems)


# --- sources: TOML and argparse ----------------------------------------------------------------------

# kohya sd-scripts' names of options sd_lora has under another name (its train_network.py arguments and
# --config_file keys), for the "did you mean": difflib's guess misled, e.g. save_every_n_steps -> --save-every-epochs,
# max_train_epochs -> --max-steps, save_last_n_steps -> --sample-steps, train_data_dir -> --train-text-encoder.
KOHYA_NAMES = {
    "pretrained_model_name_or_path": "model", "train_data_dir": "data", "reg_data_dir": "reg_data", "network_dim": "rank",
    "network_alpha": "alpha", "network_weights": "init_weights", "max_train_steps": "max_steps", "max_train_epochs": "epochs",
    "train_batch_size": "batch_size", "unet_lr": "learning_rate", "save_every_n_steps": "save_every",
    "save_every_n_epochs": "save_every_epochs", "save_last_n_steps": "keep_saves", "save_last_n_epochs": "keep_saves",
    "sample_every_n_steps": "sample_every", "sample_every_n_epochs": "sample_every_epochs", "enable_bucket": "buckets",
    "min_bucket_reso": "min_bucket_side", "max_bucket_reso": "max_bucket_side", "bucket_no_upscale": "no_upscale",
    "shuffle_caption": "shuffle_tags", "flip_aug": "flip", "caption_dropout_rate": "caption_dropout",
    "caption_tag_dropout_rate": "tag_dropout", "max_data_loader_n_workers": "num_workers",
    "v_parameterization": "prediction_type", "network_train_unet_only": "no_train_text_encoder",
}
# The same for the diffusers examples (train_text_to_image_lora.py, train_dreambooth_lora.py): difflib pointed
# random_flip -> --random-crop, checkpointing_steps -> --gradient-checkpointing, validation_prompt -> --validation-split.
DIFFUSERS_NAMES = {
    "instance_data_dir": "data", "class_data_dir": "reg_data", "with_prior_preservation": "reg_data", "random_flip": "flip",
    "center_crop": "no_buckets", "num_train_epochs": "epochs", "checkpointing_steps": "save_state_every",
    "checkpoints_total_limit": "keep_states", "resume_from_checkpoint": "resume", "validation_prompt": "sample_prompts",
    "num_validation_images": "sample_seeds", "validation_epochs": "sample_every_epochs", "snr_gamma": "min_snr_gamma",
    "use_8bit_adam": "optimizer", "adam_weight_decay": "weight_decay", "report_to": "log_with", "lr_num_cycles":
    "lr_scheduler_num_cycles", "lr_power": "lr_scheduler_power", "dataloader_num_workers": "num_workers",
    "enable_xformers_memory_efficient_attention": "xformers",
}
# Their options sd_lora has no equivalent for, whose difflib guess names another thing: ip_noise_gamma ->
# --min-snr-gamma, network_args -> --num-workers, dataset_name -> --dataset-config, revision -> --resolution.
NO_EQUIVALENT = {
    "ip_noise_gamma": "kohya's", "network_args": "kohya's", "weighted_captions": "kohya's", "scale_weight_norms": "kohya's",
    "dataset_name": "the diffusers examples'", "caption_column": "the diffusers examples'", "cache_dir": "the diffusers examples'",
    "revision": "the diffusers examples'", "scale_lr": "the diffusers examples'", "sample_batch_size": "the diffusers examples'",
    "instance_prompt": "the diffusers examples'", "class_prompt": "the diffusers examples'",
}


def _did_you_mean(key: str, known: list[str], prefix: str = "") -> str:
    """' (did you mean ...?)' for an unknown option `key` (a TOML key, or a flag without its --), or ''; kohya's
    names by `KOHYA_NAMES`. `known`: the option keys; `prefix`: "--" for flags (else the key is quoted)."""
    name = key.replace("-", "_")
    if name in NO_EQUIVALENT:
        return f" ({NO_EQUIVALENT[name]} option; sd_lora has no equivalent)"
    theirs = KOHYA_NAMES.get(name) or DIFFUSERS_NAMES.get(name)
    close = [key_of(theirs)] if theirs else difflib.get_close_matches(key.replace("_", "-"), known, n=1)
    if not close:
        return ""
    shown = f"{prefix}{close[0]}" if prefix else repr(close[0])
    if not prefix and theirs and theirs not in FIELDS:  # a negative flag (--no-buckets) is a false value in a file
        shown = repr(f"{key_of(theirs[3:])} = false")
    if name in KOHYA_NAMES:
        return f" (kohya's name; did you mean {shown}?)"
    return f" (the diffusers examples' name; did you mean {shown}?)" if theirs else f" (did you mean {shown}?)"


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file into {field_name: raw value}; unknown keys are errors (with a suggestion)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))  # (Windows editors often write a BOM)
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; --config takes a TOML file (see configs/ for examples)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror or e}); check that it exists and that "
                        "you may read it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; a config must be TOML text") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e}); see configs/ for examples") from None
    if isinstance(raw.get("datasets"), list):
        raise ConfigError([f"{path}: has [[datasets]] tables, so it is a kohya dataset config; pass it with --dataset-config "
                           f"{path} (--config takes sd_lora's options)"])
    problems, values = [], {}
    spelled: dict[str, str] = {}  # field name -> the key that set it, to catch `max_steps` beside `max-steps`
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in spelled:
            problems.append(f"{path}: {spelled[name]!r} and {key!r} are the same option, set twice; keep one of them")
            continue
        spelled[name] = key
        if isinstance(value, dict):  # kohya_ss configs group keys in [sections]
            problems.append(f"{path}: [{key}] tables are not used; write its keys ({', '.join(value)}) at the "
                            f"top level, without the [{key}] line")
            continue
        if name not in FIELDS and name.startswith("no_") and name[3:] in FIELDS and _base_type(FIELDS[name[3:]])[0] is bool:
            # (difflib suggested `buckets` for `no-buckets = true`: the opposite)
            problems.append(f"{path}: unknown key {key!r}: --{key_of(name)} is the flag's negative form; in a config file "
                            f"write {key_of(name[3:])} = {'true' if value is False else 'false'}")
            continue
        if name == "config":  # (difflib suggested 'model-config', a diffusers folder)
            problems.append(f"{path}: config = {value!r}: a config file cannot read another one; pass one --config file, "
                            "with the other's options copied into it")
            continue
        if name not in FIELDS:
            hint = _did_you_mean(key, [key_of(n) for n in FIELDS if n != "config"])
            problems.append(f"{path}: unknown key {key!r}{hint}")
            continue
        values[name] = value
    if problems:
        raise ConfigError(problems)
    return values


class _ArgumentParser(argparse.ArgumentParser):
    """Raises a UserError instead of printing the whole usage and exiting, so main() prints one
    `sd_lora: error:` line and returns 2, also when called in-process (notebooks, tests)."""

    def error(self, message: str):
        raise UserError(f"{message}; see python -m sd_lora.train --help")


def _unknown_flags(unknown: list[str]) -> list[str]:
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")]
    if not flags:
        return [f"unexpected argument {unknown[0]!r}; options are written --flag VALUE"]
    known = [key_of(n) for n in FIELDS]
    problems = []
    for flag in flags:
        hint = _did_you_mean(flag[2:], known, "--")
        problems.append(f"unknown option {flag}{hint}; see python -m sd_lora.train --help")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m sd_lora.train",
        description="Train a Stable Diffusion LoRA from a folder of captioned images.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the TOML file
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, _ = _base_type(f)
        default = f.default
        shown = f" (default: {default})" if default not in (None, "", False) else ""
        flag = f"--{key_of(name)}"
        if kind is bool and name.startswith("no_"):  # `--no-upscale`: a negative name gets no `--no-no-upscale`
            group.add_argument(flag, action="store_true", help=meta["help"])
        elif kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=meta["help"] + shown)
        else:
            group.add_argument(
                flag,
                metavar=meta["metavar"] or ("{" + ",".join(map(str, meta["choices"])) + "}" if meta["choices"] else kind.__name__.upper()),
                help=meta["help"] + shown,
            )
    return parser


def load_config(argv: list[str] | None = None, warnings: list[str] | None = None) -> TrainConfig:
    """CLI arguments (+ optional TOML via --config) -> validated TrainConfig. Raises ConfigError/UserError.

    `warnings`, when given, receives what the user set that the run will not use (`_unused_options`)."""
    namespace, unknown = build_parser().parse_known_args(argv)
    if unknown:
        raise ConfigError(_unknown_flags(unknown))
    args = vars(namespace)
    problems: list[str] = []
    values: dict[str, Any] = {}
    config_path = args.get("config")
    from_file: dict[str, Any] = {}
    if config_path:
        for name, raw in read_toml(Path(config_path).expanduser()).items():
            converted = _convert(name, raw, str(config_path), problems)
            if converted is not dataclasses.MISSING:
                values[name] = from_file[name] = converted
    cli = args
    for name, raw in cli.items():
        converted = _convert(name, raw, "command line", problems)
        if converted is not dataclasses.MISSING:
            values[name] = converted
    # --max-steps on the command line replaces --epochs from a config file (and vice versa), so a
    # config's run length can be overridden without editing it.
    if "max_steps" in cli and "epochs" not in cli:
        values.pop("epochs", None)
    if "epochs" in cli and "max_steps" not in cli:
        values.pop("max_steps", None)
    # Where each option a problem may name was set, if not on the command line: {field: "in FILE" or "by KEY in FILE"}.
    where_set = {name: f"in {config_path}" for name in from_file if name not in cli}
    from_dataset_config: dict[str, Any] = {}
    if values.get("dataset_config") is not None:
        from_dataset_config = _dataset_config_options(values, cli, config_path, problems)
        values.update(from_dataset_config)
        keys = {option.field: key for key, option in RUN_OPTIONS.items()}
        where_set.update({name: f"by {keys[name]} in {values['dataset_config']}" for name in from_dataset_config
                          if name in keys and name not in cli and name not in from_file})
        if values.get("buckets") is False and from_dataset_config.get("no_upscale") and "no_upscale" not in cli:
            values["no_upscale"] = False  # as kohya: bucket_no_upscale does nothing with enable_bucket = false
    if values.get("optimizer") == "prodigy" and "learning_rate" not in values:
        values["learning_rate"] = 1.0  # Prodigy finds its own step size; its learning rate is a multiplier of it
    if "model" not in values:  # the default run: the built-in demo base with options tuned for it
        from .demo.defaults import demo_options

        values = {**demo_options(values), **values}
    config = TrainConfig(**values)  # fields that failed conversion keep their defaults ...
    _check_range(config, problems)  # ... so the remaining checks still run and report together
    _check_combinations(config, problems, frozenset(from_dataset_config))
    if problems:
        relative = {name for name, v in from_file.items() if name not in cli and _is_relative_path(name, v)}
        raise ConfigError([_say_where_set(p, where_set, relative) for p in problems])
    if warnings is not None:
        warnings.extend(_unused_options(config, set(from_file) | set(cli)))
    return config


# What the sample grids are drawn with; the other options of the group say when they are drawn.
SAMPLE_SETTINGS = tuple(name for name, f in FIELDS.items() if f.metadata["group"] == "sampling" and not name.startswith("sample_every"))


def _unused_options(c: TrainConfig, given: set[str]) -> list[str]:
    """Warnings for options the user set (`given`: on the command line or in the --config file) that this run
    ignores. Not errors: `--sample-every 0` is how a run in a config file with sample settings is made quick."""
    unused = [name for name in SAMPLE_SETTINGS if name in given]
    if c.sampling or not unused:
        return []
    flags = ", ".join("--" + key_of(name) for name in unused)
    return [f"{flags} unused: this run draws no sample grids (--sample-every 0 and --sample-every-epochs 0); "
            "set --sample-every N to draw them"]


def _dataset_config_options(values: dict[str, Any], cli: dict[str, Any], config_path, problems: list[str]) -> dict[str, Any]:
    """The options a --dataset-config file sets for the whole run (its problems, and its contradictions with the
    flags and the --config file, go to `problems`). Without the flags it also gives kohya's defaults where sd_lora's
    differ: caption files end in .caption, and there are no --reg-data images (its is_reg subsets are those, so
    the demo base's own regularisation scenes are not added)."""
    kohya_defaults = {"caption_extension": KOHYA_CAPTION_EXTENSION, "reg_data": None}
    options = {name: value for name, value in kohya_defaults.items() if name not in values}
    try:
        dataset_config = read_dataset_config(values["dataset_config"])
    except ConfigError as e:
        problems.extend(e.problems)
        return options
    except UserError as e:
        problems.append(str(e))
        return options
    weight = values.get("prior_loss_weight", 1.0)
    if weight != 1.0 and not any(subset.is_reg for subset in dataset_config.subsets):
        problems.append(f"--prior-loss-weight {weight:g} weighs regularisation images, but {values['dataset_config']} has no is_reg "
                        "subset; add a [[datasets.subsets]] of them with is_reg = true, or drop --prior-loss-weight")
    own = {subset.caption_extension for subset in dataset_config.subsets}
    if "caption_extension" in cli and None not in own and own != {values["caption_extension"]}:
        # As in kohya the file's value wins: a typed extension that no subset reads would be ignored without a word.
        problems.append(f"--caption-extension {values['caption_extension']} (command line) is not used: every subset of "
                        f"{values['dataset_config']} sets its own caption_extension ({', '.join(map(repr, sorted(own)))}); "
                        "drop --caption-extension or change caption_extension in the dataset config")
    given = {name: (value, "command line" if name in cli else str(config_path)) for name, value in values.items()}
    found, more = run_options(dataset_config, given)
    problems.extend(more)
    return {**options, **found}


def _is_relative_path(name: str, value: Any) -> bool:
    f = FIELDS[name]
    is_path = _base_type(f)[0] is Path or f.metadata["local_path"]
    return is_path and isinstance(value, (str, Path)) and not Path(value).expanduser().is_absolute()


def _say_where_set(problem: str, where_set: dict[str, str], relative: set[str]) -> str:
    """A problem about an option the --config file or the --dataset-config file set (not a flag the user typed):
    where it came from, and for a relative path where it was looked for (the folder the command runs in, as
    kohya reads its TOML paths, not the config file's folder)."""
    for name, where in where_set.items():
        if problem.startswith(f"--{key_of(name)} "):
            if name in relative:
                return f"{problem} (set {where}; relative paths are read from the folder you run in, {Path.cwd()})"
            return f"{problem} (set {where})"
    return problem
