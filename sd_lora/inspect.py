"""What is in a LoRA file, and what AUTOMATIC1111, ComfyUI and diffusers will do with it.

    python -m sd_lora.inspect FILE [--model BASE_DIR] [--tags N]

Prints the key format, the model family (from the metadata and, separately, from key names and shapes), the
module count per block, rank and alpha (per module where they vary), the metadata in readable form (tag
frequency as a table, dataset folders, training settings, whether `sshs_model_hash` is right), and a
compatibility report. With `--model` (a local diffusers folder; only its configs are read) every module is
checked against the base model's layers and shapes. Exit status 0, or 2 with `sd_lora: error: ...`.

`compatibility()` holds the loader rules, from /work/shared/reference/lora-format.md §4 and the loaders'
source (A1111 v1.10.1 `extensions-builtin/Lora`, ComfyUI `comfy/lora.py`, diffusers 0.42 `lora_pipeline.py`);
tests/test_inspect.py checks the diffusers verdicts against diffusers itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sd_lora.errors import UserError, run_cli
from sd_lora.formats.diffusers_format import ADAPTER_METADATA_KEY, strip_peft_prefix
from sd_lora.formats.architecture import architecture_from_model_dir
from sd_lora.formats.readers import LoraFile, ModuleEntry, read_any_lora, shape_mismatches

LOADERS = ("AUTOMATIC1111", "ComfyUI", "diffusers")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
FORMAT_NAMES = {
    "kohya": "kohya / WebUI (lora_unet_*, lora_down/lora_up/alpha)",
    "diffusers": "diffusers / PEFT (lora_A/lora_B)",
    "diffusers-old": "old diffusers attention processors (to_q_lora.down/up)",
}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}

# --- compatibility rules ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What one loader does with a file: module names (as in the file) it applies and drops, or a rejection."""

    applies: list[str] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)  # module names, or single keys (stray keys, dora_scale)
    rejects: bool = False  # the loader refuses the whole file
    reasons: list[str] = field(default_factory=list)

    def drop(self, names: list[str], why: str) -> None:
        if names:
            self.drops += names
            self.reasons.append(f"drops {len(names)}: {why} ({_preview(sorted(names), 3)})")

    def reject(self, why: str) -> None:
        self.rejects = True
        self.applies = []  # nothing of a refused file is applied
        self.reasons.append(f"REJECTS the file: {why}")


def compatibility(lora: LoraFile) -> dict[str, Verdict]:
    """{loader: Verdict} for AUTOMATIC1111, ComfyUI and diffusers (the SD / SDXL pipeline of the file's family).

    Pure: uses only the file's keys, the names' resolution against the architecture, and the metadata.
    """
    return {"AUTOMATIC1111": _a1111(lora), "ComfyUI": _comfyui(lora), "diffusers": _diffusers(lora)}


_ATTENTION = re.compile(r".*\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)")
_CLIP_LINEAR = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def _diffusers(lora: LoraFile) -> Verdict:
    v = Verdict()
    dora = [k for k in lora.keys if "dora_scale" in k]
    rest = [k for k in lora.keys if "dora_scale" not in k]
    if dora:
        v.drops += dora
        v.reasons.append(
            f"drops {len(dora)} dora_scale tensors with a warning; those modules load as plain LoRA, not DoRA"
        )
    if rest and all(k.startswith(KOHYA_PREFIXES) for k in rest):
        # kohya conversion (lora_state_dict): renames lora_down/lora_up/alpha of each module; anything left raises.
        left = []
        for m in lora.modules:
            roles = set(m.tensors) - {"dora_scale"}
            if not {"down", "up"} <= roles or roles - {"down", "up", "alpha"}:
                left.append(f"{m.name} ({', '.join(sorted(roles))})")
        left += lora.stray_keys
        if left:
            v.reject(f"its kohya conversion cannot rename {len(left)} keys and raises: {_preview(left, 3)}")
            return v
        _peft_injection(v, lora.modules)
        if lora.family == "sdxl" and any(m.sgm_name for m in lora.modules):
            v.reasons.append("SGM U-Net names are mapped by StableDiffusionXLPipeline (it passes the U-Net config)")
        v.reasons += _alpha_notes(lora)
        return v
    no_lora = [k for k in rest if "lora" not in k]
    if no_lora:
        v.reject(f"{len(no_lora)} keys have no 'lora' in their name ({_preview(no_lora, 3)})")
        return v
    kohya = [m.name for m in lora.modules if m.style == "kohya"]
    v.drop(kohya, "kohya keys in a file that is not all kohya: the kohya conversion is skipped and they are ignored")
    unprefixed = [m.name for m in lora.modules if m.style != "kohya" and not m.prefixed]
    v.drop(unprefixed, "no unet. / text_encoder. prefix: the pipeline loader ignores them")
    _peft_injection(v, [m for m in lora.modules if m.style != "kohya" and m.prefixed])
    v.drop(lora.stray_keys, "not LoRA factors")
    return v


