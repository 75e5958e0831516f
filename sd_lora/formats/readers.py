"""Read any Stable Diffusion LoRA file into module paths: kohya, diffusers/PEFT and old diffusers key styles.

    lora = read_any_lora("some.safetensors")           # names resolved against full-size SD1/SD2/SDXL
    lora = read_any_lora(path, architecture=architecture_of_pipeline(pipe))   # ... or against a given model
    lora.components   # {"unet": {diffusers module path: LoraModuleWeights}, "text_encoder": {...}}

Key styles read (`LoraFile.format`):
- `kohya`: `lora_unet_<name>` / `lora_te_` / `lora_te1_` / `lora_te2_` with `.lora_down.weight`, `.lora_up.weight`,
  `.alpha` (U-Net names as diffusers paths or in the SGM spelling kohya writes for SDXL, for any family; SDXL
  text encoder 1 also as `lora_te_` when the file has no `lora_te1_` names, as diffusers and ComfyUI read it),
  plus what other trainers add
  (`lora_mid`, `dora_scale`, LoHa `hada_*`, LoKr `lokr_*`), which is reported, not converted;
- `diffusers`: `lora_A.weight` / `lora_B.weight` after a module name, with or without the `unet.` /
  `text_encoder.` / `text_encoder_2.` prefix and PEFT's `base_model.model.`; alphas from diffusers'
  `lora_adapter_metadata` when present, else alpha = r;
- `diffusers-old`: attention-processor keys (`...attn1.processor.to_q_lora.down.weight`), the text encoder's
  `...self_attn.to_q_lora.down.weight` / `...mlp.fc1.lora_linear_layer.down.weight` and `...to_q.lora.down.weight`.

Names are resolved BY LOOKUP against every layer of an architecture (`formats.architecture`): a model you pass, or the
full-size SD1.5 / SD2.1 / SDXL base built on the meta device (cached), chosen from the file's family evidence.
kohya names are never split back into paths by guessing which `_` was a `.`. Nothing is refused for being
unusual: unknown names, norm-layer LoRA, LoHa, rank-0 or non-finite (NaN/inf) modules, orphan alphas and stray keys
are listed in `LoraFile.unsupported` (what `components` cannot represent) for `inspect` to report and `convert` /
`api` to refuse. Only an unreadable file, or one with no LoRA keys at all, raises a `UserError` naming the file.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sd_lora.errors import UserError
from sd_lora.formats.architecture import Architecture, Layer, full_size_architecture
from sd_lora.formats.diffusers_format import (
    COMPONENT_PREFIXES as DIFFUSERS_PREFIXES,
)
from sd_lora.formats.diffusers_format import (
    adapter_alpha,
    parse_adapter_metadata,
    strip_peft_prefix,
)
from sd_lora.formats.kohya import read_lora_file
from sd_lora.lora.inject import LoraModuleWeights

FORMATS = ("kohya", "diffusers", "diffusers-old")

# --- what a file holds ---------------------------------------------------------------------------------------


@dataclass
class ModuleEntry:
    """One module as written in the file, and what it resolved to."""

    name: str  # as in the file: the kohya name, or the diffusers key without its factor suffix
    style: str  # "kohya" | "diffusers" | "diffusers-old"
    spelled: str  # the module the keys spell out: the kohya name, or `[prefix.]<path>` for diffusers styles
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> tensor (_KOHYA_ROLES, ...) or suffix
    keys: list[str] = field(default_factory=list)
    component: str | None = None  # None: matches no layer of the architecture
    path: str | None = None  # the diffusers module path it resolved to
    layer: Layer | None = None
    sgm_name: bool = False  # a kohya U-Net name in the SGM spelling
    sd1_te_prefix: bool = False  # an SDXL text-encoder-1 module named `lora_te_` (SD1's prefix), not `lora_te1_`
    prefixed: bool = True  # diffusers styles: starts with unet. / text_encoder. / text_encoder_2.

    @property
    def kind(self) -> str:
        """"lora", "loha", "lokr", "alpha-only", "incomplete" (one factor) or "other"."""
        roles = set(self.tensors)
        if {"down", "up"} <= roles:
            return "lora"
        if any(r.startswith("hada_") for r in roles):
            return "loha"
        if any(r.startswith("lokr_") for r in roles):
            return "lokr"
        if roles == {"alpha"}:
            return "alpha-only"
        return "incomplete" if roles & {"down", "up"} else "other"

    @property
    def extras(self) -> list[str]:
        """Roles beyond a plain LoRA's down, up and alpha (`mid`, `dora_scale`, `lora_up.bias`, ...)."""
        return sorted(set(self.tensors) - {"down", "up", "alpha"}) if self.kind == "lora" else []


