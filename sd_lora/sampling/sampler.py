"""Sample images from the model being trained and lay them out as a grid.

The sampling pipeline wraps the LIVE training modules (with their LoRA layers), so a grid shows exactly what
the current weights do; nothing is copied. Each image gets its own CPU generator seeded with its seed, so an
image depends only on (weights, prompt, size, steps, cfg, sampler, seed): not on the order of the prompts,
on the other prompts, on the device's RNG, or on how many images were drawn before. Sampling never touches
the global torch RNG, so it does not change the training run's noise either.

SD1.x/SD2.x sample through `StableDiffusionPipeline`, SDXL through `StableDiffusionXLPipeline`. The pipeline
gets each prompt's text conditioning as tensors (`encode_prompts`): computed once per prompt, and, while the
text encoders are frozen, once per run, after which they need not stay in memory.
"""

from __future__ import annotations

import io
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image, PngImagePlugin

from sd_lora.fsio import atomic_write_bytes
from sd_lora.precision import call_vae
from sd_lora.sampling.grid import make_grid
from sd_lora.sampling.prompts import SIZE_STEP, SamplePrompt, shown
from sd_lora.sampling.samplers import SAMPLERS, canonical_sampler

@dataclass(frozen=True)
class SampleSettings:
    """Defaults for every sample prompt; a prompt's own --w/--h/--s/--l/--n/--d override them."""

    width: int
    height: int
    steps: int = 20
    cfg: float = 7.5
    seeds: tuple[int, ...] = (0, 1)
    """One grid column per seed."""
    negative: str = ""
    sampler: str = "ddim"
    """A `samplers.NAMES` name; a prompt's --ss overrides it for its row."""
    clip_skip: int = 1
    """Text-encoder layer from the end, as in training (kohya convention: 2 = penultimate)."""
    max_token_length: int | None = None
    """Prompt tokens read in 75-token windows, as in training (None or 75: the first 75; 150, 225)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        canonical_sampler(self.sampler)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive, got {self.width}x{self.height}")
        if self.clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {self.clip_skip}")
        if self.max_token_length is not None and (self.max_token_length <= 0 or self.max_token_length % 75):
            raise ValueError(f"max_token_length must be 75, 150 or 225 (75 tokens per window), got {self.max_token_length}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be one or more non-negative integers, got {self.seeds}")


def make_scheduler(sampler: str, scheduler_config):
    """A fresh inference scheduler for `sampler` (a `samplers.NAMES` name), configured from `scheduler_config`
    (a scheduler's `.config`): the model's prediction type, betas and timestep spacing carry over."""
    import diffusers

    class_name, overrides = SAMPLERS[canonical_sampler(sampler)]
    # Another sampler's overrides must not ride along (a DDIM built from a pndm config kept its skip_prk_steps,
    # from a dpmsolver++ one its algorithm_type): the config is the model's, less every key some sampler sets.
    model_config = {k: v for k, v in dict(scheduler_config).items() if k not in _SAMPLER_KEYS}
    return getattr(diffusers, class_name).from_config(model_config, **overrides)


_SAMPLER_KEYS = {key for _, overrides in SAMPLERS.values() for key in overrides}


def _is_sampler(scheduler, sampler: str) -> bool:
    class_name, overrides = SAMPLERS[canonical_sampler(sampler)]
    return type(scheduler).__name__ == class_name and all(
        scheduler.config.get(k) == v for k, v in overrides.items()
    )


def build_sampling_pipeline(*, vae, text_encoder, tokenizer, unet, scheduler_config, sampler: str,
                            text_encoder_2=None, tokenizer_2=None):
    """A `StableDiffusionPipeline` (or, with `tokenizer_2`, a `StableDiffusionXLPipeline`) around the live
    modules (no copies: LoRA layers and later weight updates show up in the samples). Pass unwrapped modules
    (`accelerator.unwrap_model`), all on one device. `scheduler_config` is the training scheduler's `.config`.
    Text encoders may be None when every prompt comes encoded (`encode_prompts`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if tokenizer_2 is not None:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=make_scheduler(sampler, scheduler_config),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(sampler, scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class _Row:
    """One prompt with the settings filled in: exactly what gets sampled."""

    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    cfg: float
    seeds: tuple[int, ...]
    sampler: str

    @classmethod
    def resolve(cls, p: SamplePrompt, s: SampleSettings) -> _Row:
        return cls(
            prompt=p.prompt,
            negative=p.negative or s.negative,  # an empty/absent --n keeps the default negative
            width=p.width if p.width is not None else s.width,
            height=p.height if p.height is not None else s.height,
            steps=p.steps if p.steps is not None else s.steps,
            cfg=p.cfg if p.cfg is not None else s.cfg,
            # kohya-like: a prompt's --d seeds its first column, the next columns count up from it
            seeds=tuple(p.seed + i for i in range(len(s.seeds))) if p.seed is not None else s.seeds,
            sampler=p.sampler or s.sampler,
        )

    def label(self, s: SampleSettings) -> str:
        """The prompt, plus whatever this row does differently from the column headers and the title."""
        notes = []
        if (self.width, self.height) != (s.width, s.height):
            notes.append(f"{self.width}x{self.height}")
        if self.steps != s.steps:
            notes.append(f"{self.steps} steps")
        if self.cfg != s.cfg:
            notes.append(f"cfg {self.cfg:g}")
        if self.seeds != s.seeds:
            notes.append(f"seeds {', '.join(map(str, self.seeds))}")
        if canonical_sampler(self.sampler) != canonical_sampler(s.sampler):
            notes.append(self.sampler)
        return f"{shown(self.prompt)} [{'; '.join(notes)}]" if notes else shown(self.prompt)


class SamplingStopped(Exception):
    """`stop()` said so between two denoising steps: the images are abandoned."""


def encode_prompts(pipe, prompts: list[SamplePrompt], settings: SampleSettings) -> list[dict]:
    """Each prompt's text conditioning (its negative prompt's too), as the pipeline call's tensor arguments
    (`prompt_embeds`, ...), computed as `generate_images` would compute them. With frozen text encoders these
    never change, so a run encodes its sample prompts once and can then let the text encoders go."""
    rows = [_Row.resolve(p, settings) for p in prompts]
    with _sampling_modes(pipe):
        return [_text_conditioning(pipe, row, settings.clip_skip, settings.max_token_length) for row in rows]


def generate_images(
    pipe, prompts: list[SamplePrompt], settings: SampleSettings, *, stop: Callable[[], bool] | None = None,
    conditioning: list[dict] | None = None,
) -> tuple[list[list[Image.Image]], list[dict]]:
    """Sample `cells[row][col]` (one row per prompt, one column per seed) at their own sizes, and a log
    entry per row. Switches `pipe.scheduler` to each row's sampler (its --ss, else `settings.sampler`). `stop` is
    asked after every denoising step; when it returns True, SamplingStopped is raised (a Ctrl-C is not kept
    waiting for a whole grid). `conditioning` is `encode_prompts`' result for these prompts and settings; without
    it each prompt is encoded here, once for all its seeds."""
    if not prompts:
        raise ValueError("no sample prompts")
    if conditioning is not None and len(conditioning) != len(prompts):
        raise ValueError(f"conditioning for {len(conditioning)} prompts given for {len(prompts)} prompts")
    rows = [_Row.resolve(p, settings) for p in prompts]
    bad = [f"row {i}: {r.width}x{r.height}" for i, r in enumerate(rows) if r.width % SIZE_STEP or r.height % SIZE_STEP]
    if bad:  # fail before sampling anything; callers should have checked with prompts.validate_size
        raise ValueError(f"sample sizes must be multiples of {SIZE_STEP}: {'; '.join(bad)}")

    pipe.set_progress_bar_config(disable=True)

    def check_stop(pipe, step, timestep, tensors):  # diffusers' callback_on_step_end
        if stop is not None and stop():
            raise SamplingStopped
        return tensors

    cells: list[list[Image.Image]] = []
    with _sampling_modes(pipe):
        if conditioning is None:
            conditioning = [_text_conditioning(pipe, row, settings.clip_skip, settings.max_token_length) for row in rows]
        for row, text in zip(rows, conditioning):
            if not _is_sampler(pipe.scheduler, row.sampler):  # the settings' sampler, or the row's --ss
                pipe.scheduler = make_scheduler(row.sampler, pipe.scheduler.config)
            images = []
            for seed in row.seeds:
                out = pipe(
                    **text,
                    width=row.width,
                    height=row.height,
                    num_inference_steps=row.steps,
                    guidance_scale=row.cfg,
                    num_images_per_prompt=1,
                    # Per image, on the CPU: same image whatever the device, order or batch. The pipeline
                    # draws the latents with it and moves them to the model's device.
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="pil",
                    callback_on_step_end=check_stop,
                )
                images.append(out.images[0])
            cells.append(images)
    return cells, [{**asdict(r), "seeds": list(r.seeds)} for r in rows]


def _text_conditioning(pipe, row: _Row, clip_skip: int, max_tokens: int | None = None) -> dict:
    """The pipeline call's prompt arguments for `row`, as tensors (the pipeline then runs no text encoder).

    The pipeline's own `encode_prompt` computes them, with the arguments its call would pass it for the prompt
    strings, except with clip_skip > 1 (SD1/SD2) or long prompts (`max_tokens` 150, 225): those are computed
    exactly as training computes them (`Conditioner`), because diffusers' own `clip_skip` counts differently
    (1 = penultimate) and reaches for `text_encoder.text_model`, which transformers >= 5.6 no longer has on
    `CLIPTextModel`, and its pipelines cut prompts at 77 tokens.
    """
    from sd_lora.models.conditioning import Conditioner, batch_for_text_only
    from sd_lora.models.text import window_count

    sdxl = getattr(pipe, "tokenizer_2", None) is not None
    long = window_count(pipe.tokenizer, max_tokens) > 1
    device = pipe._execution_device
    negative = row.negative or None
    if sdxl and not long:  # the SDXL pipeline's clip_skip counts from the penultimate layer
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            row.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative, clip_skip=clip_skip - 1 or None)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds,
                "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    if clip_skip == 1 and not long:
        embeds, negative_embeds = pipe.encode_prompt(row.prompt, device, 1, True, negative)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    conditioner = Conditioner("sdxl" if sdxl else "sd", tokenizers, encoders, clip_skip, max_tokens=max_tokens)
    device = next(pipe.text_encoder.parameters()).device
    cond = conditioner([row.prompt, row.negative], batch_for_text_only(2), device, torch.float32)
    embeds = cond["encoder_hidden_states"]  # (2, 77 or 75k + 2, D): the prompt, the negative prompt
    if not sdxl:
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}
    pooled = cond["added_cond_kwargs"]["text_embeds"]
    out = {"prompt_embeds": embeds[:1], "pooled_prompt_embeds": pooled[:1]}
    if row.negative or not pipe.config.force_zeros_for_empty_prompt:
        out |= {"negative_prompt_embeds": embeds[1:], "negative_pooled_prompt_embeds": pooled[1:]}
    # else the SDXL pipeline conditions the unguided half on zeros, as it does for prompt strings
    return out


def row_labels(prompts: list[SamplePrompt], settings: SampleSettings) -> list[str]:
    """Each prompt's row label in a grid: the prompt, plus what its row draws differently from the column headers
    (`seed N` of `settings.seeds`) and the title: its own size, steps, cfg, seeds (--d) or sampler."""
    return [_Row.resolve(p, settings).label(settings) for p in prompts]


def generate_grid(
    pipe, prompts: list[SamplePrompt], settings: SampleSettings, *, title: str = "", cells_out: list | None = None,
    stop: Callable[[], bool] | None = None, conditioning: list[dict] | None = None,
) -> tuple[Image.Image, dict]:
    """Sample every prompt (row) with every seed (column) and return the grid and a log dict:
    `sampler, scheduler, prediction_type, steps, cfg, seeds, negative, seconds` and `rows` (per row: prompt,
    negative, width, height, steps, cfg, seeds).

    Sharp edges: modules are in eval mode while sampling and get each submodule's previous train/eval flag
    back afterwards, even on error; `pipe.scheduler` is replaced by each row's sampler; the
    pipeline's progress bar is turned off.
    """
    start = time.perf_counter()
    cells, log_rows = generate_images(pipe, prompts, settings, stop=stop, conditioning=conditioning)
    if cells_out is not None:  # the caller keeps the images too (e.g. to compare runs without resampling)
        cells_out[:] = cells
    grid = make_grid(
        cells,
        row_labels=row_labels(prompts, settings),
        col_labels=[f"seed {s}" for s in settings.seeds],
        title=title,
    )
    log = {
        "sampler": settings.sampler,
        "scheduler": SAMPLERS[canonical_sampler(settings.sampler)][0],  # rows with their own --ss say so
        "prediction_type": pipe.scheduler.config.get("prediction_type"),
        "steps": settings.steps,
        "cfg": settings.cfg,
        "seeds": list(settings.seeds),
        "negative": settings.negative,
        "rows": log_rows,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return grid, log


def save_grid(image: Image.Image, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write `image` as a PNG, atomically. `metadata` (e.g. generate_grid's log) is stored as JSON in the
    PNG text chunk "sd_lora"."""
    info = None
    if metadata is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("sd_lora", json.dumps(metadata, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def _sampling_modes(pipe) -> Iterator[None]:
    """No gradients, every module in eval mode, autocast where the modules' dtypes differ, and the VAE decoding
    in its own dtype."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    with torch.no_grad(), _eval_mode(modules), _autocast_if_mixed(pipe), _decode_in_vae_dtype(pipe.vae):
        yield


@contextmanager
def _eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """eval() for the duration; then every submodule gets its own previous `training` flag back (not just
    the top module's: `.train(flag)` would flatten mixed train/eval states)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


@contextmanager
def _autocast_if_mixed(pipe) -> Iterator[None]:
    """Autocast to the 16-bit dtype when the modules' dtypes differ (e.g. a bf16 U-Net with an fp32 text
    encoder). The pipeline feeds the text encoder's dtype to the U-Net, which fails on mixed dtypes without it.
    With one dtype everywhere, nothing changes."""
    modules = [pipe.components.get(name) for name in ("unet", "text_encoder", "vae")]
    dtypes = {m.dtype for m in modules if m is not None}
    low = [d for d in (pipe.unet.dtype, *dtypes) if d in (torch.float16, torch.bfloat16)]
    if len(dtypes) <= 1 or not low:
        yield
        return
    with torch.autocast(device_type=pipe.unet.device.type, dtype=low[0]):
        yield


@contextmanager
def _decode_in_vae_dtype(vae) -> Iterator[None]:
    """The pipeline hands the VAE the latents in the dtype denoising ended in: fp32 when accelerate's mixed
    precision wraps the U-Net (it converts the U-Net's outputs to fp32), 16-bit under autocast. The VAE decodes
    them in its own dtype, outside any autocast (`precision.call_vae`; SDXL's VAE is kept in fp32 under fp16).
    A hack: `vae.decode` is wrapped for the duration."""
    decode = vae.decode

    def decode_in_own_dtype(latents, *args, **kwargs):
        return call_vae(decode, latents, *args, **kwargs)

    vae.decode = decode_in_own_dtype
    try:
        yield
    finally:
        del vae.decode  # the class's own method again
