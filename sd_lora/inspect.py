"""What is in a LoRA file, and what AUTOMATIC1111, ComfyUI and diffusers will do with it.

    python -m sd_lora.inspect FILE [--model BASE_DIR] [--tags N]

Prints the key format, the model family (from the metadata and, separately, from key names and shapes), the
module count per block, rank and alpha (per module where they vary), the metadata in readable form (tag
frequency as a table, dataset folders, training settings, whether `sshs_model_hash` is right), and a
compatibility report. With `--model` (a local diffusers folder; only its configs are read) every module is
checked against the base model's layers and shapes. Exit status 0, or 2 with `sd_lora: error: ...`.

The loader rules are `sd_lora.formats.compatibility`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from sd_lora.errors import UserError, run_cli
from sd_lora.formats.diffusers_format import ADAPTER_METADATA_KEY
from sd_lora.formats.architecture import architecture_from_model_dir
from sd_lora.formats.compatibility import FAMILY_NAMES, compatibility
from sd_lora.formats.readers import LoraFile, alpha_value, read_any_lora, shape_mismatches

FORMAT_NAMES = {
    "kohya": "kohya / WebUI (lora_unet_*, lora_down/lora_up/alpha)",
    "diffusers": "diffusers / PEFT (lora_A/lora_B)",
    "diffusers-old": "old diffusers attention processors (to_q_lora.down/up)",
}

# --- the report -------------------------------------------------------------------------------------------------

TRAINING_KEYS = {
    "ss_output_name": "output name", "ss_sd_model_name": "trained on", "ss_sd_model_hash": "base model hash (old)",
    "ss_new_sd_model_hash": "base model SHA-256", "ss_network_module": "network module",
    "ss_network_dim": "network dim (rank)", "ss_network_alpha": "network alpha", "ss_network_args": "network args",
    "ss_training_started_at": "started", "ss_training_finished_at": "finished", "ss_session_id": "session id",
    "ss_resolution": "resolution",
    "ss_num_train_images": "training images", "ss_num_reg_images": "regularisation images",
    "ss_num_validation_images": "validation images",
    "ss_steps": "steps", "ss_max_train_steps": "max steps", "ss_epoch": "epoch", "ss_num_epochs": "epochs",
    "ss_batch_size_per_device": "batch size", "ss_gradient_accumulation_steps": "gradient accumulation",
    "ss_learning_rate": "learning rate", "ss_unet_lr": "U-Net lr", "ss_text_encoder_lr": "text encoder lr",
    "ss_lr_scheduler": "lr scheduler", "ss_lr_warmup_steps": "warm-up steps", "ss_optimizer": "optimizer",
    "ss_mixed_precision": "mixed precision", "ss_seed": "seed", "ss_clip_skip": "clip skip", "ss_max_token_length": "max token length",
    "ss_noise_offset": "noise offset", "ss_min_snr_gamma": "min-SNR gamma",
    "ss_caption_dropout_rate": "caption dropout",
    "ss_shuffle_caption": "shuffle captions", "ss_keep_tokens": "keep tokens", "ss_flip_aug": "flip",
    "ss_training_comment": "comment",
}  # fmt: skip
_TIMESTAMPS = ("ss_training_started_at", "ss_training_finished_at")
_SHOWN_ELSEWHERE = ("ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "sshs_model_hash", "ss_base_model_version", "ss_v2")


def format_report(lora: LoraFile, *, base: str | None = None, mismatches: list[str] | None = None,
                  tag_limit: int = 20) -> str:  # fmt: skip
    """The whole `inspect` report as text."""
    lines = [f"File: {lora.source}", f"Format: {FORMAT_NAMES[lora.format]}"]
    lines += _family_lines(lora)
    lines += _module_lines(lora)
    lines += _rank_lines(lora)
    if lora.unsupported or lora.warnings:
        lines.append("Problems:")
        lines += [f"  - {p}" for p in lora.unsupported + lora.warnings]
    lines.append("Compatibility:")
    for loader, verdict in compatibility(lora).items():
        state = "REJECTS the file" if verdict.rejects else f"applies {len(verdict.applies)}, drops {len(verdict.drops)}"
        lines.append(f"  {loader}: {state}")
        lines += [f"    - {r.removeprefix('REJECTS the file: ')}" for r in verdict.reasons]
    if base is not None:
        lines.append(f"Base model {base}:")
        if mismatches:
            lines.append(f"  {len(mismatches)} of {len(lora.modules)} modules do not fit:")
            lines += [f"    - {m}" for m in mismatches]
        else:
            lines.append(f"  all {len(lora.modules)} modules exist with matching shapes")
    lines += _metadata_lines(lora, tag_limit)
    return "\n".join(lines)


def _family_lines(lora: LoraFile) -> list[str]:
    family = FAMILY_NAMES.get(lora.family, "unknown")
    return [
        f"Model family: {family}",
        f"  from metadata: {lora.family_evidence['metadata']}",
        f"  from keys and shapes: {lora.family_evidence['keys']}",
    ]


def block_of(component: str, path: str) -> str:
    """`down_blocks.1`, `mid_block`, `up_blocks.0`, `conv_in`, ... of a U-Net path; else the text encoder's name."""
    if component != "unet":
        return component.replace("_", " ")
    match = re.match(r"(?:down_blocks|up_blocks)\.\d+|mid_block", path)
    return match.group(0) if match else path.split(".", 1)[0]


