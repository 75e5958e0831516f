from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd_lora.models.tiny import build_tiny_pipeline
from sd_lora.sampling.prompts import SamplePrompt
from sd_lora.sampling.sampler import (
    SAMPLERS,
    _Row,
    SampleSettings,
    SamplingStopped,
    build_sampling_pipeline,
    generate_grid,
    generate_images,
    make_scheduler,
    save_grid,
)

FAST = SampleSettings(width=32, height=32, steps=2, seeds=(0, 1))
CIRCLE = SamplePrompt("a red circle")
SQUARE = SamplePrompt("a blue square")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_gives_the_same_image_whatever_the_order_or_batch(sd1_pipe):
    cells, _ = generate_images(sd1_pipe, [CIRCLE, SQUARE], FAST)
    again, _ = generate_images(sd1_pipe, [SQUARE, CIRCLE], FAST)
    assert np.array_equal(pixels(cells[0][0]), pixels(again[1][0]))
    assert np.array_equal(pixels(cells[1][1]), pixels(again[0][1]))
    alone, _ = generate_images(sd1_pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(1,)))
    assert np.array_equal(pixels(cells[0][1]), pixels(alone[0][0]))


def test_different_seeds_and_prompts_give_different_images(sd1_pipe):
    cells, _ = generate_images(sd1_pipe, [CIRCLE, SQUARE], FAST)
    assert not np.array_equal(pixels(cells[0][0]), pixels(cells[0][1]))
    assert not np.array_equal(pixels(cells[0][0]), pixels(cells[1][0]))


def test_prompt_options_override_the_settings(sd1_pipe):
    prompts = [CIRCLE, SamplePrompt("a tall one", width=16, height=48, steps=3, cfg=2.0, seed=7, negative="blurry")]
    cells, rows = generate_images(sd1_pipe, prompts, FAST)
    assert [c.size for c in cells[0]] == [(32, 32), (32, 32)]
    assert [c.size for c in cells[1]] == [(16, 48), (16, 48)]  # cell size before any grid scaling
    assert rows[1] == {
        "prompt": "a tall one", "negative": "blurry", "width": 16, "height": 48, "steps": 3, "cfg": 2.0,
        "seeds": [7, 8], "sampler": "ddim",
    }
    # the row's --d 7 seeds its first column: the same image as seed 7 in settings' first column
    same, _ = generate_images(
        sd1_pipe, [SamplePrompt("a tall one", width=16, height=48, steps=3, cfg=2.0, negative="blurry")],
        SampleSettings(32, 32, steps=2, seeds=(7,)),
    )
    assert np.array_equal(pixels(cells[1][0]), pixels(same[0][0]))


def test_settings_negative_is_used_unless_the_prompt_has_one(sd1_pipe):
    settings = SampleSettings(32, 32, steps=2, seeds=(0,), negative="blurry")
    _, rows = generate_images(sd1_pipe, [CIRCLE, SamplePrompt("x", negative="ugly")], settings)
    assert [r["negative"] for r in rows] == ["blurry", "ugly"]
    with_negative, _ = generate_images(sd1_pipe, [CIRCLE], settings)
    without, _ = generate_images(sd1_pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,)))
    assert not np.array_equal(pixels(with_negative[0][0]), pixels(without[0][0]))


def test_the_empty_prompt_samples_and_is_labelled(sd1_pipe):
    from sd_lora.sampling.sampler import _Row

    grid, log = generate_grid(sd1_pipe, [SamplePrompt("")], FAST)
    assert grid.size == (128 + 2 * 132 + 4, 27 + 132)  # one row of 32 px cells, no title
    assert log["rows"][0]["prompt"] == ""
    assert _Row.resolve(SamplePrompt(""), FAST).label(FAST) == "(empty prompt)"
    assert _Row.resolve(SamplePrompt("", steps=3), FAST).label(FAST) == "(empty prompt) [3 steps]"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_with_v_prediction(sd2v_pipe, sampler):
    settings = SampleSettings(32, 32, steps=3, seeds=(0, 1), sampler=sampler)
    grid, log = generate_grid(sd2v_pipe, [CIRCLE], settings, title=sampler)
    assert grid.size == (128 + 2 * 132 + 4, 27 + 27 + 132)  # see test_grid: 32 px cells, with a title
    assert log["sampler"] == sampler
    assert log["scheduler"] == SAMPLERS[sampler][0] == type(sd2v_pipe.scheduler).__name__
    assert log["prediction_type"] == "v_prediction"
    cells, _ = generate_images(sd2v_pipe, [CIRCLE], settings)
    assert pixels(cells[0][0]).std() > 0  # not a blank (NaN-decoded) image