@dataclass
class LoraFile:
    source: str
    format: str  # "kohya" | "diffusers" | "diffusers-old"
    family: str | None  # best guess: "sd1" | "sd2" | "sdxl" | None
    family_evidence: dict[str, str]  # {"metadata": "...", "keys": "..."}: what each source says, and why
    metadata: dict[str, str]
    modules: list[ModuleEntry]
    stray_keys: list[str]  # keys that belong to no module
    components: dict[str, dict[str, LoraModuleWeights]]  # the plain LoRA modules, by component and path
    unsupported: list[str]  # what `components` leaves out; empty when it is the whole file
    warnings: list[str]
    architecture: Architecture  # what the names were resolved against

    @property
    def keys(self) -> list[str]:
        return [k for m in self.modules for k in m.keys] + self.stray_keys


def read_any_lora(path: str | os.PathLike, *, architecture: Architecture | None = None) -> LoraFile:
    """Read a LoRA `.safetensors` of any supported style; see the module docstring."""
    state, metadata = read_lora_file(path)
    return parse_lora_state_dict(state, metadata, source=str(path), architecture=architecture)


def read_as_kohya(path: str | os.PathLike, *, architecture: Architecture | None = None):
    """(kohya state dict, metadata) of any readable LoRA file, for tools that work on kohya names.

    Refuses (`UserError`) a file with anything `components` cannot represent. SDXL U-Net names are SGM names.
    """
    lora = read_any_lora(path, architecture=architecture)
    return kohya_state_dict_of(lora), dict(lora.metadata)


def kohya_state_dict_of(lora: LoraFile) -> dict[str, torch.Tensor]:
    """`read_as_kohya` of a file already read: its kohya state dict, or a `UserError` (see there)."""
    from sd_lora.formats.kohya import to_kohya_state_dict

    require_exact(lora, "read")
    dtype = common_dtype(lora.components)
    sgm = lora.architecture.sgm_paths if lora.architecture.family == "sdxl" else None
    return to_kohya_state_dict(lora.components, dtype, sgm_paths=sgm)


def require_exact(lora: LoraFile, action: str) -> None:
    """`UserError` when the file holds anything beyond plain LoRA modules sd_lora can represent exactly."""
    if lora.unsupported:
        lines = "\n  - ".join(lora.unsupported)
        raise UserError(
            f"{lora.source}: cannot {action} this file exactly:\n  - {lines}\n"
            f"Run python -m sd_lora.inspect {lora.source} for details."
        )
    if not any(lora.components.values()):
        raise UserError(f"{lora.source}: has no LoRA modules to {action}")


def common_dtype(components: Mapping[str, Mapping[str, LoraModuleWeights]]) -> torch.dtype:
    """The factors' storage dtype when they all share one, else float32 (lossless for fp16/bf16)."""
    dtypes = {t.dtype for ws in components.values() for w in ws.values() for t in (w.down, w.up)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


# --- parsing -----------------------------------------------------------------------------------------------

_KOHYA_KEY = re.compile(r"(lora_(?:unet|te|te1|te2)_[^.]+)\.(.+)")
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid",
                "dora_scale": "dora_scale"}  # fmt: skip