def _module_lines(lora: LoraFile) -> list[str]:
    counts = Counter(block_of(m.component, m.path) if m.component else "unresolved" for m in lora.modules)
    kinds = Counter(m.kind for m in lora.modules)
    kind_text = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    lines = [f"Modules: {len(lora.modules)} ({kind_text})"]
    lines += [f"  {block:<20} {n:>5}" for block, n in sorted(counts.items(), key=lambda kv: _block_order(kv[0]))]
    return lines


def _block_order(block: str) -> tuple:
    """U-Net down, mid, up, other blocks; then the text encoders; unresolved names last."""
    head, _, index = block.partition(".")
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(head, 3)
    if block.startswith("text"):
        rank = 4
    if block == "unresolved":
        rank = 5
    return rank, int(index) if index.isdigit() else 0, block


def _rank_lines(lora: LoraFile) -> list[str]:
    pairs = {}
    for entry in lora.modules:
        if entry.kind != "lora":  # LoHa, one factor alone, ...: no rank, even where a plain module has its path
            continue
        w = lora.components.get(entry.component or "", {}).get(entry.path or "")
        if w is not None:
            pairs[entry.name] = (w.rank, float(w.alpha))
        elif entry.tensors["down"].shape[0]:  # DoRA, lora_mid, NaN ...: still has a rank
            rank = int(entry.tensors["down"].shape[0])
            alpha = alpha_value(entry.tensors["alpha"]) if "alpha" in entry.tensors else float(rank)
            if alpha is not None:  # else a damaged alpha, reported with the unsupported modules
                pairs[entry.name] = (rank, alpha)
    if not pairs:
        return ["Rank / alpha: no plain LoRA modules"]
    common, n = Counter(pairs.values()).most_common(1)[0]
    no_alpha = lora.format != "kohya" and ADAPTER_METADATA_KEY not in lora.metadata
    note = " (diffusers format without alpha: alpha = rank)" if no_alpha else ""
    rank, alpha = common
    head = f"rank {rank}, alpha {alpha:g} (scale {alpha / rank:g})"
    if n == len(pairs):
        return [f"Rank / alpha: {head} on all {n} modules{note}"]
    lines = [f"Rank / alpha: {head} on {n} of {len(pairs)} modules{note}; the others:"]
    lines += [f"  {name}: rank {r}, alpha {a:g}" for name, (r, a) in sorted(pairs.items()) if (r, a) != common]
    return lines