def test_schedulers_keep_the_training_prediction_type():
    config = build_tiny_pipeline("sd2-v").scheduler.config
    for sampler in SAMPLERS:
        assert make_scheduler(sampler, config).config.prediction_type == "v_prediction"
    assert make_scheduler("dpmsolver++", config).config.algorithm_type == "dpmsolver++"


def test_a_rows_ss_samples_with_its_own_sampler(sd1_pipe):
    """A prompt's --ss (kohya's per-prompt sampler) draws its row with that sampler, the other rows with the
    settings' one; the row is labelled and logged with it."""
    euler_a = SampleSettings(32, 32, steps=3, seeds=(0,), sampler="euler_a")
    ddim = SampleSettings(32, 32, steps=3, seeds=(0,), sampler="ddim")
    mixed, log = generate_images(sd1_pipe, [SamplePrompt("a red circle", sampler="k_euler_a"), CIRCLE], ddim)
    alone_euler_a, _ = generate_images(sd1_pipe, [CIRCLE], euler_a)
    alone_ddim, _ = generate_images(sd1_pipe, [CIRCLE], ddim)
    assert np.array_equal(pixels(mixed[0][0]), pixels(alone_euler_a[0][0]))
    assert np.array_equal(pixels(mixed[1][0]), pixels(alone_ddim[0][0]))
    assert not np.array_equal(pixels(mixed[0][0]), pixels(mixed[1][0]))
    assert [row["sampler"] for row in log] == ["k_euler_a", "ddim"]
    _, grid_log = generate_grid(sd1_pipe, [SamplePrompt("a red circle", sampler="euler_a"), CIRCLE], ddim)
    assert grid_log["scheduler"] == "DDIMScheduler" and grid_log["rows"][0]["sampler"] == "euler_a"
    assert _Row.resolve(SamplePrompt("x", sampler="euler_a"), ddim).label(ddim) == "x [euler_a]"
    assert _Row.resolve(SamplePrompt("x", sampler="ddim"), ddim).label(ddim) == "x"


def test_a_sampler_built_after_another_is_the_one_built_from_the_model():
    """Switching rows goes from one sampler's scheduler to the next: no sampler's settings may carry over
    (dpmsolver++'s algorithm_type would turn dpmsingle into another sampler)."""
    config = build_tiny_pipeline("sd2-v").scheduler.config
    for first in SAMPLERS:
        for second in SAMPLERS:
            via = make_scheduler(second, make_scheduler(first, config).config)
            assert dict(via.config) == dict(make_scheduler(second, config).config), (first, second)


def test_unknown_sampler_lists_the_supported_ones(sd1_pipe):
    with pytest.raises(ValueError, match=r"'lms'.*ddim, euler, euler_a, dpmsolver\+\+"):
        SampleSettings(32, 32, sampler="lms")  # diffusers' LMS needs scipy
    with pytest.raises(ValueError, match="supported: ddim"):
        make_scheduler("k_lms", sd1_pipe.scheduler.config)


def test_build_sampling_pipeline_wraps_the_live_modules():
    tiny = build_tiny_pipeline("sd1")
    pipe = build_sampling_pipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler_config=tiny.scheduler.config, sampler="euler_a",
    )
    assert pipe.unet is tiny.unet and pipe.vae is tiny.vae and pipe.text_encoder is tiny.text_encoder
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    # a change to the live weights shows up in the next sample
    before, _ = generate_images(pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,), sampler="euler_a"))
    with torch.no_grad():
        tiny.unet.conv_out.bias.add_(0.5)
    after, _ = generate_images(pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,), sampler="euler_a"))
    assert not np.array_equal(pixels(before[0][0]), pixels(after[0][0]))


