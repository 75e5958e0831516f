from __future__ import annotations

import re
import sys

import pytest
import torch

from sd_lora.errors import UserError
from sd_lora.optim import FIXED_ARGS, KOHYA_CLASSES, OPTIMIZERS, build_lr_scheduler, build_optimizer, kohya_description

CPU = torch.device("cpu")
# The learning rate each optimizer is meant to run at on this problem (Prodigy's is a multiplier).
LR = {"adamw": 1e-2, "adafactor": 1e-2, "prodigy": 1.0}


def available(name: str) -> bool:
    try:
        build_optimizer(name, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": LR.get(name, 1e-2)}],
                        weight_decay=0.0, device=CPU)
    except UserError:
        return False
    return True


class TinyLoRA(torch.nn.Module):
    """A frozen linear plus a rank-2 update up @ down, initialised like LoRA (up = 0: a no-op at first)."""

    def __init__(self, features: int = 8, rank: int = 2):
        super().__init__()
        self.base = torch.nn.Linear(features, features).requires_grad_(False)
        self.down = torch.nn.Parameter(torch.randn(rank, features) / features**0.5)
        self.up = torch.nn.Parameter(torch.zeros(features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.down.T @ self.up.T


def quadratic_loss(module: TinyLoRA, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (module(x) - target).pow(2).mean()


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if available(n)])
def test_available_optimizers_lower_a_quadratic_loss(name):
    torch.manual_seed(0)
    module = TinyLoRA()
    x = torch.randn(32, 8)
    target = module.base(x) + x @ torch.randn(8, 8) * 0.5  # reachable only through the LoRA update
    params = [module.down, module.up]
    optimizer = build_optimizer(name, [{"params": params, "lr": LR[name]}], weight_decay=0.0, device=CPU)
    scheduler = build_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=100)
    before = quadratic_loss(module, x, target).item()
    for _ in range(100):  # Prodigy starts from a tiny step size (d0 = 1e-6) and needs ~70 steps to grow it
        loss = quadratic_loss(module, x, target)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    after = quadratic_loss(module, x, target).item()
    assert after < 0.9 * before, (name, before, after)
    assert module.base.weight.grad is None  # the frozen base stays out of it


def test_all_four_optimizers_are_known():
    assert OPTIMIZERS == ("adamw", "adamw8bit", "adafactor", "prodigy")
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer("sgd", [], weight_decay=0.0, device=CPU)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy"])
def test_kohyas_description_names_the_class_and_the_arguments_built_with(name):
    """ss_optimizer as kohya writes it ("torch.optim.adamw.AdamW(weight_decay=0.01)"): WebUIs and LoRA managers
    show it; the short name sd_lora takes is in sd_lora_config."""
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(name, [{"params": [p], "lr": 1.0}], weight_decay=0.05, device=CPU)
    assert KOHYA_CLASSES[name] == f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    built = {"weight_decay": 0.05, **FIXED_ARGS.get(name, {})}
    assert {key: optimizer.defaults[key] for key in built} == built
    args = ",".join(f"{key}={value}" for key, value in built.items())
    assert kohya_description(name, 0.05) == f"{KOHYA_CLASSES[name]}({args})"
    assert kohya_description("adafactor", 0.0) == ("transformers.optimization.Adafactor(weight_decay=0.0,scale_parameter=False,"
                                                   "relative_step=False,warmup_init=False)")


def test_adamw_is_foreach_on_the_cpu():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer("adamw", [{"params": [p], "lr": 1e-3}, {"params": [], "lr": 1.0}], weight_decay=0.1, device=CPU)
    assert optimizer.defaults["foreach"] is True and len(optimizer.param_groups) == 1  # the empty group is dropped


def test_adafactor_honours_each_groups_lr():
    # Identical parameters and gradients in two groups: the first fixed-step update is proportional to lr.
    a, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    optimizer = build_optimizer("adafactor", [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 4e-3}], weight_decay=0.0, device=CPU)
    grad = torch.arange(16.0).reshape(4, 4) / 16
    a.grad, b.grad = grad.clone(), grad.clone()
    optimizer.step()
    moved_a, moved_b = (1 - a.detach()).abs().sum(), (1 - b.detach()).abs().sum()
    assert moved_a > 0
    assert torch.allclose(moved_b, 4 * moved_a, rtol=1e-4)
    assert [g["relative_step"] for g in optimizer.param_groups] == [False, False]
    assert [g["scale_parameter"] for g in optimizer.param_groups] == [False, False]


