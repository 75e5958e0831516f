"""The training step on a tiny model: it learns, it only moves LoRA weights, checkpointing is exact."""

from __future__ import annotations

import dataclasses
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from sd_lora import loop
from sd_lora.lora.inject import inject_lora, trainable_parameters
from sd_lora.lora.targets import unet_target_modules
from sd_lora.models.conditioning import Conditioner
from sd_lora.models.load import load_base_model
from sd_lora.optim import build_lr_scheduler, build_optimizer
from sd_lora.trainee_setup import make_accelerator

MIXED = {torch.float32: "no", torch.bfloat16: "bf16"}


class FixedBatches:
    """A 'dataloader' that yields the same batch forever, with the sampler interface the loop expects."""

    def __init__(self, batch, per_epoch=10):
        self.batch, self.per_epoch, self.start = batch, per_epoch, 0

    def __iter__(self):
        return itertools.repeat(self.batch, self.per_epoch - self.start)

    def __len__(self):
        return self.per_epoch

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch


class Recorder:
    """loop.Hooks that keep what they are told: numbers of logged steps, steps ended, steps skipped."""

    def __init__(self, stop_at=None, records_at=()):
        self.losses, self.grad_norms, self.logged, self.ended, self.skipped, self.d_lrs = [], [], [], [], [], []
        self.stop_at, self.records_at = stop_at, set(records_at)
        self.logged_at_end = {}  # step -> the steps logged when its on_step_end ran

    def on_step_end(self, state):
        self.ended.append(state.step)
        self.logged_at_end[state.step] = list(self.logged)

    def on_step_logged(self, record):
        self.logged.append(record.step)
        self.d_lrs.append(record.d_lr)
        self.losses.append(record.loss)
        self.grad_norms.append(record.grad_norm)

    def on_skipped_step(self, record, nan_steps):
        self.skipped.append(record.step)

    def should_stop(self):
        return self.stop_at is not None and len(self.ended) >= self.stop_at

    def records_numbers_at(self, step):
        return step in self.records_at


def make_trainee(model_dir, *, lr=1e-2, checkpointing=False, rank=8, weight_dtype=torch.float32):
    """A Trainee on the tiny model; with a 16-bit `weight_dtype` the base is stored in it and the loop runs
    under autocast, as `--mixed-precision bf16|fp16` runs."""
    model = load_base_model(str(model_dir))
    for m in (model.unet, model.vae, model.text_encoder):
        m.requires_grad_(False).to(weight_dtype)
    torch.manual_seed(0)
    inject_lora(model.unet, unet_target_modules(model.unet, "attn-mlp"), rank=rank, alpha=rank)
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.unet.train()
    params = trainable_parameters(model.unet)
    optimizer = build_optimizer("adamw", [{"params": params, "lr": lr}], weight_decay=0.0, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "captions": ["zkchar, red circle", "zkchar, blue square"]}
    batches = FixedBatches(batch)
    trainee = loop.Trainee(
        accelerator=make_accelerator(SimpleNamespace(mixed_precision=MIXED[weight_dtype])), unet=model.unet, text_encoders=[model.text_encoder],
        conditioner=Conditioner(model.family, [model.tokenizer], [model.text_encoder]), vae=None,
        dataloader=batches, batch_sampler=batches, optimizer=optimizer,
        lr_scheduler=build_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=100),
        trainable=params, train_text_encoder=False, weight_dtype=weight_dtype, max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    objective = loop.Objective(model.alphas_cumprod, model.num_train_timesteps, "epsilon", 0.18215)
    return model, trainee, objective, batch


def fixed_loss(trainee, objective, batch, seed=123):
    """Loss on fixed noise and timesteps: the same measurement before and after training."""
    saved, trainee.generator = trainee.generator, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        value = loop.compute_loss(trainee, objective, batch, loop.TrainState()).item()
    trainee.generator = saved
    return value


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora_" in n}


