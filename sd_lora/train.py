"""`python -m sd_lora.train`: build everything a run needs, then hand it to the loop.

Order matters and is the user-visible contract: validate every option (before any model loads), load the
model, scan and check every image, inject LoRA, cache latents, print a summary, then train. Outputs go to
`--output-dir`: `<name>.safetensors`, `<name>-stepNNNNNNNN.safetensors`, `config.toml`, `metrics.jsonl`,
`samples/*.png`. Only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import loop
from .config import TrainConfig, load_config
from .data import DataOptions, ImageDataset, BucketBatchSampler, build_latent_cache, collate, dataset_metadata, scan_dataset
from .errors import UserError
from .export import export_lora, lora_components, training_metadata
from .fsio import atomic_write_text
from .lora.inject import inject_lora, trainable_parameters
from .lora.targets import text_encoder_target_modules, unet_target_modules
from .models.load import BaseModel, load_base_model
from .optim import build_lr_scheduler, build_optimizer
from .sampling.prompts import default_prompts, read_prompt_file, validate_size
from .sampling.sampler import SIZE_STEP, SampleSettings, build_sampling_pipeline, generate_grid, save_grid

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_EPOCHS = 10


# --- set-up --------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use --mixed-precision bf16 or no")
    from accelerate.state import AcceleratorState, PartialState

    # Hack: accelerate keeps one process-wide state and refuses a second Accelerator with another
    # mixed precision. A notebook (or test) that trains twice in one process needs a fresh one; reset
    # it only in single-process runs, where no other rank shares that state.
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps)


def resolve_defaults(config: TrainConfig, model: BaseModel) -> TrainConfig:
    """Fill the options whose default depends on the model or data; check them against the model."""
    resolution = config.resolution or model.native_resolution
    step = model.pixel_step
    problems = []
    if resolution % step:
        problems.append(f"--resolution {resolution} must be a multiple of {step} px for this model (e.g. {max(step, resolution // step * step)})")
    min_side = config.min_bucket_side or max(step, resolution // 2 // step * step)
    max_side = config.max_bucket_side or resolution * 2
    for flag, value in (("--min-bucket-side", config.min_bucket_side), ("--max-bucket-side", config.max_bucket_side)):
        if value is not None and value % step:
            problems.append(f"{flag} {value} must be a multiple of {step} px for this model")
    if config.sample_every and resolution % SIZE_STEP:
        problems.append(f"--resolution {resolution}: sample grids need a multiple of {SIZE_STEP} px; change it or pass --sample-every 0")
    if problems:
        raise UserError("\n".join(problems))
    return dataclasses.replace(
        config,
        resolution=resolution,
        min_bucket_side=min_side,
        max_bucket_side=max_side,
        output_name=config.output_name or config.data.resolve().name,
        prediction_type=model.prediction_type,
        model=model.name,
        cache_latents=config.use_latent_cache,
    )


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sd_lora_write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output-dir {path}: cannot write there ({e.strerror}); choose a writable folder") from None


def prepare_models(config: TrainConfig, model: BaseModel, device: torch.device, weight_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Freeze the base, inject LoRA where the preset says, cast and place; returns the trainable parameters."""
    for module in (model.unet, model.vae, model.text_encoder):
        module.requires_grad_(False)
        module.to(device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    if config.xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError("--xformers needs the xformers package: pip install 'sd_lora[xformers]' (CUDA GPUs), or drop --xformers to use PyTorch SDPA") from None
        model.unet.enable_xformers_memory_efficient_attention()
    # LoRA parameters are created and kept in fp32 whatever the base dtype.
    inject_lora(model.unet, unet_target_modules(model.unet, config.targets), rank=config.rank, alpha=config.effective_alpha, dropout=config.lora_dropout)
    if config.train_text_encoder:
        inject_lora(model.text_encoder, text_encoder_target_modules(model.text_encoder), rank=config.rank, alpha=config.effective_alpha, dropout=config.lora_dropout)
    model.unet.to(device)
    model.text_encoder.to(device)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            model.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.unet.train()
    model.text_encoder.train(config.train_text_encoder)
    model.vae.eval()
    return trainable_parameters(model.unet) + (trainable_parameters(model.text_encoder) if config.train_text_encoder else [])


def sample_prompts(config: TrainConfig, captions: list[str]):
    """Prompts for the grids, with per-line sizes checked before training starts."""
    if not config.sample_prompts:
        return default_prompts(captions)
    prompts = read_prompt_file(config.sample_prompts)
    for i, prompt in enumerate(prompts):
        validate_size(prompt, SIZE_STEP, f"{config.sample_prompts} (prompt {i + 1})")
    return prompts


# --- outputs --------------------------------------------------------------------------------------------


class RunOutputs:
    """Side effects of a run: progress bar, metrics.jsonl, sample grids and LoRA files (main process only)."""

    def __init__(self, config: TrainConfig, model: BaseModel, accelerator, dataset_meta: dict, prompts, total_steps: int):
        from tqdm.auto import tqdm

        self.config, self.model, self.acc = config, model, accelerator
        self.dataset_meta, self.prompts = dataset_meta, prompts
        self.main = accelerator.is_main_process
        self.started_at = time.time()
        self.out = config.output_dir
        self.smoothed: float | None = None
        self.state: loop.TrainState | None = None
        self.progress = tqdm(total=total_steps, desc="training", unit="step", disable=not self.main, dynamic_ncols=True)
        self.total_steps = total_steps
        self.saved: list[Path] = []
        self.grids: list[Path] = []
        if self.main:
            atomic_write_text(self.out / "config.toml", config.to_toml())
            self.metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8", buffering=1)

    def unwrapped(self):
        unet = self.acc.unwrap_model(self.model.unet)
        te = self.acc.unwrap_model(self.model.text_encoder)
        return unet, te

    def on_step_end(self, state: loop.TrainState, loss: float, lr: float, seconds: float) -> None:
        self.state = state
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        if self.main:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{self.smoothed:.4f}", lr=f"{lr:.2e}", s_it=f"{seconds:.2f}")
            record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr, "elapsed": round(time.time() - self.started_at, 3)}
            self.metrics.write(json.dumps(record) + "\n")
        c = self.config
        if c.sample_every and state.step % c.sample_every == 0 and state.step < self.total_steps:
            self.sample(state.step)
        if c.save_every and state.step % c.save_every == 0 and state.step < self.total_steps:
            self.save(self.out / f"{c.output_name}-step{state.step:08d}.safetensors", state)

    def sample(self, step: int) -> None:
        if not self.main or not self.config.sample_every:
            return
        c = self.config
        unet, te = self.unwrapped()
        pipe = build_sampling_pipeline(
            vae=self.model.vae, text_encoder=te, tokenizer=self.model.tokenizer, unet=unet,
            scheduler_config=self.model.scheduler_config, sampler=c.sample_sampler,
        )
        settings = SampleSettings(
            width=c.resolution, height=c.resolution, steps=c.sample_steps, cfg=c.sample_cfg,
            seeds=tuple(range(c.sample_seeds)), sampler=c.sample_sampler, clip_skip=c.clip_skip,
        )
        grid, log = generate_grid(pipe, self.prompts, settings, title=f"{c.output_name} - step {step}")
        path = save_grid(grid, self.out / "samples" / f"{c.output_name}-step{step:08d}.png")
        self.grids.append(path)
        self.progress.write(f"samples: {path} ({json.dumps(log, default=str)})")

    def save(self, path: Path, state: loop.TrainState) -> Path | None:
        if not self.main:
            return None
        unet, te = self.unwrapped()
        components = lora_components(unet, te if self.config.train_text_encoder else None)
        meta = training_metadata(
            self.config, family=self.model.family, prediction_type=self.model.prediction_type,
            dataset_metadata=self.dataset_meta, started_at=self.started_at, step=state.step, epoch=state.epoch,
        )
        export_lora(path, components, meta, self.config.save_precision)
        self.saved.append(path)
        self.progress.write(f"saved {path}")
        return path

    def close(self) -> None:
        self.progress.close()
        if self.main:
            self.metrics.close()


