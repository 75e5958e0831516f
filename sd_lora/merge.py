"""Merge several LoRAs into one, or bake LoRAs into a base model.

    python -m sd_lora.merge --lora A.safetensors:0.7 --lora B.safetensors:0.3 --output C.safetensors [--rank R]
    python -m sd_lora.merge --model BASE --lora A.safetensors:0.8 --output MERGED_DIR | MERGED.safetensors

Inputs: kohya, diffusers/PEFT or old-diffusers LoRA files (read by `formats.readers`).

LoRA + LoRA: exact by default - the modules' ranks are concatenated, so the merged file changes every layer by
exactly sum(weight_i * delta_i) (up to the storage precision). `--rank R` instead keeps the best rank-R
approximation of that sum (SVD) and reports each module's relative error. A module present in only some
inputs is merged from those. Inputs must be for the same model family (SD1, SD2 or SDXL). Output: kohya.

LoRA + base model (BASE: a diffusers folder, Hub id or single-file checkpoint): the LoRAs are added into the
weights (`sd_lora.models.bake`) and the model is written as a diffusers folder, or as a single-file checkpoint in
the original layout A1111/ComfyUI load when the output ends in .safetensors. A single-file BASE that is not a
standard SD1.5/SD2.1/SDXL size needs `--model-config DIR`, the diffusers folder describing it (as in train).

This module also holds the LoRA-file plumbing the other tools (`resize`, `extract`) share: reading a file into
`{kohya module name: LoraModuleWeights}`, writing one back with consistent rank/alpha metadata, and the CLI
conventions (a `UserError` prints `sd_lora: error: ...` and exits with status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from sd_lora.errors import ConfigError, UserError, run_cli
from sd_lora.export import SAVE_DTYPES
from sd_lora.formats.kohya import KEY_SUFFIXES, save_lora_file
from sd_lora.fsio import check_output_file, readable
from sd_lora.formats.modelspec import missing_family_metadata
from sd_lora.formats.readers import family_from_metadata, kohya_state_dict_of, read_any_lora
from sd_lora.lora import maths
from sd_lora.lora.inject import LoraModuleWeights

_DTYPE_NAMES = {v: k for k, v in SAVE_DTYPES.items()}
# Metadata that says which model family a LoRA is for; A1111 hides a LoRA whose family does not match.
FAMILY_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture")
# Kept in a merged file when every input that has them agrees.
SHARED_KEYS = FAMILY_KEYS + (
    "modelspec.sai_model_spec",
    "modelspec.implementation",
    "modelspec.prediction_type",
    "modelspec.resolution",
)
RANKS_NOTE_KEY = "sd_lora_module_ranks"  # JSON {kohya module name: rank}, written when ranks vary per module
_KEY_RE = re.compile(r"(lora_(?:unet|te|te1|te2)_[^.]+)\.(" + "|".join(re.escape(s) for s in KEY_SUFFIXES) + ")")


# --- CLI conventions ------------------------------------------------------------------------------------------


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are `UserError`s, so every CLI mistake ends the same way (status 2)."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def positive_rank(text: str) -> int:
    """argparse type for --rank."""
    try:
        rank = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rank {text!r} is not an integer; pass a positive rank such as 16"
        ) from None
    if rank <= 0:
        raise argparse.ArgumentTypeError(f"--rank {rank}: the rank must be a positive integer, such as 16")
    return rank


def require_safetensors(path: Path, flag: str, what: str) -> None:
    if path.suffix.lower() != ".safetensors":  # as the WebUIs list them: any case (LORA.SAFETENSORS from Windows)
        suggestion = path.with_suffix(".safetensors")
        raise UserError(f"{flag} {path}: {what} is a .safetensors file; name it e.g. {suggestion}")


# --- LoRA files as {kohya module name: weights} ---------------------------------------------------------------


@dataclass
class LoraFile:
    path: Path
    modules: dict[str, LoraModuleWeights]  # kohya module name (`lora_unet_...`) -> weights
    metadata: dict[str, str]
    dtype: torch.dtype  # storage dtype of the factors
    detected_family: str | None = None  # what `formats.readers` made of the file's keys, shapes and metadata

    @property
    def family(self) -> str | None:
        """"sd1" | "sd2" | "sdxl": the family metadata (what A1111 goes by), else what the keys and shapes say."""
        return family_from_metadata(self.metadata)[0] or self.detected_family


def read_lora_modules(path: str | Path) -> LoraFile:
    """A LoRA file grouped by module, without a base model (names are kohya names).

    Any format `formats.readers` reads (kohya, diffusers/PEFT, old diffusers); anything it cannot represent
    exactly (LoHa, DoRA, unknown modules) is refused, naming it."""
    path = Path(path)
    lora = read_any_lora(path)
    state, metadata = kohya_state_dict_of(lora), dict(lora.metadata)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY_RE.fullmatch(key)
        assert match is not None, key  # kohya_state_dict_of writes exactly three kohya keys per module
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    down_key, up_key, alpha_key = KEY_SUFFIXES
    modules = {
        name: LoraModuleWeights(down=t[down_key], up=t[up_key], alpha=float(t[alpha_key].item()))
        for name, t in sorted(parts.items())
    }
    dtypes = Counter(w.down.dtype for w in modules.values())
    return LoraFile(path=path, modules=modules, metadata=metadata, dtype=dtypes.most_common(1)[0][0],
                    detected_family=lora.family)


def write_lora_modules(
    path: str | Path, modules: Mapping[str, LoraModuleWeights], metadata: dict[str, str]
) -> Path:
    """Write `{kohya module name: weights}` as a kohya file (tensors as they are; alpha float32) atomically."""
    state: dict[str, torch.Tensor] = {}
    down_key, up_key, alpha_key = KEY_SUFFIXES
    for name, w in sorted(modules.items()):
        state[f"{name}.{down_key}"] = w.down.detach().to("cpu").contiguous()
        state[f"{name}.{up_key}"] = w.up.detach().to("cpu").contiguous()
        state[f"{name}.{alpha_key}"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return save_lora_file(path, state, metadata)


def check_one_family(files: list[LoraFile]) -> str | None:
    """The inputs' common family; a `UserError` listing each file's family when they differ."""
    families = {f.path: f.family for f in files}
    known = {fam for fam in families.values() if fam is not None}
    if len(known) > 1:
        listing = ", ".join(f"{path} is {fam or 'unknown'}" for path, fam in families.items())
        raise UserError(
            f"the LoRAs are for different model families ({listing}). A LoRA only fits the family it was "
            "trained for; merge LoRAs of one family (SD1, SD2 or SDXL) at a time."
        )
    return known.pop() if known else None


# --- ranks, alpha and the stored result ------------------------------------------------------------------------


def common_alpha(ranks: Iterable[int]) -> float:
    """One alpha for every module of a written file: the most common rank (ties: the larger), so most modules
    have scale 1. Other modules get their scale folded into `up` (`maths.with_alpha`); see that docstring."""
    counts = Counter(ranks)
    return float(max(counts, key=lambda r: (counts[r], r)))


def finish_modules(
    results: Mapping[str, tuple[torch.Tensor | LoraModuleWeights, LoraModuleWeights]], dtype: torch.dtype
) -> tuple[dict[str, LoraModuleWeights], dict[str, float]]:
    """`{name: (reference delta, new lora)}` -> (stored modules, relative error per module).

    Gives every module one alpha, rounds the factors to the storage `dtype`, then measures each module's
    relative error against its reference on exactly those stored factors (float64): the reported error is the
    file's, rounding included.
    """
    alpha = common_alpha(lora.rank for _, lora in results.values())
    modules, errors = {}, {}
    for name, (reference, lora) in results.items():
        lora = maths.with_alpha(lora, alpha)
        stored = LoraModuleWeights(down=lora.down.to(dtype), up=lora.up.to(dtype), alpha=lora.alpha)
        modules[name] = stored
        errors[name] = maths.relative_error(reference, stored)
    return modules, errors


def rank_metadata(modules: Mapping[str, LoraModuleWeights]) -> dict[str, str]:
    """ss_network_dim / ss_network_alpha for `modules` (one alpha, see `finish_modules`).

    Ranks varying per module: ss_network_dim is "Dynamic" (what kohya's dynamic resize writes) and the ranks
    go to `sd_lora_module_ranks` as JSON.
    """
    ranks = {name: w.rank for name, w in sorted(modules.items())}
    alphas = {float(w.alpha) for w in modules.values()}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_alpha": _number(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }
    if len(set(ranks.values())) == 1:
        meta["ss_network_dim"] = str(next(iter(ranks.values())))
    else:
        meta["ss_network_dim"] = "Dynamic"
        meta[RANKS_NOTE_KEY] = json.dumps(ranks)
    return meta


def error_summary(errors: Mapping[str, float], verbose: bool = False, label: str = "relative error") -> str:
    """`relative error: max 1.2e-03 (lora_unet_...), mean 4.0e-04 over 48 modules`, one line per module if verbose."""
    worst = max(errors, key=errors.get)
    mean = sum(errors.values()) / len(errors)
    lines = [f"{label}: max {errors[worst]:.3g} ({worst}), mean {mean:.3g} over {len(errors)} modules"]
    if verbose:
        lines += [f"  {name}: {err:.3g}" for name, err in sorted(errors.items())]
    return "\n".join(lines)


# --- merging -------------------------------------------------------------------------------------------------


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`"A.safetensors:0.7"` -> (Path("A.safetensors"), 0.7); no `:weight` means 1.0.

    A path that itself contains `:` (Windows drives) is kept whole unless what follows the last `:` is a number.
    """
    path, sep, weight_text = text.rpartition(":")
    if not sep or not path or "/" in weight_text or "\\" in weight_text:
        return Path(text), 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        if Path(text).is_file():
            return Path(text), 1.0
        raise UserError(
            f"--lora {text}: {weight_text!r} is not a weight. Write FILE:WEIGHT with a number, e.g. "
            f"--lora {path}:0.7 (or just --lora {path} for weight 1)"
        ) from None
    if not math.isfinite(weight) or weight == 0.0:
        raise UserError(f"--lora {text}: the weight must be a finite, non-zero number, such as 0.7 (got {weight_text})")
    return Path(path), weight


def merge_loras(
    inputs: list[tuple[LoraFile, float]], rank: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, LoraModuleWeights], dict[str, float]]:
    """(merged modules, relative error per module) of `sum(weight_i * LoRA_i)`.

    Without `rank`: exact rank concatenation (the error is the storage rounding only). With `rank`: per module the
    best rank-`rank` approximation of the weighted sum (SVD), error measured on the stored factors.
    """
    names = sorted({name for f, _ in inputs for name in f.modules})
    mismatched = []
    results = {}
    for name in names:
        parts = [(f.modules[name], weight) for f, weight in inputs if name in f.modules]
        shapes = {maths.delta_shape(w) for w, _ in parts}
        if len(shapes) > 1:
            where = ", ".join(
                f"{f.path}: {list(maths.delta_shape(w))}" for f, _ in inputs if (w := f.modules.get(name)) is not None
            )
            mismatched.append(f"{name} ({where})")
            continue
        exact = maths.concat(parts, dtype=torch.float64)
        merged = exact if rank is None else maths.svd_lowrank(exact, rank, dtype=torch.float64)[0]
        results[name] = (exact, merged)
    if mismatched:
        raise UserError(
            f"{len(mismatched)} modules have different shapes in different files: {_preview(mismatched, 3)}. "
            "The LoRAs were trained for different base models (e.g. SD1 and SD2); merge LoRAs of one base model."
        )
    return finish_modules(results, dtype)