@pytest.mark.slow
def test_loss_goes_down_on_a_fixed_batch(tiny_model_dir):
    model, trainee, objective, batch = make_trainee(tiny_model_dir)
    before = fixed_loss(trainee, objective, batch)
    base_before = {n: p.clone() for n, p in model.unet.named_parameters() if "lora_" not in n}
    recorder = Recorder()
    state = loop.train(trainee, objective, loop.TrainState(), max_steps=60, hooks=recorder)
    after = fixed_loss(trainee, objective, batch)
    assert state.step == 60 and len(recorder.losses) == 60
    assert len(recorder.grad_norms) == 60 and all(0 < g < 1e3 for g in recorder.grad_norms)  # pre-clip L2 norms
    assert after < 0.75 * before, (before, after)
    # Only LoRA moved: every base weight is bit-identical.
    for name, p in model.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name]), name


def test_prodigys_learned_step_size_is_recorded_with_each_step(tiny_model_dir):
    """kohya logs Prodigy's d*lr (lr alone is the schedule's multiplier, 1.0): the rate it applies at that step,
    from its step size d before the step updates it."""
    _, trainee, objective, _ = make_trainee(tiny_model_dir)
    recorder = Recorder()
    loop.train(trainee, objective, loop.TrainState(), max_steps=2, hooks=recorder)
    assert recorder.d_lrs == [None, None]  # AdamW: the rate is lr
    trainee.optimizer = build_optimizer("prodigy", [{"params": trainee.trainable, "lr": 0.5}], weight_decay=0.0, device=torch.device("cpu"))
    trainee.lr_scheduler = build_lr_scheduler("linear", trainee.optimizer, warmup_steps=0, total_steps=4)
    seen = []  # d as each step starts, and after the last
    original_step = trainee.optimizer.step

    def step(*args, **kwargs):
        seen.append(trainee.optimizer.param_groups[0]["d"])
        trainee.optimizer.param_groups[0]["d"] *= 3  # as Prodigy's d grows over a long run
        return original_step(*args, **kwargs)

    trainee.optimizer.step = step
    recorder = Recorder()
    loop.train(trainee, objective, loop.TrainState(), max_steps=3, hooks=recorder)
    assert seen[0] == 1e-6  # Prodigy's d0
    assert recorder.d_lrs == pytest.approx([d * lr for d, lr in zip(seen, [0.5, 0.375, 0.25])])


def test_lora_at_init_is_a_no_op_and_gradients_reach_only_lora(tiny_model_dir):
    model, trainee, objective, batch = make_trainee(tiny_model_dir)
    ups = [p for n, p in model.unet.named_parameters() if "lora_B" in n]
    assert ups and all(torch.count_nonzero(p) == 0 for p in ups)  # B = 0: the adapter adds nothing yet
    loss = loop.compute_loss(trainee, objective, batch, loop.TrainState())
    loss.backward()
    with_grad = {n for n, p in model.unet.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    grads = []
    for checkpointing in (False, True):
        model, trainee, objective, batch = make_trainee(tiny_model_dir, checkpointing=checkpointing)
        with torch.no_grad():  # non-zero B so that gradients reach A too
            for n, p in model.unet.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
        loop.compute_loss(trainee, objective, batch, loop.TrainState()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainee.trainable]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_steps_per_epoch_rounds_partial_accumulation_up():
    assert loop.steps_per_epoch(6, 1) == 6
    assert loop.steps_per_epoch(6, 4) == 2
    assert loop.steps_per_epoch(1, 8) == 1


def test_non_finite_loss_stops_with_weights_untouched_or_skips(tiny_model_dir):
    model, trainee, objective, batch = make_trainee(tiny_model_dir)
    loop.train(trainee, objective, loop.TrainState(), max_steps=2, hooks=Recorder())  # two good steps
    good = lora_weights(model)
    poisoned = dict(batch, latents=torch.full_like(batch["latents"], float("nan")))
    trainee.dataloader = trainee.batch_sampler = FixedBatches(poisoned)
    state = loop.TrainState(step=2)
    with pytest.raises(loop.NonFiniteLoss) as e:
        loop.train(trainee, objective, state, max_steps=5, hooks=Recorder())
    assert e.value.step == 3
    for n, p in model.unet.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, good[n]), n  # the bad step never reached the weights
    # With --nan-skip 2: two bad steps are skipped and counted, the third stops the run.
    recorder = Recorder()
    with pytest.raises(loop.NonFiniteLoss):
        loop.train(trainee, objective, loop.TrainState(step=2), max_steps=5, hooks=recorder, nan_skip=2)
    assert recorder.skipped == [3, 3] and recorder.losses == []


