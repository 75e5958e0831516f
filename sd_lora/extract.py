"""Extract a LoRA from the difference of two models: tuned - base, per layer, by SVD.

    python -m sd_lora.extract --base BASE --tuned TUNED --rank 32 OUT.safetensors
        [--targets attn-mlp|attn|cross-attn] [--text-encoder] [--energy 0.95] [--min-diff 1e-6]
        [--base-config DIR] [--tuned-config DIR] [--allow-unsafe-pickle]

Both models (diffusers folders, Hub ids or single-file checkpoints) have the same SD1.x / SD2.x / SDXL
architecture; a single-file model that is not a standard SD1.5/SD2.1/SDXL size needs the diffusers folder that
describes it (`--base-config` / `--tuned-config`, what train's `--model-config` is). For every targeted layer
the difference W_tuned - W_base is approximated at rank R (or the per-layer rank keeping `--energy` of its
sigma^2, capped by `--rank`); layers whose difference is ~0 (||dW||_F <= min_diff * ||W_base||_F) are skipped and
counted. The U-Net's `--targets` preset (kohya's attn-mlp by default) is extracted, and with `--text-encoder` the
six linears of every CLIP layer too. Output: a kohya LoRA with the family metadata of the tuned model; reported:
retained energy and relative error per module (summary; every module with --verbose).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from sd_lora.errors import ConfigError, UserError
from sd_lora.formats.kohya import kohya_module_name
from sd_lora.formats.modelspec import family_metadata
from sd_lora.formats.architecture import family_of_config
from sd_lora.fsio import check_output_file, public_name, readable
from sd_lora.formats.sgm import sgm_module_map
from sd_lora.lora import maths
from sd_lora.lora.targets import UNET_PRESETS, text_encoder_target_modules, unet_target_modules
from sd_lora.merge import (
    SAVE_DTYPES,
    ToolArgumentParser,
    error_summary,
    finish_modules,
    positive_rank,
    rank_metadata,
    require_safetensors,
    run_cli,
    write_lora_modules,
)
from sd_lora.models.bake import config_dir_problems, lora_components, load_pipeline
from sd_lora.resize import check_energy

DEFAULT_MIN_DIFF = 1e-6


def layer_difference(base: nn.Module, tuned: nn.Module, paths: list[str], *, what: str) -> dict[str, torch.Tensor]:
    """`{path: W_tuned - W_base}` in float64 for the layers at `paths`; a `UserError` when shapes differ."""
    base_layers, tuned_layers = dict(base.named_modules()), dict(tuned.named_modules())
    diffs, problems = {}, []
    for path in paths:
        if path not in tuned_layers:
            problems.append(f"{path} (missing in the tuned model)")
            continue
        wb, wt = base_layers[path].weight, tuned_layers[path].weight
        if wb.shape != wt.shape:
            problems.append(f"{path} (base {list(wb.shape)}, tuned {list(wt.shape)})")
            continue
        diffs[path] = wt.detach().to(torch.float64) - wb.detach().to(torch.float64)
    if problems:
        raise UserError(
            f"the {what}s of --base and --tuned have different layers: {'; '.join(problems[:3])}"
            f"{f' ... ({len(problems) - 3} more)' if len(problems) > 3 else ''}. Extract only from a model fine-tuned "
            "from the given base."
        )
    return diffs


def is_negligible(diff: torch.Tensor, base_weight: torch.Tensor, min_diff: float) -> bool:
    """||dW||_F <= min_diff * ||W_base||_F (exactly zero always counts as negligible)."""
    norm = float(diff.norm())
    return norm == 0.0 or norm <= min_diff * float(base_weight.detach().to(torch.float64).norm())


def extract_modules(
    base: nn.Module, tuned: nn.Module, component: str, paths: list[str], *,
    rank: int | None, energy: float | None, min_diff: float, sgm_paths: dict[str, str] | None = None,
) -> tuple[dict, dict[str, float], list[str]]:
    """({kohya name: (reference delta, lora)}, {kohya name: retained energy}, skipped paths) for one component."""
    base_layers = dict(base.named_modules())
    results, retained, skipped = {}, {}, []
    for path, diff in layer_difference(base, tuned, paths, what=component).items():
        if is_negligible(diff, base_layers[path].weight, min_diff):
            skipped.append(path)
            continue
        lora, kept, _ = maths.svd_lowrank(diff, rank, energy=energy, dtype=torch.float64)
        name = kohya_module_name(component, path, sgm_paths=sgm_paths if component == "unet" else None)
        results[name] = (diff, lora)
        retained[name] = kept
    return results, retained, skipped


def _differing_layers(base: nn.Module, tuned: nn.Module, exclude: set[str], min_diff: float) -> int:
    """How many Linear/Conv2d layers outside `exclude` differ between the models (for a "you left out" note)."""
    tuned_layers = dict(tuned.named_modules())
    count = 0
    for path, layer in base.named_modules():
        if path in exclude or not isinstance(layer, (nn.Linear, nn.Conv2d)) or path not in tuned_layers:
            continue
        other = tuned_layers[path].weight
        if other.shape == layer.weight.shape:
            diff = other.detach().to(torch.float64) - layer.weight.detach().to(torch.float64)
            count += not is_negligible(diff, layer.weight, min_diff)
    return count


@dataclass
class Extraction:
    results: dict  # kohya name -> (reference delta, lora)
    retained: dict[str, float]  # kohya name -> retained energy
    skipped: list[str]  # "component: path" of layers whose difference is ~0
    notes: list[str]  # what else differs and was not extracted


def extract_pipelines(
    base, tuned, *, rank: int | None, energy: float | None, targets: str, text_encoder: bool, min_diff: float
) -> Extraction:
    """SVD of tuned - base for the `targets` U-Net layers (and, with `text_encoder`, every CLIP linear)."""
    base_models, tuned_models = lora_components(base), lora_components(tuned)
    sgm_paths = sgm_module_map(base.unet) if "text_encoder_2" in base_models else None
    found = Extraction({}, {}, [], [])
    for component, base_model in base_models.items():
        if component == "unet":
            paths = unet_target_modules(base_model, targets)
        elif text_encoder:
            paths = text_encoder_target_modules(base_model)
        else:
            if differing := _differing_layers(base_model, tuned_models[component], set(), min_diff):
                found.notes.append(f"{differing} {component} layers differ; pass --text-encoder to extract them too")
            continue
        results, retained, skipped = extract_modules(
            base_model, tuned_models[component], component, paths,
            rank=rank, energy=energy, min_diff=min_diff, sgm_paths=sgm_paths,
        )  # fmt: skip
        found.results.update(results)
        found.retained.update(retained)
        found.skipped += [f"{component}: {path}" for path in skipped]
        if component == "unet" and (other := _differing_layers(base_model, tuned_models["unet"], set(paths), min_diff)):
            found.notes.append(f"{other} other U-Net layers differ too (outside --targets {targets}; not extracted)")
    return found


def extract_file(
    base_name: str, tuned_name: str, output: Path, *, rank: int | None, energy: float | None, targets: str,
    text_encoder: bool, min_diff: float, save_precision: str, verbose: bool,
    base_config: Path | None = None, tuned_config: Path | None = None, allow_unsafe_pickle: bool = False,
) -> Path:
    """`base_config` / `tuned_config`: the diffusers folder describing a single-file model of another size;
    `allow_unsafe_pickle`: let either model be a pickled .ckpt."""
    if rank is None and energy is None:
        raise UserError("give --rank R (e.g. 32), or --energy E for a per-module rank (optionally capped by --rank)")
    check_energy(energy)
    if not min_diff >= 0.0:
        raise UserError(f"--min-diff {min_diff}: must be a non-negative number such as 1e-6")
    require_safetensors(output, "OUT", "the extracted LoRA")
    check_output_file(output, [base_name, tuned_name], "OUT")
    problems = config_dir_problems(base_name, base_config, flag="--base", config_flag="--base-config")
    problems += config_dir_problems(tuned_name, tuned_config, flag="--tuned", config_flag="--tuned-config")
    if problems:
        raise ConfigError(problems)
    base, base_family = _load(base_name, "--base", base_config, allow_unsafe_pickle)
    tuned, family = _load(tuned_name, "--tuned", tuned_config, allow_unsafe_pickle)
    if base_family != family:
        raise UserError(f"--base {base_name} is {base_family} but --tuned {tuned_name} is {family}; "
                        "extract from two models of the same family")

    found = extract_pipelines(base, tuned, rank=rank, energy=energy, targets=targets, text_encoder=text_encoder,
                              min_diff=min_diff)
    if not found.results:
        raise UserError(
            f"--base {base_name} and --tuned {tuned_name} do not differ in any targeted layer (all "
            f"{len(found.skipped)} within --min-diff {min_diff:g}); nothing to extract."
            + "".join(f" Note: {n}." for n in found.notes)
        )
    modules, errors = finish_modules(found.results, SAVE_DTYPES[save_precision])
    prediction_type = tuned.scheduler.config.get("prediction_type", "epsilon")
    resolution = int(tuned.unet.config.sample_size) * 2 ** (len(tuned.vae.config.block_out_channels) - 1)
    metadata = family_metadata(family=family, prediction_type=prediction_type, resolution=(resolution, resolution),
                               title=readable(output.stem), date=datetime.now(timezone.utc))
    metadata.update(rank_metadata(modules))
    metadata.update({
        "ss_output_name": readable(output.stem),  # metadata must be UTF-8; a file name need not be
        "ss_network_args": json.dumps({"targets": targets, "train_text_encoder": text_encoder}),
        "ss_sd_model_name": public_name(str(base_name)),  # a Hub id whole, a local path by its basename
        "sd_lora_extract": json.dumps({
            "base": public_name(str(base_name)), "tuned": public_name(str(tuned_name)), "rank": rank, "energy": energy,
            "min_diff": min_diff, "skipped_modules": len(found.skipped),
        }),
    })  # fmt: skip
    write_lora_modules(output, modules, metadata)

    ranks = sorted({w.rank for w in modules.values()})
    span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    print(f"extracted {len(modules)} modules ({family}, rank {span}, {save_precision}); "
          f"skipped {len(found.skipped)} whose difference is ~0 (<= {min_diff:g} of the weight)")
    retained = found.retained
    lowest = min(retained, key=retained.get)
    print(f"retained energy: min {retained[lowest]:.4f} ({lowest}), mean {sum(retained.values()) / len(retained):.4f}")
    if verbose:
        for name in sorted(retained):
            print(f"  {name}: energy {retained[name]:.4f}, relative error {errors[name]:.3g}")
    print(error_summary(errors))
    for note in found.notes:
        print(f"note: {note}")
    print(f"wrote {output}")
    return output


def _load(name: str, flag: str, config_dir: Path | None, allow_unsafe_pickle: bool):
    """(pipeline, family) of a diffusers folder, Hub id or single-file checkpoint (the options: see `extract_file`)."""
    try:
        pipe = load_pipeline(name, config_dir=config_dir, allow_unsafe_pickle=allow_unsafe_pickle)
    except UserError as e:  # its messages name train's --model / --model-config; say which of the two models it was
        raise UserError(re.sub(r"--model(-config)?\b", lambda m: flag + (m.group(1) or ""), str(e))) from None
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    return pipe, family_of_config(dict(pipe.unet.config), sdxl_text_encoders=sdxl)


def main(argv: list[str] | None = None) -> int:
    parser = ToolArgumentParser(
        prog="python -m sd_lora.extract", description="Extract a LoRA from the difference tuned - base, by SVD."
    )
    parser.add_argument("output", type=Path, help="LoRA .safetensors to write")
    parser.add_argument("--base", required=True,
                        help="the base model (diffusers folder, Hub id or single-file checkpoint)")
    parser.add_argument("--tuned", required=True, help="the fine-tuned model (same architecture)")
    parser.add_argument("--base-config", type=Path, metavar="DIR",
                        help="with a single-file --base that is not a standard SD1.5/SD2.1/SDXL size: the diffusers "
                             "folder whose configs and tokenizer describe it (as train's --model-config)")
    parser.add_argument("--tuned-config", type=Path, metavar="DIR",
                        help="the same for a single-file --tuned")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="allow a pickled .ckpt checkpoint as --base or --tuned (pickle can run code; prefer .safetensors)")
    parser.add_argument("--rank", type=positive_rank, help="rank per module (with --energy: the largest allowed)")
    parser.add_argument("--energy", type=float, help="per-module rank keeping this fraction of sigma^2, in (0, 1]")
    parser.add_argument("--targets", choices=UNET_PRESETS, default="attn-mlp", help="U-Net layers (default attn-mlp)")
    parser.add_argument("--text-encoder", action="store_true", help="also extract the text encoder's layers")
    parser.add_argument("--min-diff", type=float, default=DEFAULT_MIN_DIFF,
                        help="skip layers with ||dW|| <= this fraction of ||W|| (default 1e-6)")
    parser.add_argument("--save-precision", choices=sorted(SAVE_DTYPES), default="fp32")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every module's energy and error")

    def body():
        args = parser.parse_args(argv)
        extract_file(args.base, args.tuned, args.output, rank=args.rank, energy=args.energy, targets=args.targets,
                     text_encoder=args.text_encoder, min_diff=args.min_diff, save_precision=args.save_precision,
                     verbose=args.verbose, base_config=args.base_config, tuned_config=args.tuned_config,
                     allow_unsafe_pickle=args.allow_unsafe_pickle)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