def test_other_pipelines_get_the_settings_sampler():
    tiny = build_tiny_pipeline("sd2-v")  # has the training DDPMScheduler
    _, log = generate_grid(tiny, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,), sampler="euler"))
    assert type(tiny.scheduler).__name__ == "EulerDiscreteScheduler"
    assert log["prediction_type"] == tiny.scheduler.config.prediction_type == "v_prediction"


def test_train_eval_modes_are_restored(fresh_sd1_pipe):
    pipe = fresh_sd1_pipe
    pipe.unet.train()
    pipe.unet.conv_in.eval()  # mixed states inside one module survive too
    pipe.text_encoder.eval()
    pipe.vae.train()
    before = {name: [m.training for m in module.modules()] for name, module in pipe.components.items()
              if isinstance(module, torch.nn.Module)}
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append((m.training, pipe.vae.training)))
    generate_grid(pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,)))
    hook.remove()
    assert seen and all(flags == (False, False) for flags in seen)  # eval while sampling
    after = {name: [m.training for m in module.modules()] for name, module in pipe.components.items()
             if isinstance(module, torch.nn.Module)}
    assert after == before
    assert pipe.unet.training and not pipe.unet.conv_in.training and not pipe.text_encoder.training

    def fail(module, args):
        raise RuntimeError("boom")

    hook = pipe.unet.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        generate_grid(pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,)))
    hook.remove()
    assert after == {name: [m.training for m in module.modules()] for name, module in pipe.components.items()
                     if isinstance(module, torch.nn.Module)}


def test_sampling_leaves_grad_mode_and_global_rng_alone(sd1_pipe, capfd):
    state = torch.get_rng_state()
    capfd.readouterr()
    generate_grid(sd1_pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,)))
    assert torch.equal(torch.get_rng_state(), state)  # the training run's noise does not change
    assert torch.is_grad_enabled()
    assert "it/s" not in capfd.readouterr().err  # no progress bar


def test_log_dict(sd1_pipe):
    settings = SampleSettings(32, 32, steps=2, cfg=5.0, seeds=(3, 4), negative="blurry", sampler="ddim")
    prompts = [CIRCLE, SamplePrompt("wide", width=48, seed=10)]
    grid, log = generate_grid(sd1_pipe, prompts, settings, title="step 10")
    assert grid.mode == "RGB"
    seconds = log.pop("seconds")
    assert isinstance(seconds, float) and seconds >= 0
    assert log == {
        "sampler": "ddim",
        "scheduler": "DDIMScheduler",
        "prediction_type": "epsilon",
        "steps": 2,
        "cfg": 5.0,
        "seeds": [3, 4],
        "negative": "blurry",
        "rows": [
            {"prompt": "a red circle", "negative": "blurry", "width": 32, "height": 32, "steps": 2, "cfg": 5.0,
             "seeds": [3, 4], "sampler": "ddim"},
            {"prompt": "wide", "negative": "blurry", "width": 48, "height": 32, "steps": 2, "cfg": 5.0,
             "seeds": [10, 11], "sampler": "ddim"},
        ],
    }
    json.dumps(log)  # loggable as is


def test_sizes_are_checked_before_sampling(sd1_pipe):
    calls = []
    hook = sd1_pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"multiples of 8: row 1: 36x32"):
            generate_images(sd1_pipe, [CIRCLE, SamplePrompt("x", width=36)], FAST)
    finally:
        hook.remove()
    assert calls == []


def test_mixed_dtypes_sample_under_autocast(fresh_sd1_pipe):
    pipe = fresh_sd1_pipe
    pipe.unet.to(torch.bfloat16)  # text encoder and VAE stay float32, as with a bf16 U-Net in training
    computed = {}  # the dtype each part computed in, from its last layer's output
    hooks = [module.register_forward_hook(lambda m, i, out, name=name: computed.__setitem__(name, out.dtype))
             for name, module in (("unet", pipe.unet.conv_out), ("vae", pipe.vae.decoder.conv_out))]
    try:
        cells, _ = generate_images(pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,)))
    finally:
        for hook in hooks:
            hook.remove()
    assert cells[0][0].size == (32, 32) and pixels(cells[0][0]).std() > 0
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float32
    # The VAE decodes in its own float32, outside the autocast (SDXL's VAE is kept fp32 because fp16 overflows it).
    assert computed == {"unet": torch.bfloat16, "vae": torch.float32}
    assert "decode" not in vars(pipe.vae)  # the wrapper is gone again