class Batches(FixedBatches):
    """The given batches in turn, one pass per epoch."""

    def __init__(self, batches):
        super().__init__(None, per_epoch=len(batches))
        self.batches = batches

    def __iter__(self):
        return iter(self.batches[self.start:])


def train_under_fp16_loss_scaler(model_dir, monkeypatch, max_grad_norm: float):
    """Steps on [good, NaN, good] batches under accelerate's fp16 GradScaler (a GPU's fp16), simulated on the
    CPU; returns (model, weights before, state, recorder)."""
    from accelerate import Accelerator

    model, trainee, objective, batch = make_trainee(model_dir)
    acc = Accelerator(cpu=True)
    monkeypatch.setattr(acc.state, "_mixed_precision", "fp16")  # what Accelerator(mixed_precision="fp16") sets up on CUDA
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = acc.prepare(trainee.optimizer)
    assert optimizer.scaler is acc.scaler and not loop.supports_skip_on_device(optimizer)
    poisoned = dict(batch, latents=torch.full_like(batch["latents"], float("nan")))
    batches = Batches([batch, poisoned, batch])
    trainee = dataclasses.replace(trainee, accelerator=acc, optimizer=optimizer, dataloader=batches, batch_sampler=batches,
                                  lr_scheduler=build_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=100),
                                  max_grad_norm=max_grad_norm)
    before, recorder = lora_weights(model), Recorder()
    state = loop.train(trainee, objective, loop.TrainState(), max_steps=2, hooks=recorder, nan_skip=1, check_gradients=False)
    return model, before, state, recorder


def test_fp16_loss_scaler_skipped_step_and_gradient_norm(tiny_model_dir, monkeypatch):
    """Clipping unscales the gradients; a step skipped for a NaN loss after that left the scaler waiting for an
    update() that never came, and the next step's clipping failed ("unscale_() has already been called").
    Without clipping the logged gradient norm was the scaled one (x1024 here)."""
    norms = {}
    for max_grad_norm in (1.0, 0.0):
        model, before, state, recorder = train_under_fp16_loss_scaler(tiny_model_dir, monkeypatch, max_grad_norm)
        assert (state.step, recorder.logged, recorder.skipped) == (2, [1, 2], [2])
        assert any(not torch.equal(p, before[n]) for n, p in lora_weights(model).items())  # the good steps updated
        norms[max_grad_norm] = recorder.grad_norms[0]  # the same first step: the same gradients
    assert 0 < norms[0.0] == pytest.approx(norms[1.0], rel=1e-5)