def _metadata_lines(lora: LoraFile, tag_limit: int) -> list[str]:
    meta = lora.metadata
    if not meta:
        return ["Metadata: none"]
    lines = ["Metadata:"]
    training = [(label, _readable(key, meta[key])) for key, label in TRAINING_KEYS.items() if key in meta]
    if training:
        lines.append("  Training settings:")
        lines += [f"    {label:<24} {value}" for label, value in training]
    for key in ("ss_base_model_version", "ss_v2"):
        if key in meta:
            lines.append(f"  {key}: {meta[key]}")
    spec = sorted(k for k in meta if k.startswith("modelspec."))
    lines += [f"  {k}: {_short(meta[k])}" for k in spec]
    lines += _dataset_lines(meta, "ss_dataset_dirs", "Dataset folders")
    lines += _dataset_lines(meta, "ss_reg_dataset_dirs", "Regularisation folders")
    lines += _tag_lines(meta, tag_limit)
    if "sshs_model_hash" in meta:
        lines.append(f"  sshs_model_hash: {meta['sshs_model_hash']} ({_hash_status(lora)})")
    shown = set(TRAINING_KEYS) | set(_SHOWN_ELSEWHERE) | set(spec)
    rest = sorted(k for k in meta if k not in shown)
    if rest:
        lines.append("  Other:")
        lines += [f"    {k}: {_short(meta[k])}" for k in rest]
    return lines


def _dataset_lines(meta: dict[str, str], key: str, title: str) -> list[str]:
    dirs = _json(meta, key)
    if not isinstance(dirs, dict) or not dirs:
        return []
    lines = [f"  {title}:", f"    {'folder':<32} {'repeats':>7} {'images':>7}"]
    for folder, info in sorted(dirs.items()):
        info = info if isinstance(info, dict) else {}
        lines.append(f"    {folder:<32} {_count(info.get('n_repeats')):>7} {_count(info.get('img_count')):>7}")
    return lines


def _count(value) -> str:
    """A count from another tool's JSON metadata as shown; '?' for what is no number (null, a list, ...)."""
    return str(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else "?"


def _tag_lines(meta: dict[str, str], limit: int) -> list[str]:
    frequency = _json(meta, "ss_tag_frequency")
    if not isinstance(frequency, dict) or not frequency:
        return []
    lines = []
    for folder, tags in sorted(frequency.items()):
        if not isinstance(tags, dict):
            continue
        ranked = sorted(tags.items(), key=lambda kv: (-_int(kv[1]), kv[0]))
        lines.append(f"  Tag frequency, {folder} ({len(ranked)} tags):")
        lines.append(f"    {'count':>6}  tag")
        shown = ranked if limit <= 0 else ranked[:limit]
        lines += [f"    {_int(count):>6}  {tag}" for tag, count in shown]
        if len(shown) < len(ranked):
            lines.append(f"    ... {len(ranked) - len(shown)} more (--tags 0 shows all)")
    return lines


def _hash_status(lora: LoraFile) -> str:
    """Whether `sshs_model_hash` is the sha256 of the file's tensor-data bytes, as A1111 assumes."""
    try:
        data = Path(lora.source).read_bytes()
    except OSError:
        return "not checked"
    (header_len,) = struct.unpack("<Q", data[:8])
    actual = hashlib.sha256(data[8 + header_len :]).hexdigest()
    if actual == lora.metadata["sshs_model_hash"]:
        return "matches the tensor data"
    return "WRONG: not the sha256 of the tensor data, A1111 shows a wrong hash"


def _readable(key: str, value: str) -> str:
    if key in _TIMESTAMPS:
        try:
            return datetime.fromtimestamp(float(value), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        except (ValueError, OverflowError, OSError):
            return value
    return _short(value)


def _json(meta: dict[str, str], key: str):
    try:
        return json.loads(meta[key]) if key in meta else None
    except json.JSONDecodeError:
        return None


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _short(text: str, limit: int = 120) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- CLI ----------------------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see python -m sd_lora.inspect --help)")


def _tag_count(text: str) -> int:
    """argparse type for --tags: a whole number >= 0."""
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be a number of tags, 0 or more (0 shows all), got {text}")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(prog="python -m sd_lora.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("file", help="the LoRA .safetensors file")
    parser.add_argument("--model", help="a local diffusers model folder to check every module against")
    parser.add_argument("--tags", type=_tag_count, default=20, help="tags shown per dataset folder (0: all; default 20)")

    def body() -> None:
        args = parser.parse_args(argv)
        architecture = architecture_from_model_dir(args.model) if args.model else None
        lora = read_any_lora(args.file, architecture=architecture)
        mismatches = shape_mismatches(lora, architecture) if architecture else None
        print(format_report(lora, base=args.model, mismatches=mismatches, tag_limit=args.tags))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
