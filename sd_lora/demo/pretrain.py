"""`python -m sd_lora.demo.pretrain`: train the demo base model from scratch on the toy world, on a CPU.

The model is a real Stable Diffusion 1.x architecture, only small: a CLIP text model and BPE tokenizer, an
`AutoencoderKL` that maps 64x64 pixels to 16x16x4 latents (4x down, where SD's is 8x), a
`UNet2DConditionModel` with cross-attention, and SD's DDPM scaled-linear noise schedule with epsilon
prediction. Two stages:

1. the VAE learns to reconstruct world scenes and random flat-coloured pictures (reconstruction + a small KL);
   its latent scaling factor is then measured, as SD's 0.18215 was;
2. the U-Net and the text encoder learn together, from scratch, to predict the noise added to the latents
   of freshly drawn world scenes given their captions (10% empty captions, for classifier-free guidance).
   The scenes' shapes in named colours teach composing words; their things (a house, a tree, a character:
   several coloured parts under one word) teach that one word can stand for a whole multi-part object, which
   is what a LoRA then teaches it about a new word such as zkchar.

Every draw is seeded, so a run is reproducible on one machine. The result is a diffusers folder
(safetensors) that `sd_lora.models.load.load_base_model` and `StableDiffusionPipeline` load.

    python -m sd_lora.demo.pretrain [--output sd_lora/demo/base_model] [--seed 0] [--quick]
"""

from __future__ import annotations

import os

# Hack: PyTorch's OpenMP threads busy-wait between operations. On a laptop or a shared machine where other
# processes want the same cores that spinning made every step 3-4x slower here; sleeping costs next to
# nothing when the cores are free. It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .. import diffusion  # noqa: E402
from ..models.text import encode_tokens, tokenize  # noqa: E402
from ..models.tiny import write_clip_tokenizer  # noqa: E402
from . import chars, world  # noqa: E402
from .defaults import BASE_MODEL_DIR  # noqa: E402

