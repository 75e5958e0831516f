"""PEFT injection: exact targeting, init invariance, frozen fp32 LoRA, and by-name weight access."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd_lora.errors import UserError
from sd_lora.lora.inject import (
    LoraModuleWeights,
    autocast_casts_lora_inputs,
    count_parameters,
    inject_lora,
    load_lora_weights_into,
    lora_weights,
    set_lora_enabled,
    trainable_parameters,
)
from sd_lora.lora.targets import text_encoder_target_modules, unet_target_modules


def _injected(make_pipe, family="sd1", rank=4, alpha=2.0, **kwargs):
    pipe = make_pipe(family)
    inject_lora(pipe.unet, unet_target_modules(pipe.unet), rank=rank, alpha=alpha, **kwargs)
    inject_lora(pipe.text_encoder, text_encoder_target_modules(pipe.text_encoder), rank=rank, alpha=alpha, **kwargs)
    return pipe


def _randomize_lora(model, seed=0):
    """Stand-in for training: every LoRA weight non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def _te_out(text_encoder, ids):
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_injection_wraps_exactly_the_targets(make_pipe, family):
    pipe = _injected(make_pipe, family)
    for model, expected_count in ((pipe.unet, 48), (pipe.text_encoder, 18)):  # see test_targets.py for the counts
        weights = lora_weights(model)
        assert len(weights) == expected_count
    # The targets list itself is computed on an un-injected twin: the same paths must now be LoRA layers.
    twin = make_pipe(family)
    assert set(lora_weights(pipe.unet)) == set(unet_target_modules(twin.unet))
    assert set(lora_weights(pipe.text_encoder)) == set(text_encoder_target_modules(twin.text_encoder))


def test_no_suffix_over_matching():
    """PEFT matches a list of targets by suffix ('b.a' ends with '.a'); we must wrap only the exact path 'a'."""

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Module()
            self.b.a = nn.Linear(4, 4)

    toy = Toy()
    inject_lora(toy, ["a"], rank=2, alpha=2)
    assert set(lora_weights(toy)) == {"a"}
    assert type(toy.b.a) is nn.Linear


def test_single_text_encoder_target(make_pipe):
    text_encoder = make_pipe("sd1").text_encoder
    inject_lora(text_encoder, ["encoder.layers.1.self_attn.q_proj"], rank=2, alpha=1)
    assert list(lora_weights(text_encoder)) == ["encoder.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_lora_at_init_changes_nothing(make_pipe, family, unet_inputs, token_ids):
    pipe = make_pipe(family)
    unet_before, te_before = _unet_out(pipe.unet, unet_inputs), _te_out(pipe.text_encoder, token_ids)
    inject_lora(pipe.unet, unet_target_modules(pipe.unet), rank=4, alpha=2)
    inject_lora(pipe.text_encoder, text_encoder_target_modules(pipe.text_encoder), rank=4, alpha=2)
    # lora_B is zero, so the LoRA branch adds exact zeros: bitwise identical outputs.
    assert torch.equal(_unet_out(pipe.unet, unet_inputs), unet_before)
    assert torch.equal(_te_out(pipe.text_encoder, token_ids), te_before)
    # ... while lora_A is not zero (kaiming-uniform), so training has a gradient path through B.
    weights = lora_weights(pipe.unet)
    assert all(w.up.abs().max() == 0 and w.down.abs().max() > 0 for w in weights.values())


def test_base_frozen_lora_trainable_and_counted(make_pipe):
    pipe = _injected(make_pipe, "sd1")
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            assert p.requires_grad == ("lora_" in name), name
    # Hand count, rank 4: a LoRA on an (in -> out) layer has 4 * (in + out) values.
    # U-Net, per Transformer2DModel of width d (cross_attention_dim 32, GEGLU ff of inner width 4d):
    #   proj_in, proj_out, attn1 q/k/v/out, attn2 q/out:  8 layers d->d        8 * 4 * 2d       = 64d
    #   attn2 k, v: 32->d                                  2 * 4 * (32 + d)                   = 8d + 256
    #   ff.net.0.proj: d->8d = 36d;  ff.net.2: 4d->d = 20d                                    = 56d
    #   total 128d + 256; three blocks at d=32 and the mid block at d=64: 3 * 4352 + 8448  = 21504
    assert count_parameters(trainable_parameters(pipe.unet)) == 21504
    # Text encoder: 3 layers x (4 x 4*(32+32) attention + fc1 4*(32+64) + fc2 4*(64+32)) = 3 * 1792
    assert count_parameters(trainable_parameters(pipe.text_encoder)) == 5376
    assert count_parameters(pipe.unet) > 21504


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_params_are_fp32_on_a_half_precision_base(make_pipe, dtype, unet_inputs):
    unet = make_pipe("sd2").unet.to(dtype)
    inject_lora(unet, unet_target_modules(unet), rank=4, alpha=2)
    assert {p.dtype for p in trainable_parameters(unet)} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {dtype}
    _randomize_lora(unet)
    latents, t, states = unet_inputs
    out = _unet_out(unet, (latents.to(dtype), t, states.to(dtype)))
    assert out.dtype == dtype and torch.isfinite(out).all()


def _bf16_step(unet, inputs, count_casts):
    """Loss and LoRA gradients of one bf16-autocast forward + backward; counts dtype casts when asked."""
    from torch.utils._python_dispatch import TorchDispatchMode

    casts = []

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                casts.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    unet.zero_grad(set_to_none=True)
    latents, t, states = inputs
    with CountCasts(), torch.autocast("cpu", dtype=torch.bfloat16), count_casts(unet):
        loss = unet(latents.to(torch.bfloat16), t, states.to(torch.bfloat16)).sample.float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainable_parameters(unet)], len(casts)