# --- the run --------------------------------------------------------------------------------------------


def summary(config: TrainConfig, scan, dataset: ImageDataset, batches: int, steps_per_epoch: int, total_steps: int, epochs: int, n_params: int, model: BaseModel) -> str:
    bytes_per = {"fp32": 4, "fp16": 2, "bf16": 2}[config.save_precision]
    repeats = sum(r.repeats for r in scan.records)
    buckets = dataset.bucket_counts()
    bucket_text = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items(), key=lambda kv: -kv[1])[:8])
    if len(buckets) > 8:
        bucket_text += f", ... ({len(buckets)} buckets)"
    lines = [
        f"model: {model.name} ({model.family}, {model.prediction_type}, native {model.native_resolution}px)",
        f"images: {len(scan.records)} ({repeats} per epoch with repeats), skipped: {len(scan.skipped)}",
        f"buckets: {bucket_text}",
        f"batch size: {config.batch_size} x {config.gradient_accumulation_steps} accumulation; {batches} batches/epoch",
        f"steps per epoch: {steps_per_epoch}, total steps: {total_steps} ({epochs} epochs)",
        f"LoRA: rank {config.rank}, alpha {config.effective_alpha:g}, targets {config.targets}"
        + (" + text encoder" if config.train_text_encoder else ""),
        f"trainable parameters: {n_params:,}; expected file size: {n_params * bytes_per / 2**20:.2f} MiB ({config.save_precision})",
        f"latent cache: {'on' if config.cache_latents else 'off'}; mixed precision: {config.mixed_precision}",
    ]
    return "\n".join(lines)