def merged_metadata(
    inputs: list[tuple[LoraFile, float]], modules: Mapping[str, LoraModuleWeights], output: Path, method: dict
) -> tuple[dict[str, str], list[str]]:
    """(metadata for the merged file, shared keys dropped because the inputs disagree on them)."""
    meta, dropped = {}, []
    for key in SHARED_KEYS:
        values = {f.metadata[key] for f, _ in inputs if key in f.metadata}
        if len(values) == 1:
            meta[key] = values.pop()
        elif values:
            dropped.append(f"{key} ({' / '.join(sorted(values))})")
    meta.update(rank_metadata(modules))
    meta.update(
        {
            "ss_output_name": readable(output.stem),  # metadata must be UTF-8; a file name need not be
            "modelspec.title": readable(output.stem),
            "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "sd_lora_merge": json.dumps(
                {
                    **method,
                    "inputs": [
                        {"file": f.path.name, "weight": w, "sshs_model_hash": f.metadata.get("sshs_model_hash")}
                        for f, w in inputs
                    ],
                }
            ),
        }
    )
    return meta, dropped


def _storage_dtype(choice: str | None, files: list[LoraFile]) -> torch.dtype:
    """--save-precision, else the inputs' dtype when they agree, else float32."""
    if choice is not None:
        return SAVE_DTYPES[choice]
    dtypes = {f.dtype for f in files}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in _DTYPE_NAMES else torch.float32


