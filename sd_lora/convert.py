"""Convert a LoRA file between the kohya/WebUI and the diffusers key formats, exactly.

    python -m sd_lora.convert IN OUT --to kohya|diffusers [--model BASE_DIR]

IN may be any format `formats.readers` reads (kohya, diffusers/PEFT, old diffusers). Names are resolved by lookup
against the full-size model of the file's family, or against `--model` (a local diffusers folder; needed for
SDXL-like U-Nets whose block layout differs from SDXL base). A file holding anything that is not a plain LoRA
(LoHa, LoKr, DoRA, `lora_mid`, norm-layer LoRA, unknown module names, orphan alphas) is refused, not
approximated; `python -m sd_lora.inspect IN` says what is in it.

- `--to kohya`: written by `formats.kohya.save_lora_file` (SDXL U-Net names in kohya's SGM spelling), keeping the
  input's metadata (`ss_*`, `modelspec.*`; `sshs_model_hash` recomputed, the input's `sshs_legacy_hash` and
  `modelspec.hash_sha256` dropped: they hash the input's bytes) and adding `ss_base_model_version` /
  `ss_v2` when the input lacks them and the family is known, so A1111 lists the file under the right model.
  Modules with different alphas (PEFT `alpha_pattern` / `rank_pattern`, mixed kohya alphas) are given the most
  common one, their scale folded into `up` (`lora.maths.with_alpha`): diffusers applies one alpha to every
  module of a kohya file, so per-module alphas load wrong there.
- `--to diffusers`: `formats.diffusers_format`, alpha baked into lora_B (see there why); the metadata is kept too.

Exact: the factors are copied bit for bit (in their own dtype, or float32 when the input mixes dtypes). The
changes are in how the scale is stored, never in the weight change: kohya -> diffusers scales lora_B by alpha / r
(diffusers has no alpha), so diffusers -> kohya gives alpha = r; and per-module alphas are unified (above).
Every output is read back and compared with the factors meant to be written before the command reports success.

Either way `ss_network_dim` / `ss_network_alpha` are set to what the written file holds (`merge.rank_metadata`:
"Dynamic" and `sd_lora_module_ranks` when modules differ), never kept from the input: a diffusers file trained with
alpha 2 holds alpha = rank once converted, and a WebUI showing the input's "alpha 2" would mislead.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd_lora.errors import UserError, run_cli
from sd_lora.fsio import check_output_file
from sd_lora.formats.diffusers_format import (
    ADAPTER_METADATA_KEY,
    bake_alpha,
    save_diffusers_lora_file,
    to_diffusers_state_dict,
)
from sd_lora.formats.kohya import FILE_HASH_KEYS, kohya_module_name, save_lora_file, to_kohya_state_dict
from sd_lora.formats.architecture import Architecture, architecture_from_model_dir
from sd_lora.formats.modelspec import missing_family_metadata
from sd_lora.formats.readers import LoraFile, common_dtype, read_any_lora, require_exact
from sd_lora.lora import maths
from sd_lora.lora.inject import LoraModuleWeights
from sd_lora.merge import RANKS_NOTE_KEY, rank_metadata, require_safetensors

TARGETS = ("kohya", "diffusers")


@dataclass
class Conversion:
    source: LoraFile
    output: Path
    to: str
    added_metadata: dict[str, str]
    unified_alpha: float | None = None  # the one alpha every module got, when the input's alphas differed
    # ss_network_dim / ss_network_alpha the input said otherwise: key -> (input's value, written value)
    corrected_metadata: dict[str, tuple[str, str]] = field(default_factory=dict)


def convert_lora(src: str | Path, dst: str | Path, to: str, *, architecture: Architecture | None = None) -> Conversion:
    """Convert `src` to `dst` in format `to` ("kohya" | "diffusers"); see the module docstring."""
    if to not in TARGETS:
        raise UserError(f"--to {to}: unknown format; choose kohya or diffusers")
    src, dst = Path(src), Path(dst)
    check_output_file(dst, [src], "OUT")
    require_safetensors(dst, "OUT", "the converted LoRA")  # as resize, merge and extract: WebUIs list only these
    lora = read_any_lora(src, architecture=architecture)
    require_exact(lora, "convert")
    components = {c: w for c, w in lora.components.items() if w}
    dtype = common_dtype(components)
    metadata = {k: v for k, v in lora.metadata.items() if k not in (*FILE_HASH_KEYS, ADAPTER_METADATA_KEY, RANKS_NOTE_KEY)}
    added = missing_family_metadata(metadata, lora.family)
    metadata |= added
    sgm_paths = lora.architecture.sgm_paths if lora.architecture.family == "sdxl" else None
    unified_alpha = None
    if to == "kohya":
        components, unified_alpha = unify_alphas(components)
        expected = components
    else:
        expected = {c: {p: bake_alpha(w) for p, w in ws.items()} for c, ws in components.items()}
    written = written_rank_metadata(expected, sgm_paths)
    corrected = {k: (metadata[k], v) for k, v in written.items() if k in metadata and not _same_value(metadata[k], v)}
    metadata |= written
    if to == "kohya":
        save_lora_file(dst, to_kohya_state_dict(components, dtype, sgm_paths=sgm_paths), metadata)
    else:
        save_diffusers_lora_file(dst, to_diffusers_state_dict(components, dtype), metadata)
    _check_round_trip(dst, expected, dtype, lora.architecture)
    return Conversion(source=lora, output=dst, to=to, added_metadata=added, unified_alpha=unified_alpha,
                      corrected_metadata=corrected)


def written_rank_metadata(
    components: Mapping[str, Mapping[str, LoraModuleWeights]], sgm_paths: Mapping[str, str] | None
) -> dict[str, str]:
    """ss_network_dim / ss_network_alpha (and `sd_lora_module_ranks` when ranks vary) of the modules as written
    (after alpha unification or baking), as `merge.rank_metadata` gives them; the input's ss_network_module stays."""
    modules = {
        kohya_module_name(c, p, sgm_paths=sgm_paths if c == "unet" else None): w
        for c, ws in components.items() for p, w in ws.items()
    }  # fmt: skip
    return {k: v for k, v in rank_metadata(modules).items() if k != "ss_network_module"}