def test_adafactor_follows_the_lr_schedule():
    p = torch.nn.Parameter(torch.ones(3, 3))
    optimizer = build_optimizer("adafactor", [{"params": [p], "lr": 1e-2}], weight_decay=0.0, device=CPU)
    scheduler = build_lr_scheduler("linear", optimizer, warmup_steps=0, total_steps=4)
    p.grad = torch.ones(3, 3)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.75e-2)  # the rate Adafactor reads each step


def _rates(name: str, steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(name, optimizer, warmup_steps=0, total_steps=steps, **kwargs)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_with_restarts_restarts_num_cycles_times_and_polynomial_takes_its_power():
    rates = _rates("cosine_with_restarts", 300, num_cycles=3)
    restarts = [i for i in range(1, 300) if rates[i] > rates[i - 1]]
    assert restarts == [100, 200] and rates[100] == pytest.approx(1.0)  # each cycle starts again from the full rate
    assert _rates("cosine_with_restarts", 300) == pytest.approx(_rates("cosine", 300))  # one cycle: cosine
    squared = _rates("polynomial", 100, power=2.0)
    assert squared[50] == pytest.approx(0.5**2, abs=1e-6)  # (1 - t/T)^power, decaying to ~0 (lr_end 1e-7)
    assert _rates("polynomial", 100) == pytest.approx(_rates("linear", 100), abs=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_polynomial_decays_from_the_learning_rate_to_lr_end_as_kohya(name):
    # kohya and the diffusers examples build the optimizer with lr=--learning-rate, and diffusers' polynomial schedule
    # decays from the optimizer's default lr: lr(t) = (lr - lr_end) * (1 - t/T)^power + lr_end, lr_end = 1e-7.
    lr, lr_end, total, power = 1e-4, 1e-7, 10, 2.0
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(name, [{"params": [p], "lr": lr}], weight_decay=0.0, device=CPU)
    scheduler = build_lr_scheduler("polynomial", optimizer, warmup_steps=0, total_steps=total, power=power)
    rates = []
    for _ in range(total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        p.grad = torch.zeros(2)
        optimizer.step()
        scheduler.step()
    expected = [(lr - lr_end) * (1 - t / total) ** power + lr_end for t in range(total + 1)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=0)
    assert rates[-1] == pytest.approx(lr_end, rel=1e-6)


def test_polynomial_refuses_a_learning_rate_at_or_below_its_end():
    optimizer = build_optimizer("adamw", [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-7}], weight_decay=0.0, device=CPU)
    with pytest.raises(UserError, match="decays the learning rate to 1e-07, but --learning-rate is 1e-07"):
        build_lr_scheduler("polynomial", optimizer, warmup_steps=0, total_steps=10)


@pytest.mark.parametrize("module, name, install", [
    ("prodigyopt", "prodigy", "pip install 'sd_lora[prodigy]'"),
    ("bitsandbytes", "adamw8bit", "pip install 'sd_lora[bitsandbytes]'"),
])
def test_missing_package_names_the_install_command(monkeypatch, module, name, install):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}]
    with pytest.raises(UserError, match=f"--optimizer {name} needs .*{re.escape(install)}"):
        build_optimizer(name, groups, weight_decay=0.0, device=CPU)


def test_missing_prodigy_mentions_the_learning_rate(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(UserError, match="--learning-rate 1.0"):
        build_optimizer("prodigy", [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}], weight_decay=0.0, device=CPU)


@pytest.mark.skipif(not available("prodigy"), reason="prodigyopt is not installed (pip install 'sd_lora[prodigy]')")
def test_prodigy_refuses_adamw_sized_and_mixed_learning_rates():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError, match="expects --learning-rate of about 1.0 .* got 0.0001"):
        build_optimizer("prodigy", [{"params": [p], "lr": 1e-4}], weight_decay=0.0, device=CPU)
    with pytest.raises(UserError, match="one learning rate .* 0.5, 1; drop --text-encoder-lr"):
        build_optimizer("prodigy", [{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.5}], weight_decay=0.0, device=CPU)
    # A low text-encoder rate beside --learning-rate 1.0 is the mixed rates' error, not a low --learning-rate's.
    with pytest.raises(UserError, match="one learning rate .* 0.0001, 1; drop --text-encoder-lr"):
        build_optimizer("prodigy", [{"params": [p], "lr": 1.0}, {"params": [q], "lr": 1e-4}], weight_decay=0.0, device=CPU)


def test_adamw8bit_refuses_the_cpu(monkeypatch):
    class FakeBnb:  # stands in for an installed bitsandbytes: the device check must still refuse the CPU
        pass

    monkeypatch.setitem(sys.modules, "bitsandbytes", FakeBnb())
    with pytest.raises(UserError, match="CUDA GPUs only; on this device use --optimizer adamw"):
        build_optimizer("adamw8bit", [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}], weight_decay=0.0, device=CPU)
