"""LoRA injection with PEFT, and reading/writing the LoRA weights by module path.

PEFT does the injection; this module decides how it is configured and gives the rest of sd_lora a small,
framework-free view of the result: `{module path: LoraModuleWeights(down, up, alpha)}`, the same vocabulary
the kohya file format uses (`down` = PEFT's `lora_A`, `up` = PEFT's `lora_B`).

Why bare `peft.inject_adapter_in_model` and not `model.add_adapter(...)`: both run the same PEFT injection,
but transformers 5.x gates its `PeftAdapterMixin` methods (`add_adapter`, `set_adapter`, `disable_adapters`,
`active_adapters`, ...) on peft >= 0.22, while this project pins peft < 0.22, so `text_encoder.add_adapter`
raises here. One code path for U-Net and text encoder (and any `nn.Module`, meta-device models included)
is simpler, and the pipeline needs nothing more: `pipe(...)` samples with the LoRA active because the PEFT
layers sit in the forward pass, and diffusers' LoRA scale (`cross_attention_kwargs={"scale": s}`,
`lora_scale`) works on any PEFT layer. To switch the LoRA off for a base-model comparison use
`set_lora_enabled(model, False)`; the diffusers/transformers `disable_adapters()` need `add_adapter`'s
bookkeeping.

Exact targeting: PEFT matches a *list* of `target_modules` by suffix (`key.endswith("." + target)`), so we pass
a single regex of the escaped full paths instead, which PEFT matches with `re.fullmatch`; afterwards we check
that exactly the requested modules were wrapped.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from sd_lora.errors import UserError


@dataclass
class LoraModuleWeights:
    """One module's LoRA, in kohya's vocabulary: `delta_W = (alpha / r) * up @ down`."""

    down: torch.Tensor  # (r, in) for Linear, (r, in, kh, kw) for Conv2d  (PEFT's lora_A)
    up: torch.Tensor  # (out, r) for Linear, (out, r, 1, 1) for Conv2d  (PEFT's lora_B)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers by module path (the path of the wrapped layer, e.g. `...attn1.to_q`)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def inject_lora(
    model: nn.Module,
    target_modules: list[str],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> None:
    """Wrap exactly the modules at `target_modules` (full paths) with trainable LoRA, in place.

    Initialisation is PEFT's default (lora_A kaiming-uniform, lora_B zeros), so the model's output is unchanged
    until training moves lora_B. Every base parameter is frozen; the LoRA parameters are trainable and float32
    even when the base model is fp16/bf16 (PEFT's forward casts the input to the adapter dtype and the
    result back).

    Sharp edge: a model can hold only one sd_lora adapter. A second call raises instead of stacking a second
    adapter on top of the first. Note that a later `model.to(dtype)` also casts the LoRA parameters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not target_modules:
        raise ValueError("inject_lora: target_modules is empty")
    if rank <= 0:
        raise ValueError(f"inject_lora: rank must be a positive integer, got {rank}")
    if existing := _lora_layers(model):
        raise ValueError(
            f"inject_lora: {type(model).__name__} already has LoRA on {len(existing)} modules; calling inject_lora "
            "twice would stack a second adapter. Inject once, or start from a fresh model."
        )
    modules = dict(model.named_modules())
    unknown = [p for p in target_modules if p not in modules]
    if unknown:
        raise ValueError(f"inject_lora: {len(unknown)} target paths are not modules of the model: {unknown[:5]}")

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # One regex of the escaped full paths: PEFT fullmatches a str target, so nothing else is hit.
        target_modules="|".join(re.escape(p) for p in sorted(set(target_modules))),
        init_lora_weights=True,  # kaiming-uniform A, zero B: output unchanged at init
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=adapter_name)

    wrapped = _lora_layers(model)
    if set(wrapped) != set(target_modules):  # our invariant; guards against a PEFT matching change
        extra, absent = sorted(set(wrapped) - set(target_modules)), sorted(set(target_modules) - set(wrapped))
        raise RuntimeError(f"PEFT wrapped unexpected modules {extra[:5]} and missed {absent[:5]}")
    for layer in wrapped.values():
        layer.set_adapter(adapter_name)  # PEFT activates only an adapter named "default" on its own
        # PEFT moves new adapters to the base layer's dtype; training wants fp32 LoRA weights.
        layer.lora_A[adapter_name].to(torch.float32)
        layer.lora_B[adapter_name].to(torch.float32)
        for p in (*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()):
            p.requires_grad_(True)