_PEFT_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?)")
_PEFT_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_magnitude_vector": "dora_scale",
               "lora_magnitude_vector.weight": "dora_scale"}  # fmt: skip
# Old diffusers: (module prefix, attention projection, factor); the text encoder's `self_attn.to_q_lora` means q_proj.
_OLD_PROCESSOR_KEY = re.compile(r"(.+?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_OLD_LINEAR_KEY = re.compile(r"(.+)\.(?:lora_linear_layer|lora)\.(down|up)\.weight")
_OLD_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _classify(key: str) -> tuple[str, str, str, str] | None:
    """(style, module name in the file, module it spells out, role) of one key, or None."""
    if match := _KOHYA_KEY.fullmatch(key):
        return "kohya", match.group(1), match.group(1), _KOHYA_ROLES.get(match.group(2), match.group(2))
    if match := _PEFT_KEY.fullmatch(key):
        return "diffusers", match.group(1), match.group(1), _PEFT_ROLES.get(match.group(2), match.group(2))
    if match := _OLD_PROCESSOR_KEY.fullmatch(key):
        head, processor, projection, factor = match.groups()
        if head.endswith("self_attn"):
            path = f"{head}.{_OLD_TEXT_PROJ[projection]}"
        else:
            path = f"{head}.{'to_out.0' if projection == 'to_out' else projection}"
        return "diffusers-old", f"{head}{processor or ''}.{projection}_lora", path, factor
    if match := _OLD_LINEAR_KEY.fullmatch(key):
        return "diffusers-old", key.rsplit(".", 2)[0], match.group(1), match.group(2)
    return None


def parse_lora_state_dict(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    source: str = "LoRA state dict",
    architecture: Architecture | None = None,
) -> LoraFile:
    """`read_any_lora` on tensors already in memory; `source` names them in messages."""
    metadata = dict(metadata or {})
    if not state:
        raise UserError(f"{source}: holds no tensors; it is not a LoRA file")
    entries: dict[tuple[str, str], ModuleEntry] = {}
    stray = []
    for key, tensor in state.items():
        found = _classify(key)
        if found is None:
            stray.append(key)
            continue
        style, name, spelled, role = found
        entry = entries.setdefault((style, name), ModuleEntry(name=name, style=style, spelled=spelled))
        entry.tensors[role] = tensor
        entry.keys.append(key)
    modules = list(entries.values())
    if not modules:
        raise UserError(
            f"{source}: no LoRA keys among its {len(state)} tensors (e.g. {_preview(sorted(state), 3)}); expected "
            "kohya (lora_unet_*.lora_down.weight), diffusers (*.lora_A.weight) or old diffusers "
            "(*.to_q_lora.down.weight) keys. Is it a checkpoint, an embedding or another kind of network?"
        )
    styles = Counter(m.style for m in modules)
    file_format = "kohya" if styles["kohya"] else "diffusers-old" if styles["diffusers-old"] else "diffusers"

    family_by_metadata, metadata_why = family_from_metadata(metadata)
    family_by_keys, keys_why, decisive = family_from_modules(modules)
    evidence = {"metadata": metadata_why, "keys": keys_why}
    warnings = []
    if len(styles) > 1:
        warnings.append(f"mixed key styles: {', '.join(f'{n} {s} modules' for s, n in sorted(styles.items()))}")
    if decisive and family_by_metadata and family_by_metadata != family_by_keys:
        warnings.append(f"the metadata says {family_by_metadata} but the keys and shapes say {family_by_keys}")
    # Decisive shapes outrank the metadata (it can be wrong), the metadata outranks mere hints such as SGM names.
    looks_like = family_by_keys if decisive else family_by_metadata or family_by_keys
    if architecture is None:
        family = looks_like
        # Unknown SD1 vs SD2: their U-Net paths are the same and SD2's text encoder has the deeper layer list.
        architecture = full_size_architecture(family or "sd2")
    else:
        family = architecture.family
        if looks_like and looks_like != family:
            warnings.append(f"the file looks like a {looks_like} LoRA but the model is {family}")
    adapter_metadata = parse_adapter_metadata(metadata, source)
    # Some tools name SDXL's first text encoder `lora_te_`; diffusers and ComfyUI apply those names to it (A1111
    # drops them), so they are read as `lora_te1_` when the file has no `lora_te1_` names of its own.
    te_as_te1 = architecture.family == "sdxl" and not any(m.spelled.startswith("lora_te1_") for m in modules)
    for entry in modules:
        _resolve(entry, architecture, te_as_te1)
    components, unsupported = _components(modules, stray, architecture, adapter_metadata, family)
    return LoraFile(
        source=source, format=file_format, family=family, family_evidence=evidence, metadata=metadata,
        modules=modules, stray_keys=stray, components=components, unsupported=unsupported, warnings=warnings,
        architecture=architecture,
    )  # fmt: skip


def _resolve(entry: ModuleEntry, architecture: Architecture, te_as_te1: bool = False) -> None:
    """Fill in component / path / layer by lookup; unresolved entries keep component None.

    `te_as_te1`: an SDXL architecture and a file without `lora_te1_` names, whose `lora_te_` names mean text
    encoder 1 (see `parse_lora_state_dict`)."""
    if entry.style == "kohya":
        spelled = entry.spelled
        if te_as_te1 and spelled.startswith("lora_te_"):
            spelled = "lora_te1_" + spelled.removeprefix("lora_te_")
        found = architecture.kohya_names.get(spelled)
        entry.sd1_te_prefix = bool(found) and spelled != entry.spelled
        if found:
            entry.component, entry.path, entry.sgm_name = found
    else:
        name = strip_peft_prefix(entry.spelled)
        entry.prefixed = name.split(".", 1)[0] in DIFFUSERS_PREFIXES.values()
        candidates = [name] if entry.prefixed else [f"unet.{name}", f"text_encoder.{name}"]
        found = next((architecture.diffusers_names[c] for c in candidates if c in architecture.diffusers_names), None)
        if found:
            entry.component, entry.path = found
    if entry.component is not None:
        entry.layer = architecture.layers[entry.component][entry.path]


def _components(modules, stray, architecture, adapter_metadata, family):
    """The plain LoRA modules as `{component: {path: LoraModuleWeights}}`, and what could not go there."""
    model = f"{family} model" if family else "SD1/SD2 model (family unknown)"
    components: dict[str, dict[str, LoraModuleWeights]] = {c: {} for c in architecture.layers}
    groups: dict[str, list[str]] = {}

    def note(problem: str, name: str) -> None:
        groups.setdefault(problem, []).append(name)

    for entry in modules:
        if entry.component is None:
            note(f"match no layer of the {model}", entry.name)
        elif entry.kind != "lora":
            note(f"are {entry.kind} modules, not plain LoRA ({', '.join(sorted(entry.tensors))})", entry.name)
        elif entry.layer.kind not in ("linear", "conv"):
            note(f"put LoRA on {entry.layer.kind} layers", entry.name)
        elif entry.extras:
            note(f"carry {', '.join(entry.extras)} (not representable as plain LoRA)", entry.name)
        else:
            down, up = entry.tensors["down"], entry.tensors["up"]
            if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != up.shape[1]:
                note("have down/up factors of different ranks (damaged)", entry.name)
                continue
            if down.shape[0] == 0:
                note("have rank 0 (empty factors: they change nothing)", entry.name)
                continue
            if not all(t.is_floating_point() and t.dtype.itemsize > 1 for t in (down, up)):  # int8, fp8: loaders cast
                down, up = down.float(), up.float()  # them, so the tools compute in float too (int8 truncates, fp8 has no mul)
            if not all(bool(torch.isfinite(t.float()).all()) for t in entry.tensors.values() if t.is_floating_point()):
                note("hold NaN or infinite values (the training that wrote them diverged; use an earlier save)",
                     entry.name)
                continue
            if "alpha" in entry.tensors:
                alpha = alpha_value(entry.tensors["alpha"])
                if alpha is None:
                    note("have an alpha that is not one number (damaged)",
                         f"{entry.name} (alpha shape {list(entry.tensors['alpha'].shape)})")
                    continue
            elif entry.style == "kohya":
                alpha = float(down.shape[0])  # kohya: a missing alpha means alpha = r in every loader
            else:
                prefix = DIFFUSERS_PREFIXES[entry.component]
                relative = _relative_name(entry)
                alpha = adapter_alpha(adapter_metadata, prefix, relative, down.shape[0])
            if entry.path in components[entry.component]:
                note("name a module another key style already set (duplicate)", entry.name)
                continue
            components[entry.component][entry.path] = LoraModuleWeights(down=down, up=up, alpha=alpha)
    unsupported = [f"{len(names)} modules {problem}: {_preview(names)}" for problem, names in groups.items()]
    if stray:
        unsupported.append(f"{len(stray)} keys belong to no LoRA module: {_preview(sorted(stray))}")
    return components, unsupported


def alpha_value(alpha: torch.Tensor) -> float | None:
    """An `alpha` tensor's number (0-d or 1-element, any dtype), or None when it holds more or fewer numbers: every
    loader reads alpha with `.item()`, which fails on those."""
    return float(alpha.item()) if alpha.numel() == 1 else None


def _relative_name(entry: ModuleEntry) -> str:
    """A diffusers entry's module name without its component prefix (what PEFT patterns are matched against)."""
    name = strip_peft_prefix(entry.spelled)
    return name.split(".", 1)[1] if entry.prefixed else name


# --- model family evidence -----------------------------------------------------------------------------------


def family_from_metadata(metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """(family, why) from kohya's `ss_base_model_version` / `ss_v2` and `modelspec.architecture`."""
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    v2 = metadata.get("ss_v2")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        family = "sdxl"
    elif version.startswith("sd_v2") or v2 == "True" or architecture.startswith("stable-diffusion-v2"):
        family = "sd2"
    elif version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1") or v2 == "False":
        family = "sd1"
    else:
        return None, "no family metadata (ss_base_model_version, ss_v2, modelspec.architecture)"
    shown = {k: metadata[k] for k in ("ss_base_model_version", "ss_v2", "modelspec.architecture") if k in metadata}
    return family, ", ".join(f"{k}={v}" for k, v in shown.items())


_CROSS_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_DIMS = {768: "sd1", 1024: "sd2"}  # ViT-L (SD1, or SDXL's first encoder), ViT-H


def family_from_modules(modules: list[ModuleEntry]) -> tuple[str | None, str, bool]:
    """(family, why, decisive) from key names and tensor shapes alone (no lookup: this chooses what to look up
    against).

    Decisive evidence fixes the family: two text encoders, SDXL's text-time embedding, the cross-attention input
    width, SD1's 1x1-conv proj_in, a 1024-wide or deeper-than-12-layer text encoder. Hints only point at one:
    SGM U-Net names (kohya writes them for SDXL, but they name SD1 / SD2 layers as well; A1111 and ComfyUI apply
    them there) and a 768-wide text encoder (SD1's ViT-L, or SDXL's first). With no decisive evidence the hints
    decide (SDXL over the 768-wide text encoder, which SDXL has too), and `parse_lora_state_dict` lets the file's
    family metadata outrank them.
    """
    decisive: dict[str, list[str]] = {}
    hints: dict[str, list[str]] = {}

    def vote(votes: dict[str, list[str]], family: str, why: str) -> None:
        votes.setdefault(family, [])
        if why not in votes[family]:
            votes[family].append(why)

    for m in modules:
        name = m.spelled.replace(".", "_")
        down = m.tensors.get("down")
        if name.startswith(("lora_te1_", "lora_te2_", "text_encoder_2_")):
            vote(decisive, "sdxl", "two text encoders")
        if re.search(r"(?:^|_)label_emb_", name) or "add_embedding" in name:
            vote(decisive, "sdxl", "text-time embedding")
        elif re.search(r"(?:^|_)(?:input_blocks|middle_block|output_blocks)_", name):
            vote(hints, "sdxl", "SGM U-Net names")
        if down is None:
            continue
        if re.search(r"attn2_to_[kv]$", name) and down.shape[1] in _CROSS_DIMS:
            vote(decisive, _CROSS_DIMS[down.shape[1]], f"cross-attention input {down.shape[1]}")
        if name.endswith("proj_in") and down.ndim == 4:
            vote(decisive, "sd1", "1x1-conv proj_in")
        first_text = name.startswith(("lora_te_", "lora_te1_", "text_encoder_")) or "text_model" in name
        is_text = first_text and not name.startswith(("lora_te2_", "text_encoder_2_"))
        if is_text and name.endswith("self_attn_q_proj") and down.shape[1] in _TEXT_DIMS:
            width = down.shape[1]
            vote(hints if width == 768 else decisive, _TEXT_DIMS[width], f"text encoder width {width}")
        layer = re.search(r"layers_(\d+)_", name)
        if is_text and layer and int(layer.group(1)) >= 12:
            vote(decisive, "sd2", "text encoder deeper than 12 layers")
    if len(decisive) > 1:
        return None, "conflicting: " + "; ".join(f"{f}: {', '.join(w)}" for f, w in sorted(decisive.items())), False
    if decisive:
        family, why = next(iter(decisive.items()))
        return family, "; ".join(why + hints.get(family, [])), True
    if "sdxl" in hints:  # SDXL's first text encoder is SD1's ViT-L: its hint for sd1 is no evidence against SDXL
        hints.pop("sd1", None)
    if len(hints) == 1:
        family, why = next(iter(hints.items()))
        return family, "; ".join(why) + " (a hint, not decisive)", False
    return None, "no decisive key names or shapes", False


# --- checks against a base model -----------------------------------------------------------------------------


def shape_mismatches(lora: LoraFile, architecture: Architecture) -> list[str]:
    """Every module of `lora` whose layer is missing from `architecture` or whose factors do not fit it."""
    problems = []
    for entry in lora.modules:
        if entry.component is None:
            problems.append(f"{entry.name}: no such layer in the base model")
            continue
        layer = architecture.layers.get(entry.component, {}).get(entry.path)
        if layer is None:
            problems.append(f"{entry.name}: {entry.component} has no layer {entry.path}")
        elif entry.kind == "lora":
            problem = _factor_problem(entry.tensors["down"], entry.tensors["up"], layer)
            if problem:
                problems.append(f"{entry.name}: {problem}")
    return problems


def _factor_problem(down: torch.Tensor, up: torch.Tensor, layer: Layer) -> str | None:
    if layer.kind == "linear":
        out_features, in_features = layer.shape
        if down.ndim == 2 and up.ndim == 2 and down.shape[1] == in_features and up.shape[0] == out_features:
            return None
    elif layer.kind == "conv":
        out_channels, in_channels, kh, kw = layer.shape
        if down.ndim == 4 and tuple(down.shape[1:]) == (in_channels, kh, kw) and tuple(up.shape) == (
            out_channels, down.shape[0], 1, 1,
        ):  # fmt: skip
            return None
    else:
        return f"LoRA on a {layer.kind} layer"
    return f"down {list(down.shape)} / up {list(up.shape)} do not fit the {layer.kind} weight {list(layer.shape)}"


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