class WeightRecorder(Recorder):
    """Recorder that also keeps the LoRA weights each step ended with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.weights = model, {}

    def on_step_end(self, state):
        super().on_step_end(state)
        self.weights[state.step] = lora_weights(self.model)


def test_fp16_loss_scaler_with_a_fused_optimizer_skips_on_the_device(tiny_model_dir, monkeypatch):
    """fp16 on a GPU with the default fused AdamW: the loss scaler's own flag skips a non-finite step on the device,
    so no step waits for the host to read its loss (every fp16 step did, while the README says none waits). The NaN
    step leaves the weights alone, is counted one step later, keeps its place in the count, and the scale backs off."""
    from accelerate import Accelerator

    from sd_lora.train import skip_steps_on_device

    model, trainee, objective, batch = make_trainee(tiny_model_dir)
    fused(trainee)
    acc = Accelerator(cpu=True)
    monkeypatch.setattr(acc.state, "_mixed_precision", "fp16")  # what Accelerator(mixed_precision="fp16") sets up on CUDA
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = acc.prepare(trainee.optimizer)
    assert skip_steps_on_device(torch.device("cuda"), optimizer)
    poisoned = dict(batch, latents=torch.full_like(batch["latents"], float("nan")))
    batches = Batches([batch, poisoned, batch, batch])
    trainee = dataclasses.replace(trainee, accelerator=acc, optimizer=optimizer, dataloader=batches, batch_sampler=batches,
                                  lr_scheduler=build_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=100))
    host_reads, reading, values = [], [], loop.Readout.values

    def read_values(self):
        reading.append(True)
        try:
            return values(self)
        finally:
            reading.pop()

    monkeypatch.setattr(loop.Readout, "values", read_values)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        def spy(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            if not reading:
                host_reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    recorder = WeightRecorder(model)
    state = loop.train(trainee, objective, loop.TrainState(), max_steps=4, hooks=recorder, nan_skip=1, check_gradients=False,
                       skip_on_device=True)
    monkeypatch.undo()
    assert host_reads == []
    assert (state.step, state.nan_steps, recorder.logged, recorder.skipped, recorder.ended) == (4, 1, [1, 3, 4], [2], [1, 2, 3, 4])
    assert all(torch.equal(recorder.weights[2][n], w) for n, w in recorder.weights[1].items())  # the NaN step changed nothing
    assert any(not torch.equal(recorder.weights[3][n], w) for n, w in recorder.weights[2].items())  # the next one trained
    assert acc.scaler.get_scale() == 2.0**9  # one backoff, for the NaN step


def test_should_stop_ends_after_the_current_step(tiny_model_dir):
    model, trainee, objective, batch = make_trainee(tiny_model_dir)
    state = loop.train(trainee, objective, loop.TrainState(), max_steps=50, hooks=Recorder(stop_at=3))
    assert state.step == 3 and state.batch_in_epoch == 3 and state.epoch == 0


def test_prior_samples_weigh_prior_loss_weight(tiny_model_dir):
    import dataclasses

    _, trainee, objective, batch = make_trainee(tiny_model_dir)
    plain = fixed_loss(trainee, objective, batch)
    mixed = {**batch, "prior": torch.tensor([True, False])}
    assert fixed_loss(trainee, objective, mixed) == pytest.approx(plain)  # weight 1: as if unmarked
    heavy = dataclasses.replace(objective, prior_loss_weight=3.0)
    all_prior = {**batch, "prior": torch.tensor([True, True])}
    assert fixed_loss(trainee, heavy, all_prior) == pytest.approx(3 * plain, rel=1e-5)
    one_prior = fixed_loss(trainee, heavy, mixed)
    assert plain < one_prior < 3 * plain


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_peft_input_casts_are_left_to_autocast_only_while_it_runs(tiny_model_dir, weight_dtype):
    """Under bf16 autocast the LoRA layers skip PEFT's fp32 copy of their inputs during the training forward
    (autocast casts them once); in fp32 and after the step PEFT's own cast stays on."""
    model, trainee, objective, batch = make_trainee(tiny_model_dir, weight_dtype=weight_dtype)
    layer = next(m for m in model.unet.modules() if hasattr(m, "cast_input_dtype_enabled"))
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append((m.cast_input_dtype_enabled, args[0].dtype)))
    recorder = Recorder()
    loop.train(trainee, objective, loop.TrainState(), max_steps=2, hooks=recorder)
    autocast = weight_dtype != torch.float32
    assert seen == [(not autocast, weight_dtype)] * 2
    assert layer.cast_input_dtype_enabled
    assert all(map(math.isfinite, recorder.losses)) and len(recorder.losses) == 2
    assert {p.dtype for p in trainee.trainable} == {torch.float32}


def fused(trainee):
    """The trainee with torch's fused AdamW (the CUDA default; on the CPU too it skips on `found_inf`)."""
    trainee.optimizer = torch.optim.AdamW(trainee.trainable, lr=1e-2, weight_decay=0.0, fused=True)
    trainee.lr_scheduler = build_lr_scheduler("constant", trainee.optimizer, warmup_steps=0, total_steps=100)
    return trainee