def _same_value(a: str, b: str) -> bool:
    """"2.0" and "2" are the same alpha; only a real change is reported."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def unify_alphas(
    components: Mapping[str, Mapping[str, LoraModuleWeights]],
) -> tuple[dict[str, dict[str, LoraModuleWeights]], float | None]:
    """(components with one alpha, that alpha) when the modules' alphas differ, else (components, None).

    diffusers loads a kohya file with the most common alpha for every module (contract section 1), so each
    other module keeps its weight change by folding alpha_i / alpha into `up` (`maths.with_alpha`, as `merge`
    and `resize` store their results). The most common alpha (ties: the larger) leaves most factors untouched.
    """
    counts = Counter(float(w.alpha) for ws in components.values() for w in ws.values())
    if len(counts) <= 1:
        return {c: dict(ws) for c, ws in components.items()}, None
    # The one alpha must be positive (`with_alpha`): a module's alpha of 0 (no change) or below (a flipped change)
    # is folded into its `up` like any other, so its weight change stays what it was.
    usable = {a: n for a, n in counts.items() if math.isfinite(a) and a > 0} or {1.0: 0}
    alpha = max(usable, key=lambda a: (usable[a], a))
    return {c: {p: maths.with_alpha(w, alpha) for p, w in ws.items()} for c, ws in components.items()}, alpha


def _check_round_trip(path: Path, expected, dtype: torch.dtype, architecture: Architecture) -> None:
    """Our invariant: the written file reads back to exactly the factors we meant to write (`expected`, after
    alpha unification or baking: both change how the scale is stored, not the weight change)."""
    written = read_any_lora(path, architecture=architecture)
    got = {c: w for c, w in written.components.items() if w}
    same = not written.unsupported and got.keys() == expected.keys()
    same = same and all(got[c].keys() == expected[c].keys() for c in expected)
    if same:
        for component, modules in expected.items():
            for module_path, w in modules.items():
                back = got[component][module_path]
                same = same and torch.equal(back.down, w.down.to(dtype)) and torch.equal(back.up, w.up.to(dtype))
                same = same and back.alpha == torch.tensor(float(w.alpha), dtype=torch.float32).item()
    if not same:
        raise RuntimeError(f"{path}: the converted file does not read back to the same LoRA; please report this bug")


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(prog="python -m sd_lora.convert", description=__doc__.split("\n")[0])
    parser.add_argument("input", help="the LoRA file to convert (kohya, diffusers or old diffusers keys)")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the output format")
    parser.add_argument("--model", help="a local diffusers model folder to resolve module names against")

    def body() -> None:
        args = parser.parse_args(argv)
        architecture = architecture_from_model_dir(args.model) if args.model else None
        result = convert_lora(args.input, args.output, args.to, architecture=architecture)
        source = result.source
        modules = sum(len(w) for w in source.components.values())
        family = source.family or "unknown family"
        print(f"{args.input} ({source.format}, {family}, {modules} modules) -> {result.output} ({result.to})")
        if result.to == "diffusers" and any(w.alpha != w.rank for ws in source.components.values() for w in ws.values()):
            print("  alpha baked into lora_B (the diffusers format has no alpha; read back, alpha = rank)")
        if result.unified_alpha is not None:
            print(f"  alphas unified to {result.unified_alpha:g} (diffusers applies one alpha to every module); the other "
                  "modules' scale is folded into lora_up, so every weight change is the same")
        if result.corrected_metadata:
            changes = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in result.corrected_metadata.items())
            print(f"  metadata set to what the file holds: {changes}")
        if result.added_metadata:
            print(f"  added metadata: {', '.join(f'{k}={v}' for k, v in result.added_metadata.items())}")

    return run_cli(body)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see python -m sd_lora.convert --help)")


if __name__ == "__main__":
    sys.exit(main())