def _peft_injection(v: Verdict, modules: list[ModuleEntry]) -> None:
    """PEFT per component: unknown names are dropped with a warning, but none known raises; norms raise."""
    groups: dict[str, list[ModuleEntry]] = {}
    for m in modules:
        groups.setdefault(_diffusers_component(m), []).append(m)
    for component, members in sorted(groups.items()):
        unknown = [m.name for m in members if m.component is None]
        known = [m for m in members if m.component is not None]
        if not known:
            v.reject(f"no {component} module name matches the model (PEFT: target modules not found)")
            return
        bad_layers = [f"{m.name} ({m.layer.kind})" for m in known if m.layer.kind not in ("linear", "conv")]
        if bad_layers:
            v.reject(f"PEFT cannot put LoRA on {_preview(bad_layers, 3)}")
            return
        v.applies += [m.name for m in known]
        v.drop(unknown, f"unknown {component} modules, dropped with a warning")


def _diffusers_component(m: ModuleEntry) -> str:
    if m.style != "kohya":
        return strip_peft_prefix(m.name).split(".", 1)[0]
    if m.name.startswith("lora_unet_"):
        return "unet"
    return "text_encoder_2" if m.name.startswith("lora_te2_") else "text_encoder"


def _alpha_notes(lora: LoraFile) -> list[str]:
    """diffusers gives every attention module the most common alpha when they differ (lora-format.md §1)."""
    alphas = {
        m.name: float(m.tensors["alpha"].item())
        for m in lora.modules
        if m.component == "unet" and "alpha" in m.tensors and m.path and _ATTENTION.fullmatch(m.path)
    }
    if len(set(alphas.values())) <= 1:
        return []
    common = Counter(alphas.values()).most_common(1)[0][0]
    odd = sorted(n for n, a in alphas.items() if a != common)
    return [f"alpha varies: {len(odd)} attention modules get the most common alpha {common:g} instead of their own"]


def _a1111(lora: LoraFile) -> Verdict:
    v = Verdict()
    dropped: dict[str, list[str]] = {}
    for m in lora.modules:
        why = None
        if m.style != "kohya":
            why = "diffusers-style keys are ignored silently (A1111 reads lora_unet_ / lora_te*_ names)"
        elif m.component is None:
            why = "unknown module names are dropped silently"
        elif not _a1111_finds(m, lora.family):
            why = "A1111 has no layer of that name (SDXL layers outside attention need SGM names; OpenCLIP and "
            why += "non-encoder-layer text modules are not mapped)"
        elif m.kind in ("alpha-only", "incomplete", "other"):
            v.reject(f"no network type accepts the keys of {m.name} ({', '.join(sorted(m.tensors))})")
            continue
        elif m.layer.kind == "norm":
            v.reject(f"LoRA on the norm layer {m.name} (unsupported layer type)")
            continue
        if why:
            dropped.setdefault(why, []).append(m.name)
            continue
        v.applies.append(m.name)
        dora = m.tensors.get("dora_scale")
        if dora is not None and dora.shape[0] != 1:
            v.reasons.append(f"{m.name}: dora_scale {list(dora.shape)} is applied on the input axis only ([1, in])")
    partial = _partial_openclip_attention(lora, set(v.applies))
    if partial:
        v.applies = [n for n in v.applies if n not in partial]
        dropped["OpenCLIP attention LoRA applies only when q, k, v and out_proj are all present"] = partial
    for why, names in dropped.items():
        v.drop(names, why)
    v.drop(lora.stray_keys, "not LoRA keys")
    if lora.family in ("sd2", "sdxl"):
        version = lora.metadata.get("ss_base_model_version", "")
        expected = "sdxl" if lora.family == "sdxl" else "sd_v2"
        if not version.startswith(expected) and not (lora.family == "sd2" and lora.metadata.get("ss_v2") == "True"):
            v.reasons.append(
                f"hidden for {FAMILY_NAMES[lora.family]} checkpoints: ss_base_model_version is "
                f"{version or 'missing'}, so A1111 lists it as SD1"
            )
    return v


