"""Apply LoRA files of any format to a diffusers pipeline, several at once, with weights.

    from sd_lora.api import load_lora, set_lora_scales, unload_lora
    load_lora(pipe, "zkchar.safetensors", scale=0.8)             # -> "zkchar" (the adapter name)
    load_lora(pipe, "style_diffusers.safetensors", scale=0.3, name="style")
    set_lora_scales(pipe, {"zkchar": 0.6})                       # the others keep their weights
    unload_lora(pipe, "style")                                   # one adapter ...
    unload_lora(pipe)                                            # ... or all: the base model's exact output again

Any file `formats.readers` reads (kohya with SD1/SD2 or SDXL SGM names, diffusers/PEFT, old diffusers keys) is
resolved against the pipeline's own modules and handed to `pipe.load_lora_weights` as an in-memory diffusers
state dict (alpha baked into lora_B), so diffusers' heuristic kohya conversion is never involved. Files with
parts a plain LoRA cannot represent (LoHa, DoRA, unknown modules, ...) or factors that do not fit the
pipeline's layers are refused with a `UserError` naming the file.

Weights are diffusers' `set_adapters` weights: every loaded adapter stays active with its weight, on the U-Net
and the text encoders alike. sd_lora remembers each pipeline's weights (weakly: nothing is added to the
pipeline object); adapters loaded with `pipe.load_lora_weights` directly count with weight 1.0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import weakref
from collections.abc import Mapping
from pathlib import Path

from sd_lora.errors import UserError
from sd_lora.formats.diffusers_format import to_diffusers_state_dict
from sd_lora.formats.architecture import architecture_of_pipeline
from sd_lora.formats.readers import read_any_lora, require_exact, shape_mismatches

_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> {adapter name: weight}


def load_lora(pipe, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
    """Load the LoRA file at `path` into `pipe` as adapter `name` (default: the file's stem) with weight `scale`.

    Returns the adapter name. Sharp edge: loading under a name already in use is refused, not replaced.
    """
    weight = _weight(scale, f"{path}: scale")  # before loading: a bad scale must not leave the adapter loaded
    name = name if name is not None else re.sub(r"[^\w-]", "_", Path(path).stem)
    if not re.fullmatch(r"[\w-]+", name):
        raise UserError(f"adapter name {name!r}: use letters, digits, '_' and '-' only (PEFT names cannot contain '.')")
    loaded = _adapters(pipe)
    if name in loaded:
        raise UserError(f"{path}: an adapter named {name!r} is already loaded; pass another name= or unload it first")
    compiled = [c for c in ("unet", "text_encoder", "text_encoder_2") if hasattr(getattr(pipe, c, None), "_orig_mod")]
    if compiled:  # torch.compile's wrapper renames every layer (`_orig_mod.`): no module of the file would resolve
        raise UserError(f"{path}: pipe.{compiled[0]} is compiled (torch.compile); load LoRA files before compiling it, "
                        "as diffusers does (it does not list the adapters of a compiled model either)")
    architecture = architecture_of_pipeline(pipe)
    lora = read_any_lora(path, architecture=architecture)
    try:
        require_exact(lora, "load")
    except UserError as e:
        absent = [te for te in ("text_encoder", "text_encoder_2") if hasattr(pipe, te) and getattr(pipe, te) is None]
        if absent and lora.unsupported:
            e.args = (f"{e}\nThis pipeline has no {' / '.join(absent)} (it is None): text-encoder modules cannot load.",)
        raise
    mismatches = shape_mismatches(lora, architecture)
    if mismatches:
        shown = "\n  - ".join(mismatches[:10])
        shown += f"\n  ... ({len(mismatches) - 10} more)" if len(mismatches) > 10 else ""
        raise UserError(
            f"{path}: {len(mismatches)} modules do not fit this pipeline's model:\n  - {shown}\n"
            "Was the LoRA trained for another model family?"
        )
    with _without_transformers_load_report():
        pipe.load_lora_weights(to_diffusers_state_dict({c: w for c, w in lora.components.items() if w}), adapter_name=name)
    _require_loaded(pipe, lora, name)
    _weights(pipe)[name] = weight
    _activate(pipe)
    return name


def set_lora_scales(pipe, scales: Mapping[str, float]) -> None:
    """Set the weights of loaded adapters by name; adapters not named keep theirs (0 switches one off)."""
    if not isinstance(scales, Mapping):
        raise UserError(f"set_lora_scales takes {{adapter name: weight}}, such as {{'zkchar': 0.6}}; got {scales!r}")
    unknown = sorted(set(scales) - set(_adapters(pipe)))
    if unknown:
        loaded = ", ".join(_adapters(pipe)) or "none"
        raise UserError(f"no adapters named {', '.join(map(repr, unknown))}; loaded: {loaded}")
    _weights(pipe).update({name: _weight(weight, f"adapter {name!r}: scale") for name, weight in scales.items()})
    _activate(pipe)


def unload_lora(pipe, name: str | None = None) -> None:
    """Remove adapter `name`, or every adapter when `name` is None (the pipeline is then the base model exactly)."""
    if name is None:
        pipe.unload_lora_weights()
        _weights(pipe).clear()
        return
    if name not in _adapters(pipe):
        raise UserError(f"no adapter named {name!r}; loaded: {', '.join(_adapters(pipe)) or 'none'}")
    pipe.delete_adapters(name)
    _weights(pipe).pop(name, None)
    if _adapters(pipe):
        _activate(pipe)
    else:
        pipe.unload_lora_weights()  # drop the now empty PEFT wrappers too


def lora_scales(pipe) -> dict[str, float]:
    """{adapter name: weight} of every adapter loaded in `pipe`."""
    weights = _weights(pipe)
    return {name: weights.get(name, 1.0) for name in _adapters(pipe)}


def _weight(value, what: str) -> float:
    """`value` as an adapter weight; a `UserError` for what is no finite number (NaN would blacken every image)."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight):
        raise UserError(f"{what} {value!r} is not a finite number; pass one such as 0.8 (0 switches the adapter off)")
    return weight


# transformers 5 logs a "LOAD REPORT" when diffusers loads an adapter into a text encoder whose name is part of the
# base weights' names (it takes keys holding the adapter name for adapter keys: "w" is in every "weight"), listing
# them as MISSING and "newly initialized". Nothing is re-initialized; `_require_loaded` checks instead that every
# module of the file got the adapter.
_LOAD_REPORT_LOGGER = "transformers.integrations.peft"


@contextlib.contextmanager
def _without_transformers_load_report():
    logger = logging.getLogger(_LOAD_REPORT_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _require_loaded(pipe, lora, name: str) -> None:
    """Every module of `lora` now carries adapter `name` in `pipe`, or the adapter is removed and this is a bug."""
    from sd_lora.lora.inject import lora_paths

    attributes = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}
    absent = []
    for component, modules in lora.components.items():
        if modules:
            loaded = set(lora_paths(getattr(pipe, attributes[component]), adapter_name=name))
            absent += [f"{component}.{path}" for path in modules if path not in loaded]
    if absent:
        pipe.delete_adapters(name)
        raise RuntimeError(f"{lora.source}: diffusers did not load {len(absent)} of its modules ({', '.join(absent[:3])}, ...); "
                           "please report this bug with the file")


def _adapters(pipe) -> list[str]:
    names = {n for names in pipe.get_list_adapters().values() for n in names}
    return sorted(names)


def _weights(pipe) -> dict[str, float]:
    return _WEIGHTS.setdefault(pipe, {})


def _activate(pipe) -> None:
    scales = lora_scales(pipe)
    if scales:  # diffusers' set_adapters([]) fails with a KeyError on a pipeline without adapters
        pipe.set_adapters(list(scales), list(scales.values()))