def test_skip_on_device_trains_exactly_as_the_host_check(tiny_model_dir):
    """Finite steps: the same weights, losses and gradient norms; the numbers arrive one step late."""
    results = []
    for on_device in (False, True):
        model, trainee, objective, _ = make_trainee(tiny_model_dir)
        assert loop.supports_skip_on_device(fused(trainee).optimizer)
        recorder = Recorder()
        state = loop.train(trainee, objective, loop.TrainState(), max_steps=4, hooks=recorder, skip_on_device=on_device)
        assert state.step == 4 and state.nan_steps == 0
        assert recorder.ended == recorder.logged == [1, 2, 3, 4]
        assert not hasattr(trainee.optimizer, "found_inf")  # the flag is only there during the step
        results.append((lora_weights(model), recorder.losses, recorder.grad_norms))
    (host_w, host_losses, host_norms), (dev_w, dev_losses, dev_norms) = results
    assert host_losses == dev_losses and host_norms == dev_norms
    assert all(torch.equal(host_w[n], dev_w[n]) for n in host_w)
    assert any(torch.count_nonzero(w) for n, w in dev_w.items() if "lora_B" in n)  # it did train


def test_skip_on_device_hands_over_a_steps_numbers_before_a_state_records_them(tiny_model_dir):
    """A training state saved at step 2 holds the loss average and skipped-step count of steps 1-2: the loop settles
    step 2 before its on_step_end there (a wait on a GPU), and reads the others one step late as before."""
    _, trainee, objective, _ = make_trainee(tiny_model_dir)
    fused(trainee)
    recorder = Recorder(records_at={2})
    loop.train(trainee, objective, loop.TrainState(), max_steps=4, hooks=recorder, skip_on_device=True)
    assert recorder.logged_at_end == {1: [], 2: [1, 2], 3: [1, 2], 4: [1, 2, 3]}
    assert recorder.logged == [1, 2, 3, 4]


def test_skip_on_device_leaves_weights_and_moments_untouched_then_stops(tiny_model_dir):
    model, trainee, objective, batch = make_trainee(tiny_model_dir)
    fused(trainee)
    loop.train(trainee, objective, loop.TrainState(), max_steps=2, hooks=Recorder(), skip_on_device=True)
    good = lora_weights(model)
    moments = [(trainee.optimizer.state[p]["exp_avg"].clone(), trainee.optimizer.state[p]["exp_avg_sq"].clone()) for p in trainee.trainable]
    steps = {float(trainee.optimizer.state[p]["step"]) for p in trainee.trainable}
    poisoned = dict(batch, latents=torch.full_like(batch["latents"], float("nan")))
    trainee.dataloader = trainee.batch_sampler = FixedBatches(poisoned)
    recorder = Recorder()
    # --nan-skip 1: step 3 is skipped (known during step 4), step 4 exhausts the budget (known during step 5).
    with pytest.raises(loop.NonFiniteLoss) as e:
        loop.train(trainee, objective, loop.TrainState(step=2), max_steps=10, hooks=recorder, nan_skip=1, skip_on_device=True)
    assert e.value.step == 4 and math.isnan(e.value.loss) and e.value.weights_step == 5
    assert recorder.skipped == [3] and recorder.logged == [] and recorder.ended == [3, 4]
    assert all(torch.equal(p, good[n]) for n, p in lora_weights(model).items())
    assert {float(trainee.optimizer.state[p]["step"]) for p in trainee.trainable} == steps == {2.0}
    for p, (m, v) in zip(trainee.trainable, moments):
        assert torch.equal(trainee.optimizer.state[p]["exp_avg"], m) and torch.equal(trainee.optimizer.state[p]["exp_avg_sq"], v)