def _a1111_finds(m: ModuleEntry, family: str | None) -> bool:
    """Whether A1111's name conversion (`convert_diffusers_name_to_compvis`) reaches this module's layer."""
    if m.component == "unet":
        if m.sgm_name:
            return True  # SGM names map straight onto the checkpoint's layers
        blocks = r"(?:(?:down|up)_blocks\.\d+|mid_block)"
        if re.fullmatch(rf"{blocks}\.attentions\.\d+\..+", m.path):
            return True
        if re.fullmatch(rf"{blocks}\.resnets\.\d+\.(?:conv1|conv2|time_emb_proj|conv_shortcut)", m.path):
            return True
        if re.fullmatch(r"down_blocks\.\d+\.downsamplers\.0\.conv|conv_(?:in|out)|time_embedding\.linear_[12]", m.path):
            return True
        upsampler = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", m.path)
        # numbered as in SD1, where up_blocks.0 has no attention: SDXL's first upsampler is missed
        return bool(upsampler) and (family != "sdxl" or int(upsampler.group(1)) > 0)
    layer = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.\d+\.(.+)", m.path)
    if layer is None:
        return False
    openclip = m.component == "text_encoder_2" or (m.component == "text_encoder" and family == "sd2")
    return not openclip or bool(re.fullmatch(r"self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]", layer.group(1)))


def _partial_openclip_attention(lora: LoraFile, applied: set[str]) -> list[str]:
    """Names of attention modules in OpenCLIP text encoders (SD2's, SDXL's second) without all of q, k, v, out."""
    layers: dict[tuple[str, int], dict[str, str]] = {}
    for m in lora.modules:
        openclip = m.component == "text_encoder_2" or (m.component == "text_encoder" and lora.family == "sd2")
        match = openclip and m.name in applied and _CLIP_LINEAR.fullmatch(m.path)
        if match and match.group(3):
            layers.setdefault((m.component, int(match.group(1))), {})[match.group(3)] = m.name
    return sorted(n for parts in layers.values() if len(parts) < 4 for n in parts.values())


def _comfyui(lora: LoraFile) -> Verdict:
    v = Verdict()
    dropped: dict[str, list[str]] = {}
    for m in lora.modules:
        why = _comfyui_drop(m)
        if why:
            dropped.setdefault(why, []).append(m.name)
            continue
        v.applies.append(m.name)
        if "dora_scale" in m.tensors:
            v.reasons.append(f"{m.name}: dora_scale applied on either axis by its shape (differs from A1111)")
    for why, names in dropped.items():
        v.drop(names, why)
    v.drop(lora.stray_keys, "not LoRA keys, warned ('lora key not loaded')")
    return v


def _comfyui_drop(m: ModuleEntry) -> str | None:
    if m.component is None:
        return "unknown module names, warned ('lora key not loaded')"
    if m.kind == "alpha-only":
        return "an alpha without weights does nothing"
    if m.kind in ("incomplete", "other"):
        return "keys of no known network type, warned"
    if m.layer.kind not in ("linear", "conv"):
        return "LoRA on a norm layer: an error is logged and the layer skipped"
    if m.component != "unet" and not _CLIP_LINEAR.fullmatch(m.path):
        return "only the six linears of each CLIP layer are mapped"
    if m.style == "kohya":
        return None
    name = m.name
    if name.startswith("base_model.model.") or ".base_model.model." in name:
        return "PEFT's base_model.model. prefix is not mapped"
    if m.component != "unet":
        if not m.prefixed or ".text_model." not in name or "_lora" in name.rsplit(".", 1)[-1]:
            return "text-encoder keys need text_encoder[_2].text_model.<layer> names (q_proj, not to_q_lora)"
        return None
    if _ATTENTION.fullmatch(m.path) and ".processor." not in name:
        return "diffusers-format U-Net attention keys (ComfyUI maps attention only as processor.to_q etc.)"
    return None