def merge_files(
    loras: list[tuple[Path, float]], output: Path, *, rank: int | None, save_precision: str | None, verbose: bool
) -> Path:
    require_safetensors(output, "--output", "a merged LoRA")
    check_output_file(output, [path for path, _ in loras], "--output")
    files = [read_lora_modules(path) for path, _ in loras]
    inputs = list(zip(files, (w for _, w in loras)))
    family = check_one_family(files)
    dtype = _storage_dtype(save_precision, files)
    modules, errors = merge_loras(inputs, rank, dtype)
    method = {"method": "concat"} if rank is None else {"method": "svd", "rank": rank}
    metadata, dropped = merged_metadata(inputs, modules, output, method)
    added = missing_family_metadata(metadata, family)  # the inputs' family, also when none of them said it
    metadata |= added
    write_lora_modules(output, modules, metadata)

    ranks = sorted({w.rank for w in modules.values()})
    how = "exact rank concatenation" if rank is None else f"SVD to rank {rank}"
    if rank is not None and ranks[-1] < rank:  # the SVD never keeps more than a module's change has
        how = f"SVD to rank {ranks[-1]} (--rank {rank} is more than any module's change has)"
    print(f"merged {len(files)} LoRAs ({family or 'family unknown'}) by {how}: {len(modules)} modules, "
          f"rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, {_DTYPE_NAMES[dtype]}")
    for f, w in inputs:
        print(f"  {f.path} x {w:g} ({len(f.modules)} modules)")
    print(error_summary(errors, verbose))
    if dropped:
        print(f"note: the inputs disagree on {', '.join(dropped)}; left out of the merged file's metadata")
    if added:
        print(f"added metadata: {', '.join(f'{k}={v}' for k, v in added.items())}")
    print(f"wrote {output}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = ToolArgumentParser(
        prog="python -m sd_lora.merge",
        description="Merge LoRAs into one LoRA (exact, or SVD to --rank), or bake them into a base model (--model).",
    )
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                        help="a LoRA file (kohya or diffusers format) and its weight (default 1); repeat per LoRA")
    parser.add_argument("--output", required=True, type=Path,
                        help="merged LoRA .safetensors; with --model: a diffusers folder, or a single-file "
                             "checkpoint (original A1111/ComfyUI layout) when it ends in .safetensors")
    parser.add_argument("--rank", type=positive_rank,
                        help="SVD-compress the merged LoRA to this rank (default: exact concatenation)")
    parser.add_argument("--model", help="bake the LoRAs into this base model instead (diffusers folder, Hub id "
                                        "or single-file checkpoint)")
    parser.add_argument("--model-config", type=Path, metavar="DIR",
                        help="with a single-file --model that is not a standard SD1.5/SD2.1/SDXL size: the diffusers "
                             "folder whose configs and tokenizer describe it (as train's --model-config)")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="with --model: allow a pickled .ckpt checkpoint (pickle can run code; "
                             "prefer .safetensors)")
    parser.add_argument("--save-precision", choices=sorted(SAVE_DTYPES),
                        help="storage precision (default: the LoRAs' own when they agree, else fp32; "
                             "fp32 for --model)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every module's relative error")

    def body():
        args = parser.parse_args(argv)
        loras = [parse_lora_arg(text) for text in args.lora]
        from sd_lora.models.bake import bake_model, config_dir_problems

        problems = config_dir_problems(args.model, args.model_config)
        if args.model is None and args.allow_unsafe_pickle:
            problems.append("--allow-unsafe-pickle lets --model be a pickled .ckpt; without --model it has no "
                            "meaning (LoRA inputs are always .safetensors). Drop it, or give --model.")
        if args.model is not None and args.rank is not None:
            problems.append("--rank compresses a merged LoRA; it has no meaning with --model (baking is exact). "
                            "Drop --rank.")
        if args.model is not None and args.verbose:
            problems.append("--verbose prints each module's merge error; baking into --model is exact and has none. "
                            "Drop --verbose.")
        if problems:
            raise ConfigError(problems)
        if args.model is None:
            merge_files(loras, args.output, rank=args.rank, save_precision=args.save_precision, verbose=args.verbose)
            return
        bake_model(args.model, loras, args.output, save_precision=args.save_precision or "fp32",
                   config_dir=args.model_config, allow_unsafe_pickle=args.allow_unsafe_pickle)

    return run_cli(body)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


if __name__ == "__main__":
    sys.exit(main())
