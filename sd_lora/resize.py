"""Change a LoRA's rank by SVD, per module.

    python -m sd_lora.resize IN.safetensors OUT.safetensors --rank 8
    python -m sd_lora.resize IN.safetensors OUT.safetensors --energy 0.95 [--rank 32]

`--rank R`: every module keeps its best rank-R approximation (Eckart-Young; never more than its current rank).
`--energy E`: each module gets the smallest rank that keeps the fraction E of its sum of squared singular
values (`--rank` then caps it), so ranks vary per module. Reported: retained energy and each module's relative
error ||delta - delta_new||_F / ||delta||_F, measured on the factors as stored (rounding included).

Metadata is kept (`ss_base_model_version` / `ss_v2` added for the detected family when missing, as `convert` and
`merge` do), except the input's own file hashes (`formats.kohya.FILE_HASH_KEYS`), what was measured on its weights
(`formats.kohya.MEASURED_KEYS`: the best validation loss; the resized LoRA's loss is not that) and a diffusers input's
`lora_adapter_metadata` (its PEFT config: the old ranks and alphas; diffusers refuses a kohya file that has both it
and alpha tensors); ss_network_dim / ss_network_alpha are updated, and when ranks vary per module ss_network_dim
is "Dynamic" and the ranks are listed under `sd_lora_module_ranks` (JSON). `sd_lora_resize` records how.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sd_lora.errors import UserError
from sd_lora.formats.diffusers_format import ADAPTER_METADATA_KEY
from sd_lora.formats.kohya import FILE_HASH_KEYS, MEASURED_KEYS
from sd_lora.formats.modelspec import missing_family_metadata
from sd_lora.fsio import check_output_file
from sd_lora.lora import maths
from sd_lora.merge import (
    RANKS_NOTE_KEY,
    SAVE_DTYPES,
    ToolArgumentParser,
    error_summary,
    finish_modules,
    positive_rank,
    rank_metadata,
    read_lora_modules,
    require_safetensors,
    run_cli,
    write_lora_modules,
)


def check_energy(energy: float | None) -> None:
    if energy is not None and not (0.0 < energy <= 1.0):
        raise UserError(f"--energy {energy}: must be a fraction in (0, 1], e.g. 0.95 to keep 95% of each module's "
                        "energy (sum of squared singular values)")


def resize_modules(modules: dict, rank: int | None, energy: float | None, dtype: torch.dtype):
    """(new modules, relative error per module, retained energy per module)."""
    results, retained = {}, {}
    for name, w in modules.items():
        lora, kept, _ = maths.svd_lowrank(w, rank, energy=energy, dtype=torch.float64)
        results[name] = (w, lora)
        retained[name] = kept
    new, errors = finish_modules(results, dtype)
    return new, errors, retained


def resize_file(
    src: Path, dst: Path, *, rank: int | None, energy: float | None, save_precision: str | None, verbose: bool
) -> Path:
    if rank is None and energy is None:
        raise UserError("give --rank R (the same rank for every module) or --energy E (per-module rank keeping the "
                        "fraction E of the energy), or both")
    check_energy(energy)
    require_safetensors(dst, "OUT", "the resized LoRA")
    check_output_file(dst, [src], "OUT")
    lora = read_lora_modules(src)
    dtype = SAVE_DTYPES[save_precision] if save_precision else lora.dtype
    modules, errors, retained = resize_modules(lora.modules, rank, energy, dtype)

    stale = (*FILE_HASH_KEYS, *MEASURED_KEYS, ADAPTER_METADATA_KEY, RANKS_NOTE_KEY)  # true of the input only
    metadata = {k: v for k, v in lora.metadata.items() if k not in stale}
    unmeasured = [k for k in MEASURED_KEYS if k in lora.metadata]
    added = missing_family_metadata(metadata, lora.family)
    metadata.update(added)
    metadata.update(rank_metadata(modules))
    old_ranks = sorted({w.rank for w in lora.modules.values()})
    metadata["sd_lora_resize"] = json.dumps(
        {"from_file": src.name, "from_ranks": [old_ranks[0], old_ranks[-1]], "rank": rank, "energy": energy}
    )
    write_lora_modules(dst, modules, metadata)

    new_ranks = [w.rank for w in modules.values()]
    before = sum(w.down.numel() + w.up.numel() for w in lora.modules.values())
    after = sum(w.down.numel() + w.up.numel() for w in modules.values())
    print(f"resized {src}: {len(modules)} modules, rank {_span(old_ranks)} -> {_span(sorted(set(new_ranks)))} "
          f"(mean {sum(new_ranks) / len(new_ranks):.1f}), {before:,} -> {after:,} parameters")
    lowest = min(retained, key=retained.get)
    print(f"retained energy: min {retained[lowest]:.4f} ({lowest}), mean {sum(retained.values()) / len(retained):.4f}")
    print(error_summary(errors, verbose))
    if added:
        print(f"added metadata: {', '.join(f'{k}={v}' for k, v in added.items())}")
    if unmeasured:
        print(f"dropped metadata: {', '.join(unmeasured)} (the input's validation loss, not the "
              "resized LoRA's)")
    print(f"wrote {dst}")
    return dst


def _span(ranks: list[int]) -> str:
    return str(ranks[0]) if ranks[0] == ranks[-1] else f"{ranks[0]}-{ranks[-1]}"


def main(argv: list[str] | None = None) -> int:
    parser = ToolArgumentParser(prog="python -m sd_lora.resize", description="Change a LoRA's rank by SVD, per module.")
    parser.add_argument("input", type=Path, help="the LoRA .safetensors to resize (kohya, diffusers or old diffusers keys)")
    parser.add_argument("output", type=Path, help="the resized LoRA .safetensors (kohya format)")
    parser.add_argument("--rank", type=positive_rank, help="new rank (with --energy: the largest rank allowed)")
    parser.add_argument("--energy", type=float, help="per-module rank keeping this fraction of sigma^2, in (0, 1]")
    parser.add_argument("--save-precision", choices=sorted(SAVE_DTYPES), help="default: the input file's")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every module's relative error")

    def body():
        args = parser.parse_args(argv)
        resize_file(args.input, args.output, rank=args.rank, energy=args.energy,
                    save_precision=args.save_precision, verbose=args.verbose)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