def test_autocast_casts_lora_inputs_drops_peft_round_trip(make_pipe, unet_inputs):
    """Under autocast PEFT's fp32 copy of each LoRA input is redundant: without it the loss and every LoRA
    gradient are bit for bit the same and two casts per LoRA layer and direction are gone."""
    import contextlib

    unet = make_pipe("sd1").unet.to(torch.bfloat16)
    inject_lora(unet, unet_target_modules(unet), rank=4, alpha=2)
    _randomize_lora(unet)
    layers = sum(1 for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled"))
    loss, grads, casts = _bf16_step(unet, unet_inputs, lambda m: contextlib.nullcontext())
    loss2, grads2, casts2 = _bf16_step(unet, unet_inputs, lambda m: autocast_casts_lora_inputs([m], "cpu"))
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))
    assert casts - casts2 >= 2 * layers  # bf16 -> fp32 -> bf16 per layer forward, and again backward
    assert all(m.cast_input_dtype_enabled for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_autocast_casts_lora_inputs_keeps_peft_casts_without_autocast(make_pipe, unet_inputs):
    unet = make_pipe("sd1").unet.to(torch.bfloat16)
    inject_lora(unet, unet_target_modules(unet), rank=4, alpha=2)
    _randomize_lora(unet)
    latents, t, states = unet_inputs
    with autocast_casts_lora_inputs([unet], "cpu"):  # autocast off: PEFT must still meet fp32 LoRA weights
        assert all(m.cast_input_dtype_enabled for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled"))
        out = _unet_out(unet, (latents.to(torch.bfloat16), t, states.to(torch.bfloat16)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_second_injection_is_refused(make_pipe):
    unet = _injected(make_pipe).unet
    with pytest.raises(ValueError, match="twice"):
        inject_lora(unet, ["down_blocks.0.attentions.0.proj_in"], rank=4, alpha=2)


def test_unknown_target_path_is_refused(make_pipe):
    unet = make_pipe("sd1").unet
    with pytest.raises(ValueError, match="not modules"):
        inject_lora(unet, ["down_blocks.0.attentions.0.to_q"], rank=4, alpha=2)


def test_dropout_and_named_adapter(make_pipe, unet_inputs):
    unet = make_pipe("sd1").unet
    inject_lora(unet, unet_target_modules(unet, "cross-attn"), rank=2, alpha=1, dropout=0.1, adapter_name="mine")
    layer = dict(unet.named_modules())["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert layer.active_adapters == ["mine"]
    assert isinstance(layer.lora_dropout["mine"], nn.Dropout) and layer.lora_dropout["mine"].p == 0.1
    assert count_parameters(trainable_parameters(unet)) > 0
    assert set(lora_weights(unet, "mine")) == set(unet_target_modules(make_pipe("sd1").unet, "cross-attn"))
    # The adapter is active: with a non-zero B the output moves.
    unet.eval()
    base = _unet_out(unet, unet_inputs)
    _randomize_lora(unet)
    assert not torch.allclose(_unet_out(unet, unet_inputs), base)


@pytest.mark.parametrize("family, proj_down_shape", [("sd1", (4, 32, 1, 1)), ("sd2", (4, 32))])
def test_lora_weights_are_detached_cpu_copies(make_pipe, family, proj_down_shape):
    unet = _injected(make_pipe, family).unet
    weights = lora_weights(unet)
    proj = weights["down_blocks.0.attentions.0.proj_in"]
    assert tuple(proj.down.shape) == proj_down_shape
    assert tuple(proj.up.shape) == (32, 4) + proj_down_shape[2:]
    assert proj.alpha == 2.0 and proj.rank == 4
    assert all(w.down.device.type == "cpu" and not w.down.requires_grad for w in weights.values())
    proj.down.add_(1.0)  # must not write through to the model
    assert not torch.equal(lora_weights(unet)["down_blocks.0.attentions.0.proj_in"].down, proj.down)


def test_set_lora_enabled(make_pipe, unet_inputs):
    pipe = make_pipe("sd1")
    base = _unet_out(pipe.unet, unet_inputs)
    inject_lora(pipe.unet, unet_target_modules(pipe.unet), rank=4, alpha=2)
    _randomize_lora(pipe.unet)
    set_lora_enabled(pipe.unet, False)
    assert torch.equal(_unet_out(pipe.unet, unet_inputs), base)
    set_lora_enabled(pipe.unet, True)
    assert not torch.allclose(_unet_out(pipe.unet, unet_inputs), base)


def test_load_lora_weights_into_by_name(make_pipe, unet_inputs, token_ids):
    trained = _injected(make_pipe, "sd1")
    _randomize_lora(trained.unet, seed=1)
    _randomize_lora(trained.text_encoder, seed=2)
    fresh = _injected(make_pipe, "sd1")
    # Reverse the dict order: loading is by name, never by position.
    for src, dst in ((trained.unet, fresh.unet), (trained.text_encoder, fresh.text_encoder)):
        load_lora_weights_into(dst, dict(reversed(lora_weights(src).items())))
    assert torch.equal(_unet_out(fresh.unet, unet_inputs), _unet_out(trained.unet, unet_inputs))
    assert torch.equal(_te_out(fresh.text_encoder, token_ids), _te_out(trained.text_encoder, token_ids))


def test_load_lora_weights_into_refuses_mismatches(make_pipe):
    unet = _injected(make_pipe, "sd1").unet
    good = lora_weights(unet)
    first, second, third, fourth = list(good)[:4]

    missing = {k: v for k, v in good.items() if k != first}
    with pytest.raises(UserError, match=rf"1 modules missing: {first}"):
        load_lora_weights_into(unet, missing, source="x.safetensors")

    unexpected = {**good, "conv_in": good[first]}
    with pytest.raises(UserError, match="1 unexpected modules: conv_in"):
        load_lora_weights_into(unet, unexpected)

    w = good[second]
    wrong_rank = {**good, second: LoraModuleWeights(w.down[:2].clone(), w.up[:, :2].clone(), w.alpha)}
    with pytest.raises(UserError, match=second):
        load_lora_weights_into(unet, wrong_rank)

    w = good[third]
    wrong_alpha = {**good, third: LoraModuleWeights(w.down, w.up, alpha=4.0)}
    with pytest.raises(UserError, match=rf"{third} \(model alpha 2, got 4\)") as info:
        load_lora_weights_into(unet, {**wrong_alpha, "conv_in": good[fourth]}, source="x.safetensors")
    # every problem is reported at once, with the source named
    assert "unexpected" in str(info.value) and str(info.value).startswith("x.safetensors")