TEXT_ENCODER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
UNET = dict(
    sample_size=16,  # latent side: 64 px / 4
    in_channels=4,
    out_channels=4,
    block_out_channels=(48, 96, 96),
    layers_per_block=1,
    # SD1's layout: cross-attention at every level but the lowest.
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_ENCODER["hidden_size"],
    attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    norm_num_groups=8,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 64),  # three blocks: two 2x downsamples, 64 px -> 16x16 latents
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=world.RESOLUTION,
)
SCHEDULER = dict(  # SD1.5's training schedule
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    # Samplers start at t=999, not SD's 951: with few steps at 64 px that keeps backgrounds from the seed
    # (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    timestep_spacing="trailing",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 0
    # stage 1: VAE
    vae_steps: int = 3000
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    vae_crop: int = 32  # train on random crops (the VAE is convolutional): 4x cheaper per picture than 64 px, as SD's VAE trained at 256 px
    kl_weight: float = 1e-5  # per latent element, against a per-pixel reconstruction loss
    # stage 2: U-Net + text encoder
    steps: int = 3800
    # 64 scenes a step: 1.75x the scenes/s of 16 here (small ops are overhead-bound), and a shape word's
    # small effect on the loss needs the quieter gradient of a large batch to be learned at all.
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # empty captions: the unconditional model that classifier-free guidance needs
    noise_offset: float = 0.1  # without it the 16x16 latents' mean leaks through t=999 and the seed picks the background
    min_snr_gamma: float = 5.0  # Hang et al. 2023: faster convergence
    ema_decay: float = 0.995  # averages about the last 200 steps: a longer memory lags a short run
    log_every: int = 50


QUICK = Settings(vae_steps=20, vae_batch_size=8, steps=20, batch_size=8, warmup_steps=5, log_every=5)


def tokenizer_words() -> list[str]:
    """The world's words and the chars dataset's caption words: each becomes one token."""
    return sorted(set(world.VOCABULARY) | set(chars.caption_words()))


def build_components(tokenizer_dir: Path, seed: int):
    """(tokenizer, text_encoder, vae, unet, scheduler), freshly initialised from `seed`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_clip_tokenizer(tokenizer_dir, tokenizer_words(), num_merges=2000)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_ENCODER,
    ))
    vae = AutoencoderKL(**VAE)
    unet = UNet2DConditionModel(**UNET)
    return tokenizer, text_encoder, vae, unet, DDPMScheduler(**SCHEDULER)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def _item_seed(seed: int, stage: int, step: int, index: int) -> int:
    return ((seed * 7 + stage) * 1_000_003 + step) * 4099 + index


def vae_batch(settings: Settings, step: int) -> torch.Tensor:
    """Random crops (B, 3, crop, crop) of world scenes (half) and random pictures (half)."""
    images = []
    for i in range(settings.vae_batch_size):
        rng = random.Random(_item_seed(settings.seed, 1, step, i))
        image = world.render(world.sample_scene(rng)) if i % 2 == 0 else world.random_picture(rng)
        x, y = rng.randint(0, image.width - settings.vae_crop), rng.randint(0, image.height - settings.vae_crop)
        images.append(image.crop((x, y, x + settings.vae_crop, y + settings.vae_crop)))
    return to_tensor(images)


def world_batch(settings: Settings, step: int) -> tuple[torch.Tensor, list[str]]:
    """Training-split world scenes (B, 3, 64, 64) and their captions, `caption_dropout` of them emptied."""
    images, captions = [], []
    for i in range(settings.batch_size):
        rng = random.Random(_item_seed(settings.seed, 2, step, i))
        scene = world.sample_scene(rng)
        images.append(world.render(scene))
        captions.append("" if rng.random() < settings.caption_dropout else world.caption(scene))
    return to_tensor(images), captions


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Progress:
    """Prints smoothed losses with elapsed time and an estimate of the time left."""

    def __init__(self, stage: str, total: int, every: int):
        self.stage, self.total, self.every = stage, total, every
        self.started = time.perf_counter()
        self.smoothed: float | None = None

    def update(self, step: int, loss: float, **extra: float) -> None:
        self.smoothed = loss if self.smoothed is None else 0.95 * self.smoothed + 0.05 * loss
        done = step + 1
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (self.total - done)
        more = "".join(f" {k} {v:.3g}" for k, v in extra.items())
        print(f"[{self.stage}] step {done}/{self.total} loss {self.smoothed:.4f}{more} "
              f"elapsed {elapsed / 60:.1f} min, left ~{left / 60:.1f} min", flush=True)


def train_vae(vae, settings: Settings) -> None:
    """Stage 1: reconstruction (L1 + MSE) plus a small KL term towards N(0, 1)."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    progress = Progress("vae", settings.vae_steps, settings.log_every)
    for step in range(settings.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.vae_steps, settings.vae_learning_rate, settings.warmup_steps // 2)
        pixels = vae_batch(settings, step)  # (B, 3, 64, 64)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        rec = (reconstruction - pixels).abs().mean() + (reconstruction - pixels).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = rec + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        progress.update(step, rec.item(), kl=kl.item())
    vae.eval()


@torch.no_grad()
def measure_scaling_factor(vae, settings: Settings, count: int = 512) -> float:
    """1 / std of the latents of world scenes, so the diffusion model sees unit-variance latents (SD: 0.18215)."""
    generator = torch.Generator().manual_seed(settings.seed)
    scenes = [world.render(world.sample_scene(random.Random(_item_seed(settings.seed, 3, 0, i)))) for i in range(count)]
    latents = torch.cat([vae.encode(to_tensor(scenes[i:i + 64])).latent_dist.sample(generator=generator) for i in range(0, count, 64)])
    return float(1 / latents.std())


class EMA:
    """Exponential moving average of parameters; sampling with it is much cleaner after a short run."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.live = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.live]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages forget the random init
        for s, p in zip(self.shadow, self.live):
            s.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_live(self) -> None:
        for s, p in zip(self.shadow, self.live):
            p.copy_(s)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (twice: back as before)."""
        for s, p in zip(self.shadow, self.live):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def train_unet_and_text_encoder(unet, text_encoder, tokenizer, vae, scheduler, settings: Settings, after_step=None) -> None:
    """Stage 2: the noise-prediction objective on fresh world batches; ends with the EMA weights in place.

    `after_step(step, ema)`, if given, is called after every optimizer step (e.g. to save EMA snapshots).
    """
    unet.train()
    text_encoder.train()
    unet.to(memory_format=torch.channels_last)  # 1.07x per step here; the saved weights are contiguous again
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.01)
    ema = EMA([unet, text_encoder], settings.ema_decay)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    scaling = float(vae.config.scaling_factor)
    progress = Progress("unet+text", settings.steps, settings.log_every)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.steps, settings.learning_rate, settings.warmup_steps)
        pixels, captions = world_batch(settings, step)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=generator) * scaling  # (B, 4, 16, 16)
        input_ids = tokenize(tokenizer, captions)
        cond = encode_tokens(text_encoder, input_ids)  # (B, 77, D)
        noise = diffusion.sample_noise(latents, generator, settings.noise_offset)
        timesteps = diffusion.sample_timesteps(latents.shape[0], len(alphas_cumprod), generator, latents.device)
        noisy = diffusion.add_noise(latents, noise, timesteps, alphas_cumprod)
        prediction = unet(noisy, timesteps, cond).sample
        weights = diffusion.min_snr_weights(timesteps, alphas_cumprod, settings.min_snr_gamma, "epsilon")
        loss = diffusion.diffusion_loss(prediction, noise, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        progress.update(step, loss.item())
        if after_step is not None:
            after_step(step, ema)
    ema.copy_to_live()
    unet.to(memory_format=torch.contiguous_format)
    unet.eval()
    text_encoder.eval()


def model_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def pretrain(output: Path, settings: Settings, vae_from: Path | None = None) -> Path:
    """Both stages, then save the pipeline to `output` (a diffusers folder) and return it.

    `vae_from`: a diffusers model folder whose VAE replaces stage 1 (e.g. to iterate on stage 2 alone).
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(settings.seed)
    with tempfile.TemporaryDirectory(prefix="sd_lora_demo_tok_") as tok_dir:
        tokenizer, text_encoder, vae, unet, scheduler = build_components(Path(tok_dir), settings.seed)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"parameters: U-Net {count(unet):.2f}M, VAE {count(vae):.2f}M, text encoder {count(text_encoder):.2f}M; "
          f"vocabulary {len(tokenizer)} tokens", flush=True)

    started = time.perf_counter()
    if vae_from is None:
        train_vae(vae, settings)
        vae.requires_grad_(False)
        scaling = measure_scaling_factor(vae, settings)
        vae.register_to_config(scaling_factor=scaling)
        print(f"VAE done in {(time.perf_counter() - started) / 60:.1f} min; latent scaling factor {scaling:.4f}", flush=True)
    else:
        trained = AutoencoderKL.from_pretrained(str(vae_from), subfolder="vae")
        vae.load_state_dict(trained.state_dict())  # into our own VAE: the saved config stays as stage 1 writes it
        vae.register_to_config(scaling_factor=trained.config.scaling_factor)
        vae.eval().requires_grad_(False)
        print(f"VAE from {vae_from}; latent scaling factor {vae.config.scaling_factor:.4f}", flush=True)

    train_unet_and_text_encoder(unet, text_encoder, tokenizer, vae, scheduler, settings)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    output = Path(output)
    pipe.save_pretrained(str(output), safe_serialization=True)
    return output


def vae_from_problem(model_dir: Path) -> str | None:
    """Why `model_dir`'s VAE cannot stand in for stage 1's, or None if it can."""
    config_path = Path(model_dir) / "vae" / "config.json"
    if not config_path.is_file():
        return f"no vae/config.json there; give a diffusers model folder such as {BASE_MODEL_DIR}"
    config = json.loads(config_path.read_text())
    for key, value in VAE.items():
        expected = list(value) if isinstance(value, tuple) else value
        if key != "sample_size" and config.get(key) != expected:
            return (f"its VAE has {key}={config.get(key)!r} where this script builds {expected!r}; "
                    f"give a model this script wrote (such as {BASE_MODEL_DIR})")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_lora.demo.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=BASE_MODEL_DIR, help="Folder to write the diffusers model to (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="A smoke run of a few steps (the model will not draw).")
    parser.add_argument("--steps", type=int, help="Override stage 2's step count.")
    parser.add_argument("--vae-steps", type=int, help="Override stage 1's step count.")
    parser.add_argument("--vae-from", type=Path, metavar="MODEL_DIR",
                        help="Skip stage 1 and use this diffusers model's VAE (e.g. the committed base's).")
    parser.add_argument("--no-eval", action="store_true", help="Skip the prompt-fidelity evaluation at the end.")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else Settings(), seed=args.seed)
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.vae_steps is not None:
        settings = dataclasses.replace(settings, vae_steps=args.vae_steps)

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    if args.vae_from is not None:
        problem = vae_from_problem(args.vae_from)
        if problem:
            parser.error(f"--vae-from {args.vae_from}: {problem}")
        if args.vae_steps is not None:
            parser.error("--vae-steps trains stage 1, which --vae-from skips; give one of them")
    output = pretrain(args.output, settings, args.vae_from)
    wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    print(f"saved {output} ({model_size_bytes(output) / 2**20:.1f} MiB) in {wall / 60:.1f} min "
          f"({cpu / 60:.1f} CPU-min on {torch.get_num_threads()} threads)", flush=True)
    if not args.no_eval:
        from .evaluate import evaluate_base, format_base_report

        print(format_base_report(evaluate_base(str(output))), flush=True)
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