def lora_paths(model: nn.Module, adapter_name: str = "default") -> list[str]:
    """The paths of the modules that carry adapter `adapter_name`, sorted (no tensor is read)."""
    return sorted(name for name, layer in _lora_layers(model).items() if adapter_name in layer.lora_A)


def lora_weights(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraModuleWeights]:
    """Detached CPU copies of the LoRA weights, keyed by the wrapped module's path (the target path).

    On a model built under `torch.device("meta")` the tensors stay meta (shapes only, for key checks).
    """
    layers = _lora_layers(model)
    weights = {}
    for name in lora_paths(model, adapter_name):
        layer = layers[name]
        weights[name] = LoraModuleWeights(
            down=_cpu_copy(layer.lora_A[adapter_name].weight),
            up=_cpu_copy(layer.lora_B[adapter_name].weight),
            alpha=float(layer.lora_alpha[adapter_name]),
        )
    return weights


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone() if t.is_meta else t.detach().to("cpu", copy=True)


def load_lora_weights_into(
    model: nn.Module,
    weights: dict[str, LoraModuleWeights],
    adapter_name: str = "default",
    *,
    source: str | None = None,
) -> None:
    """Copy `weights` into an injected model by module path; refuse any name, shape, rank or alpha mismatch.

    All problems are reported in one `UserError`; `source` (e.g. the file path) starts its message.
    """
    current = lora_weights(model, adapter_name)
    if not current:
        raise ValueError(f"load_lora_weights_into: {type(model).__name__} has no LoRA adapter {adapter_name!r}")
    problems = []
    missing = sorted(set(current) - set(weights))
    unexpected = sorted(set(weights) - set(current))
    if missing:
        problems.append(f"{len(missing)} modules missing: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected modules: {_preview(unexpected)}")
    mismatched = []
    for name in sorted(set(current) & set(weights)):
        have, new = current[name], weights[name]
        if have.down.shape != new.down.shape or have.up.shape != new.up.shape:
            mismatched.append(
                f"{name} (model down {list(have.down.shape)} up {list(have.up.shape)}, "
                f"got down {list(new.down.shape)} up {list(new.up.shape)})"
            )
        elif not math.isclose(float(new.alpha), have.alpha, rel_tol=1e-6):  # files store alpha as float32
            mismatched.append(f"{name} (model alpha {have.alpha:g}, got {float(new.alpha):g})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape/rank/alpha mismatches: {_preview(mismatched)}")
    if problems:
        where = f"{source}: " if source else ""
        raise UserError(
            f"{where}LoRA weights do not match the model's LoRA layout:\n  - " + "\n  - ".join(problems) + "\n"
            "Use the same target preset, rank and alpha (and the same base model family) as the run that wrote them."
        )
    layers = _lora_layers(model)
    with torch.no_grad():
        for name, w in weights.items():
            layers[name].lora_A[adapter_name].weight.copy_(w.down)
            layers[name].lora_B[adapter_name].weight.copy_(w.up)


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of `model` on or off (off = the base model's exact output)."""
    for layer in _lora_layers(model).values():
        layer.enable_adapters(enabled)


@contextlib.contextmanager
def autocast_casts_lora_inputs(modules: Iterable[nn.Module], device_type: str):
    """While autocast is on for `device_type`, leave the casting of LoRA layers' inputs to autocast.

    PEFT casts each LoRA layer's input to the LoRA weights' dtype (fp32 when a 16-bit base trains fp32 LoRA
    weights), and autocast casts it straight back to 16 bits for the LoRA matmuls: two copies of every adapted
    activation forward and two more backward, for the same numbers (16 -> 32 -> 16 bits is exact). Outside
    autocast (e.g. sampling a model whose modules share one dtype) PEFT's cast is what makes the dtypes meet,
    so it is switched off only while autocast is on here, and restored on exit.
    """
    from peft.helpers import disable_input_dtype_casting

    active = torch.is_autocast_enabled(device_type)
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(disable_input_dtype_casting(module, active=active))
        yield


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with `requires_grad` (after `inject_lora`: exactly the LoRA weights)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(params: nn.Module | Iterable[nn.Parameter]) -> int:
    """Number of scalar values in a module's parameters or in a list of parameters."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    return sum(p.numel() for p in params)


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
