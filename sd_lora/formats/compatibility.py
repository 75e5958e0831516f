"""What AUTOMATIC1111, ComfyUI and diffusers do with a LoRA file: which modules each applies, which it drops
and why, or whether it refuses the file.

The rules come from /work/shared/reference/lora-format.md §4 and the loaders' source (A1111 v1.10.1
`extensions-builtin/Lora`, ComfyUI `comfy/lora.py`, diffusers 0.42 `lora_pipeline.py`); `compatibility()` is a
pure function of the parsed file. tests/formats/test_compatibility.py checks the diffusers verdicts against
diffusers itself. `python -m sd_lora.inspect` prints them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from .diffusers_format import strip_peft_prefix
from .readers import LoraFile, ModuleEntry, alpha_value

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


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
            self.reasons.append(f"drops {len(names)}: {why} ({preview(sorted(names), 3)})")

    def reject(self, why: str) -> None:
        self.rejects = True
        self.applies = []  # nothing of a refused file is applied
        self.reasons.append(f"REJECTS the file: {why}")


def compatibility(lora: LoraFile) -> dict[str, Verdict]:
    """{loader: Verdict} for AUTOMATIC1111, ComfyUI and diffusers (the SD / SDXL pipeline of the file's family).

    Pure: uses only the file's keys, the names' resolution against the architecture, and the metadata.
    """
    verdicts = {"AUTOMATIC1111": _a1111(lora), "ComfyUI": _comfyui(lora), "diffusers": _diffusers(lora)}
    damaged = [f"{m.name} (alpha shape {list(m.tensors['alpha'].shape)})" for m in lora.modules
               if "alpha" in m.tensors and alpha_value(m.tensors["alpha"]) is None]
    for verdict in verdicts.values() if damaged else ():  # each reads alpha with .item(), which raises
        verdict.reject(f"reading an alpha that is not one number fails: {preview(damaged, 3)}")
    return verdicts


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
            v.reject(f"its kohya conversion cannot rename {len(left)} keys and raises: {preview(left, 3)}")
            return v
        unconverted = _text_encoder_keys_left_unconverted(v, lora.modules)
        if v.rejects:
            return v
        kept = [m for m in lora.modules if m.name not in unconverted]
        _peft_injection(v, kept, sgm_names_mapped=lora.family == "sdxl")
        if any(m.sgm_name for m in lora.modules):
            v.reasons.append("SGM U-Net names are mapped only by StableDiffusionXLPipeline (it passes the U-Net "
                             "config)")
        v.reasons += _alpha_notes(lora)
        return v
    no_lora = [k for k in rest if "lora" not in k]
    if no_lora:
        v.reject(f"{len(no_lora)} keys have no 'lora' in their name ({preview(no_lora, 3)})")
        return v
    kohya = [m.name for m in lora.modules if m.style == "kohya"]
    v.drop(kohya, "kohya keys in a file that is not all kohya: the kohya conversion is skipped and they are ignored")
    unprefixed = [m.name for m in lora.modules if m.style != "kohya" and not m.prefixed]
    v.drop(unprefixed, "no unet. / text_encoder. prefix: the pipeline loader ignores them")
    _peft_injection(v, [m for m in lora.modules if m.style != "kohya" and m.prefixed])
    v.drop(lora.stray_keys, "not LoRA factors")
    return v


def _text_encoder_keys_left_unconverted(v: Verdict, modules: list[ModuleEntry]) -> set[str]:
    """diffusers' kohya conversion names text-encoder attention keys the old way (`self_attn.to_q_lora`) and mlp keys
    the new way (`mlp.fc1.lora_linear_layer`), then tells each encoder's format by `to_out_lora` (out_proj) first,
    `lora_linear_layer` second (`convert_state_dict_to_diffusers` / `_to_peft`). Without an out_proj module the q, k,
    v keys keep their old names and PEFT drops them; without mlp modules as well, the conversion raises.
    Returns the names dropped (a rejection is recorded in `v`)."""
    dropped: set[str] = set()
    for component in ("text_encoder", "text_encoder_2"):
        names = [m.name for m in modules if m.style == "kohya" and _diffusers_component(m) == component]
        if not names or any(n.endswith("_self_attn_out_proj") for n in names):
            continue
        if not any("_mlp_" in n for n in names):
            v.reject(f"its {component} conversion finds neither out_proj nor mlp modules and cannot tell their key "
                     f"format ({preview(sorted(names), 3)})")
            return dropped
        attention = sorted(n for n in names if "_self_attn_" in n)
        v.drop(attention, f"{component} attention keys stay unconverted without an out_proj module (PEFT warns)")
        dropped.update(attention)
    return dropped


def _peft_injection(v: Verdict, modules: list[ModuleEntry], sgm_names_mapped: bool = True) -> None:
    """PEFT per component: unknown names are dropped with a warning, but none known raises; norms raise.
    `sgm_names_mapped=False`: the SD pipeline, which does not map SGM U-Net names, so they are unknown names."""
    groups: dict[str, list[ModuleEntry]] = {}
    for m in modules:
        groups.setdefault(_diffusers_component(m), []).append(m)
    def matches(m: ModuleEntry) -> bool:
        return m.component is not None and (sgm_names_mapped or not m.sgm_name)

    for component, members in sorted(groups.items()):
        known = [m for m in members if matches(m)]
        unknown = [m.name for m in members if not matches(m)]
        if not known:
            v.reject(f"no {component} module name matches the model (PEFT: target modules not found)")
            return
        bad_layers = [f"{m.name} ({m.layer.kind})" for m in known if m.layer.kind not in ("linear", "conv")]
        if bad_layers:
            v.reject(f"PEFT cannot put LoRA on {preview(bad_layers, 3)}")
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
        m.name: alpha_value(m.tensors["alpha"])
        for m in lora.modules
        if m.component == "unet" and "alpha" in m.tensors and m.path and _ATTENTION.fullmatch(m.path)
    }
    alphas = {name: alpha for name, alpha in alphas.items() if alpha is not None}
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
        elif m.sd1_te_prefix:
            why = "SDXL text encoder 1 named lora_te_ (SD1's prefix): A1111 maps only lora_te1_ for SDXL"
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
    listed_as, why = _a1111_version(lora.metadata)
    if lora.family and listed_as is None:
        v.reasons.append(f"{why}: A1111 cannot tell the family and lists it for every checkpoint")
    elif lora.family and listed_as != lora.family:
        v.reasons.append(f"hidden for {FAMILY_NAMES[lora.family]} checkpoints: {why}, so A1111 lists it as "
                         f"{FAMILY_NAMES[listed_as]}")
    return v


def _a1111_version(metadata: dict[str, str]) -> tuple[str | None, str]:
    """(family A1111 lists the file under, why), as its `NetworkOnDisk.detect_version`: SDXL by the `sdxl_` prefix
    of ss_base_model_version, SD2 only by ss_v2 == "True", SD1 for any other metadata, unknown (None) for none."""
    version, v2 = metadata.get("ss_base_model_version"), metadata.get("ss_v2")
    if str(version or "").startswith("sdxl_"):
        return "sdxl", f"ss_base_model_version is {version}"
    if v2 == "True":
        return "sd2", "ss_v2 is True"
    if metadata:
        return "sd1", f"ss_base_model_version is {version or 'missing'} and ss_v2 is {v2 or 'missing'}"
    return None, "no metadata"


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


def preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