def test_a_16_bit_vae_decodes_fp32_latents_from_a_unet_wrapped_by_accelerate(fresh_sd1_pipe):
    # accelerate's mixed precision wraps the U-Net's forward so that its outputs come back in fp32; with every
    # module in bf16 the denoised latents reached the bf16 VAE in fp32 and decoding failed on the dtypes.
    pipe = fresh_sd1_pipe
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.to(torch.bfloat16)
    forward = pipe.unet.forward

    def as_accelerate_prepares_it(*args, **kwargs):  # Accelerator(mixed_precision="bf16").prepare(unet)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return tuple(t.float() for t in out) if isinstance(out, tuple) else out

    pipe.unet.forward = as_accelerate_prepares_it
    decoded = {}
    vae_hook = pipe.vae.decoder.conv_out.register_forward_hook(lambda m, i, out: decoded.__setitem__("dtype", out.dtype))
    try:
        cells, _ = generate_images(pipe, [CIRCLE], SampleSettings(32, 32, steps=2, seeds=(0,)))
    finally:
        del pipe.unet.forward
        vae_hook.remove()
    assert cells[0][0].size == (32, 32) and pixels(cells[0][0]).std() > 0
    assert decoded == {"dtype": torch.bfloat16}  # in the VAE's own dtype
    assert "decode" not in vars(pipe.vae)


def test_stop_is_asked_after_every_denoising_step(sd1_pipe):
    """A Ctrl-C during a sample grid used to wait for the whole grid (minutes with many steps and seeds)."""
    asked, unet_calls = [], []
    modes = [m.training for m in sd1_pipe.unet.modules()]
    hook = sd1_pipe.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    try:
        with pytest.raises(SamplingStopped):
            generate_images(sd1_pipe, [CIRCLE, SQUARE], SampleSettings(32, 32, steps=10, seeds=(0, 1)),
                            stop=lambda: asked.append(1) or len(asked) >= 3)
    finally:
        hook.remove()
    assert len(asked) == 3 and len(unet_calls) == 3  # three denoising steps of the first image, not 40
    assert [m.training for m in sd1_pipe.unet.modules()] == modes  # restored on the way out
    cells, _ = generate_images(sd1_pipe, [CIRCLE], FAST, stop=lambda: False)
    assert len(cells[0]) == 2


def test_settings_validation():
    assert SampleSettings(32, 32, seeds=[5, 6]).seeds == (5, 6)
    for bad in (dict(seeds=()), dict(seeds=(-1,)), dict(steps=0), dict(cfg=-1.0), dict(width=0)):
        with pytest.raises(ValueError):
            SampleSettings(**{"width": 32, "height": 32, **bad})


def test_save_grid_writes_a_png_atomically(tmp_path):
    image = Image.new("RGB", (20, 10), (1, 2, 3))
    path = save_grid(image, tmp_path / "samples" / "step_000100.png", metadata={"sampler": "ddim", "note": "café"})
    assert path == tmp_path / "samples" / "step_000100.png"
    assert [p.name for p in path.parent.iterdir()] == ["step_000100.png"]  # no temporary file left behind
    with Image.open(path) as loaded:
        assert loaded.format == "PNG"
        assert np.array_equal(pixels(loaded.convert("RGB")), pixels(image))
        assert json.loads(loaded.text["sd_lora"]) == {"sampler": "ddim", "note": "café"}
    save_grid(Image.new("RGB", (4, 4)), path)  # overwrites
    with Image.open(path) as loaded:
        assert loaded.size == (4, 4) and "sd_lora" not in loaded.text


def test_clip_skip_changes_samples_and_matches_training_encoding(sd1_pipe):
    """clip_skip > 1 conditions on the same hidden state training uses (kohya numbering)."""
    from sd_lora.sampling.prompts import SamplePrompt
    from sd_lora.sampling.sampler import SampleSettings, generate_images

    prompts = [SamplePrompt("zkchar, a red circle")]
    base = SampleSettings(width=32, height=32, steps=2, seeds=(0,))
    skip1, _ = generate_images(sd1_pipe, prompts, base)
    skip2, _ = generate_images(sd1_pipe, prompts, SampleSettings(width=32, height=32, steps=2, seeds=(0,), clip_skip=2))
    again, _ = generate_images(sd1_pipe, prompts, SampleSettings(width=32, height=32, steps=2, seeds=(0,), clip_skip=2))
    a, b, c = (np.asarray(x[0][0], dtype=np.int16) for x in (skip1, skip2, again))
    assert np.abs(a - b).max() > 0  # a different conditioning layer gives a different image
    assert np.array_equal(b, c)  # and it is deterministic