# --- the report -------------------------------------------------------------------------------------------------

TRAINING_KEYS = {
    "ss_output_name": "output name", "ss_sd_model_name": "trained on", "ss_network_module": "network module",
    "ss_network_dim": "network dim (rank)", "ss_network_alpha": "network alpha", "ss_network_args": "network args",
    "ss_training_started_at": "started", "ss_training_finished_at": "finished", "ss_resolution": "resolution",
    "ss_num_train_images": "training images", "ss_num_reg_images": "regularisation images",
    "ss_steps": "steps", "ss_max_train_steps": "max steps", "ss_epoch": "epoch", "ss_num_epochs": "epochs",
    "ss_batch_size_per_device": "batch size", "ss_gradient_accumulation_steps": "gradient accumulation",
    "ss_learning_rate": "learning rate", "ss_unet_lr": "U-Net lr", "ss_text_encoder_lr": "text encoder lr",
    "ss_lr_scheduler": "lr scheduler", "ss_lr_warmup_steps": "warm-up steps", "ss_optimizer": "optimizer",
    "ss_mixed_precision": "mixed precision", "ss_seed": "seed", "ss_clip_skip": "clip skip",
    "ss_noise_offset": "noise offset", "ss_min_snr_gamma": "min-SNR gamma",
    "ss_caption_dropout_rate": "caption dropout",
    "ss_shuffle_caption": "shuffle captions", "ss_keep_tokens": "keep tokens", "ss_flip_aug": "flip",
    "ss_training_comment": "comment",
}  # fmt: skip
_TIMESTAMPS = ("ss_training_started_at", "ss_training_finished_at")
_SHOWN_ELSEWHERE = ("ss_tag_frequency", "ss_dataset_dirs", "sshs_model_hash", "ss_base_model_version", "ss_v2")


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
        w = lora.components.get(entry.component or "", {}).get(entry.path or "")
        if w is not None:
            pairs[entry.name] = (w.rank, float(w.alpha))
        elif entry.kind == "lora":  # not representable as plain LoRA (DoRA, lora_mid, ...): still has a rank
            rank = int(entry.tensors["down"].shape[0])
            alpha = entry.tensors.get("alpha")
            pairs[entry.name] = (rank, float(alpha.item()) if alpha is not None else float(rank))
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
    lines += _dataset_lines(meta)
    lines += _tag_lines(meta, tag_limit)
    if "sshs_model_hash" in meta:
        lines.append(f"  sshs_model_hash: {meta['sshs_model_hash']} ({_hash_status(lora)})")
    shown = set(TRAINING_KEYS) | set(_SHOWN_ELSEWHERE) | set(spec)
    rest = sorted(k for k in meta if k not in shown)
    if rest:
        lines.append("  Other:")
        lines += [f"    {k}: {_short(meta[k])}" for k in rest]
    return lines


def _dataset_lines(meta: dict[str, str]) -> list[str]:
    dirs = _json(meta, "ss_dataset_dirs")
    if not isinstance(dirs, dict) or not dirs:
        return []
    lines = ["  Dataset folders:", f"    {'folder':<32} {'repeats':>7} {'images':>7}"]
    for folder, info in sorted(dirs.items()):
        info = info if isinstance(info, dict) else {}
        lines.append(f"    {folder:<32} {info.get('n_repeats', '?'):>7} {info.get('img_count', '?'):>7}")
    return lines


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


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --- CLI ----------------------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see python -m sd_lora.inspect --help)")


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(prog="python -m sd_lora.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("file", help="the LoRA .safetensors file")
    parser.add_argument("--model", help="a local diffusers model folder to check every module against")
    parser.add_argument("--tags", type=int, default=20, help="tags shown per dataset folder (0: all; default 20)")

    def body() -> None:
        args = parser.parse_args(argv)
        architecture = architecture_from_model_dir(args.model) if args.model else None
        lora = read_any_lora(args.file, architecture=architecture)
        mismatches = shape_mismatches(lora, architecture) if architecture else None
        print(format_report(lora, base=args.model, mismatches=mismatches, tag_limit=args.tags))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