def test_skip_on_device_reads_a_step_only_after_the_next_one_is_queued(tiny_model_dir, monkeypatch):
    """What keeps a GPU busy: with skip_on_device the host's only reads of step values are Readouts of the
    previous step, after the next step's update is queued; nothing else in the loop reads a tensor back."""
    _, trainee, objective, _ = make_trainee(tiny_model_dir)
    fused(trainee)
    events, reading = [], []
    trainee.optimizer.register_step_pre_hook(lambda *_: events.append("step"))
    values = loop.Readout.values

    def logged_values(self):
        events.append("read")
        reading.append(True)
        try:
            return values(self)
        finally:
            reading.pop()

    monkeypatch.setattr(loop.Readout, "values", logged_values)
    host_reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if not reading:
                host_reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    loop.train(trainee, objective, loop.TrainState(), max_steps=4, hooks=Recorder(), skip_on_device=True)
    assert events == ["step", "step", "read", "step", "read", "step", "read", "read"]
    assert host_reads == []
    torch.ones(()).item()  # the spies see a read outside a Readout
    assert host_reads == ["item"]


def test_only_optimizers_that_read_found_inf_skip_on_the_device():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert loop.supports_skip_on_device(torch.optim.AdamW(params, fused=True))
    assert not loop.supports_skip_on_device(torch.optim.AdamW(params, foreach=True))
    assert not loop.supports_skip_on_device(torch.optim.SGD(params, lr=1.0))
    # accelerate's wrapper: the inner optimizer decides, also under fp16's loss scaler (which sets found_inf itself).
    wrapped = SimpleNamespace(optimizer=torch.optim.AdamW(params, fused=True), scaler=None)
    assert loop.supports_skip_on_device(wrapped)
    assert loop.supports_skip_on_device(SimpleNamespace(optimizer=wrapped.optimizer, scaler=object()))
    assert not loop.supports_skip_on_device(SimpleNamespace(optimizer=torch.optim.AdamW(params, foreach=True), scaler=object()))


def test_non_finite_is_a_device_flag():
    nan, inf, one = torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(1.0)
    assert loop.non_finite(one, one).item() == 0.0 and loop.non_finite(one, one).dtype == torch.float32
    assert loop.non_finite(nan, one).item() == 1.0 and loop.non_finite(one, inf).item() == 1.0
    assert loop.non_finite(one, None).item() == 0.0  # fp16: the gradient norm is the loss scaler's business


def test_vae_encodes_in_its_own_dtype_under_autocast():
    """SDXL's VAE stays fp32 under --mixed-precision fp16 because fp16 overflows it; the autocast that the
    training step (and latent caching) runs in must not compute it in 16 bits anyway."""
    from sd_lora.models.tiny import tiny_vae

    vae = tiny_vae().eval()
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = loop.encode_pixels(vae, pixels, 0.18215, torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loop.encode_pixels(vae, pixels, 0.18215, torch.Generator().manual_seed(1))
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)


def test_vae_posterior_noise_is_sharded_like_the_diffusion_noise():
    """Without the latent cache each rank encodes its own images: every rank draws the posterior noise of the
    global batch from the same generator and keeps its slice, as the diffusion noise does. Two ranks then get
    the latents one process with the global batch gets, and the same image on two ranks gets two draws. With
    one process the draw is diffusers' own posterior sample."""
    from sd_lora.models.tiny import tiny_vae

    vae = tiny_vae().eval()
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def encode(images, **shard):
        return loop.encode_pixels(vae, images, 0.18215, torch.Generator().manual_seed(1), **shard)

    whole = encode(pixels)
    with torch.no_grad():
        reference = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(1)) * 0.18215
    assert torch.equal(whole, reference)
    halves = torch.cat([encode(pixels[2 * rank:2 * rank + 2], replicas=2, rank=rank) for rank in (0, 1)])
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-5)  # the VAE's batch of 2 vs 4: last bits only
    rank_0, rank_1 = (encode(pixels[:2], replicas=2, rank=rank) for rank in (0, 1))
    assert (rank_0 - rank_1).abs().mean() > 0.01 * rank_0.abs().mean()