@dataclasses.dataclass
class TrainResult:
    path: Path  # the final .safetensors
    config: TrainConfig  # resolved
    state: loop.TrainState
    unet: torch.nn.Module  # trained, with LoRA layers (unwrapped)
    text_encoder: torch.nn.Module
    outputs: RunOutputs


def run(config: TrainConfig) -> TrainResult:
    """Train one LoRA and write its files; returns them and the trained modules."""
    accelerator = make_accelerator(config)
    if config.model is None:
        raise UserError(
            "--model is required for now: pass a Hugging Face id or a local diffusers folder of an SD1.x/SD2.x model. "
            "(A built-in demo base model is planned; `python -m sd_lora.models.tiny DIR` builds a tiny test model.)"
        )
    model = load_base_model(config.model, prediction_type=config.prediction_type)
    config = resolve_defaults(config, model)
    check_output_dir(config.output_dir)

    scan = scan_dataset(config.data, caption_extension=config.caption_extension, skip_bad_images=config.skip_bad_images)
    for warning in scan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    options = DataOptions(
        resolution=config.resolution, step=model.pixel_step, min_bucket_side=config.min_bucket_side,
        max_bucket_side=config.max_bucket_side, buckets=config.buckets, no_upscale=config.no_upscale,
        random_crop=config.random_crop, flip=config.flip, shuffle_tags=config.shuffle_tags,
        keep_tokens=config.keep_tokens, caption_dropout=config.caption_dropout, seed=config.seed,
    )
    dataset = ImageDataset(scan.records, options)

    torch.manual_seed(config.seed)  # LoRA init (kaiming-uniform down projections) is seeded
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    trainable = prepare_models(config, model, accelerator.device, weight_dtype)
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)

    vae_scaling = float(model.vae.config.scaling_factor)
    if config.cache_latents:
        def encode(pixels: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return loop.encode_pixels(model.vae, pixels.to(accelerator.device, weight_dtype), vae_scaling, generator).float().cpu()
        dataset.latent_cache = build_latent_cache(dataset, encode, batch_size=config.batch_size, progress=accelerator.is_main_process)

    batch_sampler = BucketBatchSampler(dataset.bucket_of, [r.repeats for r in scan.records], config.batch_size, config.seed)
    dataloader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=config.num_workers)
    per_epoch = loop.steps_per_epoch(len(batch_sampler), config.gradient_accumulation_steps)
    total_steps = config.max_steps or per_epoch * (config.epochs or DEFAULT_EPOCHS)
    epochs = math.ceil(total_steps / per_epoch)
    if config.lr_warmup_steps > total_steps:
        raise UserError(f"--lr-warmup-steps {config.lr_warmup_steps} is longer than the run ({total_steps} steps)")

    unet_params = trainable_parameters(model.unet)
    groups = [{"params": unet_params, "lr": config.learning_rate}]
    if config.train_text_encoder:
        groups.append({"params": trainable_parameters(model.text_encoder), "lr": config.effective_text_encoder_lr})
    optimizer = build_optimizer(config.optimizer, groups, weight_decay=config.weight_decay, device=accelerator.device)
    lr_scheduler = build_lr_scheduler(config.lr_scheduler, optimizer, warmup_steps=config.lr_warmup_steps, total_steps=total_steps)

    if config.train_text_encoder:
        model.unet, model.text_encoder, optimizer, dataloader = accelerator.prepare(model.unet, model.text_encoder, optimizer, dataloader)
    else:
        model.unet, optimizer, dataloader = accelerator.prepare(model.unet, optimizer, dataloader)

    captions = [r.caption for r in scan.records]
    prompts = sample_prompts(config, captions)
    n_params = sum(p.numel() for p in trainable)
    if accelerator.is_main_process:
        print(summary(config, scan, dataset, len(batch_sampler), per_epoch, total_steps, epochs, n_params, model))

    outputs = RunOutputs(config, model, accelerator, dataset_metadata(scan.records), prompts, total_steps)
    trainee = loop.Trainee(
        accelerator=accelerator, unet=model.unet, text_encoder=model.text_encoder,
        vae=None if config.cache_latents else model.vae, tokenizer=model.tokenizer, dataloader=dataloader,
        batch_sampler=batch_sampler, optimizer=optimizer, lr_scheduler=lr_scheduler, trainable=trainable,
        train_text_encoder=config.train_text_encoder, weight_dtype=weight_dtype,
        max_grad_norm=config.max_grad_norm, generator=generator,
    )
    objective = loop.Objective(
        alphas_cumprod=model.alphas_cumprod.to(accelerator.device), num_train_timesteps=model.num_train_timesteps,
        prediction_type=model.prediction_type, vae_scaling_factor=vae_scaling, noise_offset=config.noise_offset,
        min_snr_gamma=config.min_snr_gamma, clip_skip=config.clip_skip,
    )
    state = loop.TrainState()
    final = config.output_dir / f"{config.output_name}.safetensors"
    try:
        outputs.sample(0)  # the untouched base: LoRA starts as an exact no-op
        state = loop.train(trainee, objective, state, max_steps=total_steps, hooks=outputs)
    except KeyboardInterrupt:
        partial = outputs.state or state
        path = outputs.save(config.output_dir / f"{config.output_name}-step{partial.step:08d}-interrupted.safetensors", partial)
        outputs.close()
        raise UserError(f"interrupted at step {partial.step}; the LoRA so far was saved to {path}") from None
    accelerator.wait_for_everyone()
    outputs.save(final, state)
    outputs.sample(state.step)
    outputs.close()
    if state.truncated_captions and accelerator.is_main_process:
        print(f"warning: {state.truncated_captions} captions were longer than {model.tokenizer.model_max_length} tokens and were truncated", file=sys.stderr)
    if accelerator.is_main_process:
        print(f"done: {final}")
    unet, text_encoder = outputs.unwrapped()
    return TrainResult(final, config, state, unet, text_encoder, outputs)


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        run(config)
    except UserError as e:
        print(f"sd_lora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