def test_readme_lists_every_sampler():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"`--sample-sampler {'|'.join(SAMPLERS)}`" in readme


def _long_prompt(tokenizer, tail: str) -> str:
    """A prompt whose first 75 tokens are fixed and whose `tail` comes after them (within 150 tokens)."""
    head = "zkchar, " + ", ".join(f"tag {i}" for i in range(12))
    n = len(tokenizer(head).input_ids) - 2
    assert 40 < n < 75
    head += ", " + "a " * (75 - n - 1)  # "," and each "a " are one token: the head fills the first window exactly
    assert len(tokenizer(head).input_ids) - 2 == 75
    return head + tail


def test_long_prompts_sample_with_the_conditioning_training_uses(sd1_pipe):
    """With --max-token-length 150 the words after token 75 change the samples, and the prompt is encoded by
    the training `Conditioner`; without it they are cut, as before."""
    from sd_lora.models.conditioning import Conditioner
    from sd_lora.sampling.sampler import _text_conditioning

    red, blue = (SamplePrompt(_long_prompt(sd1_pipe.tokenizer, f", a {c} circle")) for c in ("red", "blue"))
    at = {n: SampleSettings(width=32, height=32, steps=2, seeds=(0,), max_token_length=n) for n in (None, 150)}
    cut = [generate_images(sd1_pipe, [p], at[None])[0][0][0] for p in (red, blue)]
    read = [generate_images(sd1_pipe, [p], at[150])[0][0][0] for p in (red, blue)]
    assert np.array_equal(pixels(cut[0]), pixels(cut[1]))  # the tails are cut: the same image
    assert np.abs(pixels(read[0]) - pixels(read[1])).max() > 0  # the tails are read
    kwargs = _text_conditioning(sd1_pipe, _Row.resolve(red, at[150]), 1, 150)
    with torch.no_grad():
        trained = Conditioner("sd1", [sd1_pipe.tokenizer], [sd1_pipe.text_encoder], max_tokens=150)([red.prompt, ""], {}, "cpu", torch.float32)
    assert kwargs["prompt_embeds"].shape == (1, 152, 32)
    assert torch.equal(torch.cat([kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"]]), trained["encoder_hidden_states"])


def test_sdxl_samples_long_prompts_with_pooled_embeddings_and_a_zero_or_given_negative():
    from sd_lora.models.tiny import build_tiny_sdxl_pipeline
    from sd_lora.sampling.sampler import _text_conditioning

    tiny = build_tiny_sdxl_pipeline()
    pipe = build_sampling_pipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
                                   scheduler_config=tiny.scheduler.config, sampler="euler", text_encoder_2=tiny.text_encoder_2,
                                   tokenizer_2=tiny.tokenizer_2)
    prompt = SamplePrompt(_long_prompt(pipe.tokenizer, ", a red circle"))
    settings = SampleSettings(width=32, height=32, steps=1, seeds=(0,), sampler="euler", max_token_length=150)
    kwargs = _text_conditioning(pipe, _Row.resolve(prompt, settings), 1, 150)
    assert kwargs["prompt_embeds"].shape == (1, 152, 32 + 48) and kwargs["pooled_prompt_embeds"].shape == (1, 32)
    assert "negative_prompt_embeds" not in kwargs  # the pipeline zeroes the unguided half, as for prompt strings
    with_negative = _text_conditioning(pipe, _Row.resolve(SamplePrompt(prompt.prompt, negative="blurry"), settings), 2, 150)
    assert with_negative["negative_prompt_embeds"].shape == (1, 152, 32 + 48)
    assert with_negative["negative_pooled_prompt_embeds"].shape == (1, 32)
    cells, _ = generate_images(pipe, [prompt, SamplePrompt(prompt.prompt, negative="blurry")], settings)
    assert [c[0].size for c in cells] == [(32, 32), (32, 32)]


def _pipeline_own_encoding(pipe, prompt: str, negative: str | None, cfg: float, size: int = 32, steps: int = 2, **kwargs):
    """The image the pipeline draws when it encodes the prompt strings itself (seed 0)."""
    from sd_lora.sampling.sampler import _sampling_modes

    with _sampling_modes(pipe):
        out = pipe(prompt=prompt, negative_prompt=negative, width=size, height=size, num_inference_steps=steps,
                   guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(0), output_type="pil", **kwargs)
    return pixels(out.images[0])


@pytest.mark.parametrize("negative, cfg", [("", 7.5), ("a blue square", 7.5), ("", 1.0)])
def test_prompts_encoded_ahead_draw_what_the_pipeline_draws_from_strings(fresh_sd1_pipe, negative, cfg):
    """encode_prompts' tensors give the pipeline's own images bit for bit, and with them the grid runs no
    text encoder: a run can encode its sample prompts once and let frozen text encoders go."""
    from sd_lora.sampling.sampler import encode_prompts

    pipe = fresh_sd1_pipe
    prompts = [SamplePrompt("a red circle", negative=negative)]
    settings = SampleSettings(width=32, height=32, steps=2, seeds=(0,), cfg=cfg)
    conditioning = encode_prompts(pipe, prompts, settings)
    assert set(conditioning[0]) == {"prompt_embeds", "negative_prompt_embeds"}
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        cells, _ = generate_images(pipe, prompts, settings, conditioning=conditioning)
    finally:
        hook.remove()
    assert calls == []
    assert np.array_equal(pixels(cells[0][0]), _pipeline_own_encoding(pipe, "a red circle", negative or None, cfg))
    encoded_here, _ = generate_images(pipe, prompts, settings)  # without: encoded once per prompt, same image
    assert np.array_equal(pixels(encoded_here[0][0]), pixels(cells[0][0]))
    with pytest.raises(ValueError, match="conditioning for 1 prompts given for 2 prompts"):
        generate_images(pipe, [CIRCLE, SQUARE], settings, conditioning=conditioning)


@pytest.mark.parametrize("negative, clip_skip", [("", 1), ("blurry", 1), ("", 2)])
def test_sdxl_prompts_encoded_ahead_draw_what_the_pipeline_draws_from_strings(negative, clip_skip):
    from sd_lora.models.tiny import build_tiny_sdxl_pipeline
    from sd_lora.sampling.sampler import encode_prompts

    tiny = build_tiny_sdxl_pipeline()
    pipe = build_sampling_pipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
                                   scheduler_config=tiny.scheduler.config, sampler="euler", text_encoder_2=tiny.text_encoder_2,
                                   tokenizer_2=tiny.tokenizer_2)
    prompts = [SamplePrompt("a red circle", negative=negative)]
    settings = SampleSettings(width=32, height=32, steps=2, seeds=(0,), sampler="euler", clip_skip=clip_skip)
    conditioning = encode_prompts(pipe, prompts, settings)
    cells, _ = generate_images(pipe, prompts, settings, conditioning=conditioning)
    own = _pipeline_own_encoding(pipe, "a red circle", negative or None, 7.5, clip_skip=clip_skip - 1 or None)
    assert np.array_equal(pixels(cells[0][0]), own)
    if not negative:  # the unguided half is conditioned on zeros, as the pipeline does for an empty negative
        assert not conditioning[0]["negative_prompt_embeds"].any() and not conditioning[0]["negative_pooled_prompt_embeds"].any()


def test_the_zero_snr_samplers_are_those_whose_scheduler_rescales_its_betas():
    """samplers.ZERO_SNR_SAMPLERS (pure data, checked before the model loads) follows diffusers."""
    import inspect

    import diffusers

    from sd_lora.sampling.samplers import SAMPLERS, ZERO_SNR_SAMPLERS

    rescales = {name for name, (cls, _) in SAMPLERS.items()
                if "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, cls).__init__).parameters}
    assert set(ZERO_SNR_SAMPLERS) == rescales == {"ddim", "euler", "euler_a", "dpmsolver++", "unipc"}
