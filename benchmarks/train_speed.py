"""Training speed: sd_lora's configurations side by side with a naive diffusers-example loop, and the
full-size SD1.5 U-Net step against the machine's measured matmul peak.

    python benchmarks/train_speed.py [--quick] [--repeats 3] [--steps 24] [--out /tmp/sd_lora_train_speed]
    python benchmarks/train_speed.py --only sd15 --sd15-resolution 256      # just the FLOP accounting
    python benchmarks/train_speed.py --only naive,default --profile default  # torch.profiler table per step
    python benchmarks/train_speed.py --model sd15 --only naive,default,bf16 --steps 6   # full-size SD1.5, 256 px

Part 1 trains one model on a generated dataset (8 JPEGs of 768-1024 px, captions in .txt files) at
`--resolution`, batch `--batch-size`, LoRA rank `--rank` on the attn-mlp targets, for `--steps` optimizer
steps, in each configuration. The model is the tiny SD1 model (`sd_lora.models.tiny`), or with `--model sd15`
(`sdxl`) the full-size SD1.5 (SDXL) architecture with random weights, written once as a diffusers folder under
--out from the config skeletons sd_lora ships (4 GiB fp32; SDXL 7 GiB fp16). The naive loop is diffusers' SD1
example, so `--model sdxl` runs sd_lora's configurations only.

- `naive`: what diffusers' `examples/text_to_image/train_text_to_image_lora.py` does every step: decode and
  resize + centre-crop the image (torchvision transforms, DataLoader with 0 workers), tokenize, VAE-encode,
  text-encode, add noise, predict, MSE, backward, clip, plain AdamW; fp32, no caching. Implemented below.
- sd_lora configurations (`CONFIGS`): `sd_lora.train.run(load_config([...]))` with `--sample-every 0`.

Every configuration runs in its own subprocess (peak RSS is that process's VmHWM: import, model load,
cache building and training; plus `torch.cuda.max_memory_allocated` on a GPU), `--repeats` times, the
configurations interleaved so that load from other processes spreads evenly. s/step is the median over
steps after `WARMUP_STEPS` (per-step times come from `metrics.jsonl` `elapsed` for sd_lora and from the loop
itself for naive; both include fetching the batch). images/s is the images those steps trained over their
time: the dataset's three aspect ratios make sd_lora's buckets end in short batches (8 images at batch 2 are
5 steps an epoch), which the naive loop's square crops never have. Reported values are medians over repeats.

Part 2 (`sd15`) builds the full-size SD1.5 U-Net (config from shared/reference/model-configs.md, random
weights), injects rank-16 attn-mlp LoRA, counts one training step's FLOPs with `FlopCounterMode` (forward +
backward; CPU flash attention added to its formula table) and times steps at `--sd15-resolution`, batch 1.
Achieved FLOP/s is reported as a fraction of the matmul peak measured in the same process and dtype: the
faster of `torch.mm` and oneDNN's matmul at 3072^3, median of 7 calls, the best of before and after the steps;
fp32 only on a CPU without bf16 instructions, where bf16 runs in a fallback 100x slower (`--quick` then leaves
out the tiny model's `bf16` run too). It also times the SD1.5 VAE encoder and CLIP ViT-L text
encoder at the same size, to project the naive-vs-cached ratio for the full-size model.

The last line is `images_per_s_ratio_vs_naive=X peak_rss_ratio_vs_naive=Y` for the `default` configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2  # first steps pay allocator warm-up and lazy initialisation
# sd_lora configurations: extra flags on top of the shared ones; "default" is sd_lora's defaults.
CONFIGS = {
    "default": [],  # --mixed-precision auto: fp32 for the tiny model, bf16 for full-size SD1.5 on an AMX CPU or a GPU
    "fp32": ["--mixed-precision", "no"],
    "no-cache": ["--no-cache-latents"],
    "bf16": ["--mixed-precision", "bf16"],
    "grad-ckpt": ["--gradient-checkpointing"],
    "compile-blocks": ["--compile", "blocks"],
    "compile-unet": ["--compile", "unet"],
}
QUICK_CONFIGS = ("naive", "default", "bf16")
# Monkeypatched experiments (`--experiments`): changes train.py/loop.py could make, tried from outside.
EXPERIMENTS = {
    "default-text-cache": ("default", "no-text-cache"),
    "default+channels-last": ("default", "channels-last"),
    "default+malloc-trim": ("default", "malloc-trim"),
}
FULL_SIZE_FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}  # --model -> sd_lora's config skeleton (shared/reference/model-configs.md)


# --- set-up (parent process) ---------------------------------------------------------------------------


def write_dataset(root: Path, count: int = 8, repeats: int = 1, square: bool = False) -> Path:
    """`root/<repeats>_zkchar/` with `count` JPEG photo-sized drawings and .txt captions (fixed seed): three
    aspect ratios, or with `square` all 1024x1024, so that every image lands in one bucket and a batch of up to
    `count * repeats` is always full."""
    from PIL import Image, ImageDraw, ImageFilter

    folder = root / f"{repeats}_zkchar"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sizes = [(1024, 1024)] if square else [(1024, 768), (768, 1024), (896, 896)]
    colours = ["red", "blue", "green", "yellow", "purple"]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        bg = colours[i % len(colours)]
        image = Image.effect_noise((w, h), 40).convert("RGB")  # texture, so JPEG decoding does real work
        image = Image.blend(image, Image.new("RGB", (w, h), bg), 0.6)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(20, w // 4)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice(colours), outline="black", width=4)
        image.filter(ImageFilter.SMOOTH).save(folder / f"img{i}.jpg", quality=92)
        (folder / f"img{i}.txt").write_text(f"zkchar, a robot character, {bg} background")
    return root


def dataset_dir(out: Path, square: bool = False) -> Path:
    """The benchmark's dataset under `out`, written once: three aspect ratios (sd_lora trains three buckets
    and short batches), or with `square` all 1024x1024 (one 64x64 bucket at 64 px, every batch full: the shape
    the naive loop's centre crops always train, so memory compares at equal shapes)."""
    root = out / ("data-square" if square else "data")
    if not root.is_dir():
        write_dataset(root, square=square)
    return root


def machine() -> dict:
    import platform

    import torch

    info = {"nproc": os.cpu_count(), "cpu": cpu_identity() or platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_identity() -> str:
    """The CPU's model name, family and model, and the vector instructions the kernels choose between. AMD
    names its EPYC CPUs by family alone ("AMD EPYC"): family 25 is Zen 3 or Zen 4, 26 is Zen 5."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return ""
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    return (f"{fields.get('model name', '?')}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, "
            + (" ".join(isa) or "no AVX2"))


def median_seconds(fn, calls: int, device) -> float:
    """Median wall time of `calls` calls of fn after one warm-up call, synchronising a GPU around each."""
    import torch

    fn()
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(dtype, device) -> float:
    """GFLOP/s of a large square matmul in `dtype`: the faster of `torch.mm` and, on a CPU, oneDNN's matmul.
    On a CPU `torch.mm` runs fp32 through MKL, which takes its AVX2 path on AMD CPUs: on the Zen 5 it reached
    half of what oneDNN (the library behind PyTorch's CPU convolutions and bf16 matmuls) reaches at the same
    size, so a step of convolutions measured against it alone came out above 100%."""
    import warnings

    import torch

    n = 4096 if device.type == "cuda" else 3072
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    rates = [2 * n**3 / median_seconds(lambda: a @ b, 7, device) / 1e9]
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        import torch.utils.mkldnn

        linear = torch.nn.Linear(n, n, bias=False).requires_grad_(False)
        with warnings.catch_warnings():  # torch.utils.mkldnn's modules are TorchScript, which warns it is deprecated
            warnings.simplefilter("ignore")
            linear = torch.utils.mkldnn.to_mkldnn(linear, dtype)
        x = a.to_mkldnn()
        with torch.no_grad():
            rates.append(2 * n**3 / median_seconds(lambda: linear(x), 7, device) / 1e9)
    return max(rates)


def random_init(module, device):
    """Materialise a meta-device module with small random weights, frozen (default init of SD1.5's 860M
    U-Net parameters takes ~10 s longer and the values do not matter for speed)."""
    import torch

    module.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
        for name, buffer in module.named_buffers():
            if name.endswith("position_ids"):  # CLIP's (1, 77) arange
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            else:
                buffer.zero_()
    return module.requires_grad_(False)


def meta_component(folder: Path, name: str):
    """Component `name` of the diffusers config folder `folder`, built on the meta device (no weight memory)."""
    import diffusers
    import torch
    import transformers

    library, class_name = json.loads((folder / "model_index.json").read_text())[name]
    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(cls.load_config(str(folder / name)))
        return cls(cls.config_class.from_pretrained(str(folder / name)))


def save_random_model(family: str, directory: Path, resolution: int, dtype=None) -> Path:
    """A full-size `family` ("sd1", "sd2", "sdxl") diffusers folder with random weights: the configs and CLIP
    tokenizers sd_lora ships for single-file checkpoints (`write_skeleton`), every component saved as safetensors
    (fp32 unless `dtype`; about 4 GiB for SD1.5, 7 GiB for SDXL in fp16)."""
    import torch

    from sd_lora.models.single_file import write_skeleton

    write_skeleton(family, directory, prediction_type="epsilon", resolution=resolution)
    components = [name for name in json.loads((directory / "model_index.json").read_text())
                  if name in ("unet", "vae", "text_encoder", "text_encoder_2")]
    for name in components:
        module = meta_component(directory, name)
        module = random_init(module.to(dtype) if dtype is not None else module, torch.device("cpu"))
        module.save_pretrained(str(directory / name), safe_serialization=True)
        del module
    return directory


def model_folder(out: Path, kind: str) -> Path:
    """Where a `--model` kind's diffusers folder lives in an output folder (written there once, reused)."""
    return out / ("model" if kind not in FULL_SIZE_FAMILY else f"{kind}-model")


def write_model(kind: str, directory: Path, resolution: int | None = None) -> Path:
    """The diffusers folder a `--model` kind ("tiny", "sd15", "sdxl") trains from, written once: the tiny SD1 model,
    or full size with random weights (SDXL in fp16), its configs sized for `resolution` (default: native)."""
    if (directory / "model_index.json").is_file():
        return directory
    if kind not in FULL_SIZE_FAMILY:
        from sd_lora.models.tiny import save_tiny_model

        return save_tiny_model(directory)
    import torch

    sdxl = kind == "sdxl"
    return save_random_model(FULL_SIZE_FAMILY[kind], directory, resolution or (1024 if sdxl else 512),
                             dtype=torch.float16 if sdxl else None)


def save_sd15_model(directory: Path) -> Path:
    """Full-size SD1.5 with random weights (about 4 GiB, fp32)."""
    return save_random_model("sd1", directory, 512)


# --- workers (one configuration per subprocess) ------------------------------------------------------


def peak_memory() -> dict:
    import torch

    from sd_lora.memory import peak_rss_bytes  # this process's own peak, not the parent's that wrote the model

    out = {"peak_rss_mib": peak_rss_bytes() / 2**20}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_reserved_peak_mib"] = torch.cuda.max_memory_reserved() / 2**20  # what the allocator held
        out["cuda_total_mib"] = torch.cuda.get_device_properties(0).total_memory / 2**20
    return out


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@contextlib.contextmanager
def profiled(enabled: bool):
    """Yields a per-step callback; with `enabled`, profiles steps 3-5 and prints the top ops."""
    if not enabled:
        yield lambda: None
        return
    from torch.profiler import profile, schedule

    with profile(schedule=schedule(wait=WARMUP_STEPS, warmup=1, active=3)) as prof:
        yield prof.step
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)


def apply_patch(name: str) -> None:
    """Experiments on sd_lora's training code, applied from outside (hacks: they touch private structure)."""
    from sd_lora import train
    from sd_lora.models import conditioning

    if name == "no-text-cache":
        # The Conditioner caches text-encoder outputs per caption (frozen encoder, fixed captions); switch it off
        # to measure what that cache is worth.
        original_init = conditioning.Conditioner.__init__

        def init(self, *a, **kw):
            original_init(self, *a, **{**kw, "cache_outputs": False})

        conditioning.Conditioner.__init__ = init
    elif name == "channels-last":
        original_prepare = train.prepare_models

        def prepare(config, model, *a, **kw):
            params = original_prepare(config, model, *a, **kw)
            import torch

            model.unet.to(memory_format=torch.channels_last)
            return params

        train.prepare_models = prepare
    elif name == "malloc-trim":
        # glibc keeps memory freed by the cache-building threads in per-thread arenas; hand it back to the OS.
        import ctypes

        original_build = train.build_latent_cache

        def build(*a, **kw):
            cache = original_build(*a, **kw)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            return cache

        train.build_latent_cache = build
    else:
        raise ValueError(f"unknown patch {name!r}")


def worker_sd_lora(args, flags: list[str], patch: str | None) -> dict:
    import sd_lora.loop
    import sd_lora.outputs
    from sd_lora.config import load_config
    from sd_lora.train import run

    if patch:
        apply_patch(patch)
    import_rss = current_rss_mib()
    out = args.run_dir
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--data", str(args.data), "--model", str(args.model_dir), "--output-dir", str(out),
            "--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--rank", str(args.rank),
            "--max-steps", str(args.steps), "--sample-every", "0", "--seed", "0", *flags]
    step_images, images = [], [0]  # images per optimizer step: a bucket's last batch may be short
    compute_loss = sd_lora.loop.compute_loss

    def counting_compute_loss(t, obj, batch, state):
        images[0] += len(batch["captions"])
        return compute_loss(t, obj, batch, state)

    train = sd_lora.loop.train

    def counting_train(*a, **kw):
        images[0] = 0  # the memory check's trial step before training is not a training step
        return train(*a, **kw)

    sd_lora.loop.compute_loss, sd_lora.loop.train = counting_compute_loss, counting_train
    with profiled(args.profile) as step_done:
        original = sd_lora.outputs.RunOutputs.on_step_end

        def on_step_end(self, *a, **kw):
            original(self, *a, **kw)
            step_images.append(images[0])
            images[0] = 0
            step_done()

        sd_lora.outputs.RunOutputs.on_step_end = on_step_end
        started = time.perf_counter()
        run(load_config(argv))
        run_s = time.perf_counter() - started
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    elapsed = [r["elapsed"] for r in records]
    step_s = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    if len(step_images) != len(step_s):
        raise RuntimeError(f"counted images for {len(step_images)} steps but metrics.jsonl has {len(step_s)}")
    return {"step_s": step_s, "step_images": step_images, "train_s": elapsed[-1], "run_s": run_s, "import_rss_mib": import_rss,
            "train_rss_mib": max(r["rss_mb"] for r in records), **peak_memory()}


def worker_naive(args) -> dict:
    """The diffusers train_text_to_image_lora.py step, as written there (fp32, no caching, square crops)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from torchvision import transforms
    from transformers import CLIPTextModel, CLIPTokenizer

    from sd_lora.lora.inject import inject_lora, trainable_parameters
    from sd_lora.lora.targets import unet_target_modules

    import_rss = current_rss_mib()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = str(args.model_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device)
    # The example calls unet.add_adapter(LoraConfig(...)); the same PEFT injection, on the same targets as sd_lora.
    inject_lora(unet, unet_target_modules(unet, "attn-mlp"), rank=args.rank, alpha=args.rank, dropout=0.0)
    lora_layers = trainable_parameters(unet)
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    train_transforms = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    files = sorted(args.data.rglob("*.jpg"))

    class Dataset(torch.utils.data.Dataset):  # the example's `with_transform(preprocess_train)`: per access
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            image = Image.open(files[i]).convert("RGB")
            caption = files[i].with_suffix(".txt").read_text()
            ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
            return {"pixel_values": train_transforms(image), "input_ids": ids[0]}

    def collate_fn(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}

    loader = torch.utils.data.DataLoader(Dataset(), shuffle=True, collate_fn=collate_fn, batch_size=args.batch_size, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    unet.train()
    step_s, step_images, step, train_loss, train_rss = [], [], 0, 0.0, 0.0
    with profiled(args.profile) as step_done:
        last = time.perf_counter()
        while step < args.steps:
            for batch in loader:
                latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
                target = noise  # epsilon prediction
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                train_loss += loss.item()  # the example gathers and logs the loss every step
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                now = time.perf_counter()
                step_s.append(now - last)
                step_images.append(bsz)
                last = now
                step += 1
                train_rss = max(train_rss, current_rss_mib())  # sd_lora logs the same, once per step
                step_done()
                if step >= args.steps:
                    break
    return {"step_s": step_s, "step_images": step_images, "train_s": sum(step_s), "run_s": time.perf_counter() - started, "import_rss_mib": import_rss,
            "train_rss_mib": train_rss, **peak_memory()}


def worker_sd15(args) -> dict:
    """FLOPs and speed of one full-size SD1.5 U-Net LoRA step, against the measured matmul peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from sd_lora.lora.inject import autocast_casts_lora_inputs, inject_lora, trainable_parameters
    from sd_lora.lora.targets import unet_target_modules

    aten = torch.ops.aten
    # FlopCounterMode has no formula for the CPU flash-attention kernel SDPA picks here; give it the same as the CUDA one.
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # as training sets them (trainee_setup): fp32 steps and the fp32 peak both on TF32 cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result: dict = {"resolution": args.sd15_resolution}
    # Without bf16 instructions PyTorch computes bf16 in a fallback 100x slower than fp32: one 3072^3 bf16 mm takes
    # minutes there, an SD1.5 step far longer. Such a CPU trains in fp32 (--mixed-precision auto), measured alone.
    dtypes = (torch.float32, torch.bfloat16) if native_bf16() else (torch.float32,)
    result["bf16_skipped"] = len(dtypes) == 1

    def timed(fn, repeats: int) -> float:
        return median_seconds(fn, repeats, device)

    def matmul_peak() -> None:
        """The matmul peak per dtype; the best of the measurements before and after the U-Net steps."""
        for dtype in dtypes:
            key = f"mm_peak_{str(dtype)[6:]}_gflops"
            result[key] = max(result.get(key, 0.0), matmul_peak_gflops(dtype, device))

    matmul_peak()

    from sd_lora.models.single_file import SKELETONS

    unet, vae, text_encoder = (meta_component(SKELETONS / "sd1", name) for name in ("unet", "vae", "text_encoder"))
    unet, vae, text_encoder = random_init(unet, device), random_init(vae, device).eval(), random_init(text_encoder, device).eval()
    inject_lora(unet, unet_target_modules(unet, "attn-mlp"), rank=16, alpha=16, dropout=0.0)
    unet.train()
    params = trainable_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=device.type != "cuda", fused=device.type == "cuda" or None)
    side = args.sd15_resolution // 8
    latents = torch.randn(1, 4, side, side, device=device)
    hidden = torch.randn(1, 77, 768, device=device)
    timestep = torch.tensor([500], device=device)

    def step(dtype=torch.float32):  # as loop.py steps: autocast casts the LoRA layers' inputs, PEFT does not
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), autocast_casts_lora_inputs([unet], device.type):
            pred = unet(latents, timestep, encoder_hidden_states=hidden).sample
            loss = torch.nn.functional.mse_loss(pred.float(), latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        step()
    flops = counter.get_total_flops()
    result["unet_step_gflop"] = flops / 1e9
    result["unet_step_gflop_by_op"] = {str(k): v / 1e9 for k, v in counter.get_flop_counts()["Global"].items()}
    variants = (("float32", torch.float32, torch.contiguous_format),
                ("float32_channels_last", torch.float32, torch.channels_last),
                ("bfloat16_channels_last", torch.bfloat16, torch.channels_last),
                ("bfloat16", torch.bfloat16, torch.contiguous_format))
    if args.quick:
        variants = variants[0:1] + variants[2:3]
    variants = tuple(v for v in variants if v[1] in dtypes)
    # As sd_lora runs them: fp32; --mixed-precision bf16 (frozen base stored in bf16, LoRA in fp32, autocast);
    # each also with the U-Net in channels_last (NHWC), the layout oneDNN's convolutions prefer.
    for name, dtype, layout in variants:
        with torch.no_grad():
            for p in unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
        unet.to(memory_format=layout)
        latents = latents.contiguous(memory_format=layout)
        seconds = timed(lambda: step(dtype), args.sd15_steps)
        peak = result[f"mm_peak_{str(dtype)[6:]}_gflops"]
        result[f"unet_step_s_{name}"] = seconds
        result[f"achieved_{name}_gflops"] = flops / seconds / 1e9
        result[f"fraction_of_mm_peak_{name}"] = flops / seconds / 1e9 / peak
    matmul_peak()
    pixels = torch.randn(1, 3, args.sd15_resolution, args.sd15_resolution, device=device)
    ids = torch.randint(0, 49408, (1, 77), device=device)
    with torch.no_grad():
        result["vae_encode_s_float32"] = timed(lambda: vae.encode(pixels).latent_dist.sample(), args.sd15_steps)
        result["text_encode_s_float32"] = timed(lambda: text_encoder(ids), args.sd15_steps)
    # What caching buys on the full-size model: the naive step pays VAE + text encoder + U-Net.
    naive = result["vae_encode_s_float32"] + result["text_encode_s_float32"] + result["unet_step_s_float32"]
    result["projected_speedup_latent_cache"] = naive / (result["text_encode_s_float32"] + result["unet_step_s_float32"])
    result["projected_speedup_latent_and_text_cache"] = naive / result["unet_step_s_float32"]
    result.update(peak_memory())
    return result


def run_worker(args) -> int:
    name = args.worker
    if name == "sd15":
        result = worker_sd15(args)
    elif name == "naive":
        result = worker_naive(args)
    elif name in CONFIGS:
        result = worker_sd_lora(args, CONFIGS[name], None)
    elif name in EXPERIMENTS:
        base, patch = EXPERIMENTS[name]
        result = worker_sd_lora(args, CONFIGS[base], patch)
    else:
        raise SystemExit(f"unknown configuration {name!r}")
    Path(args.result).write_text(json.dumps(result))
    return 0


# --- parent: run, summarise ------------------------------------------------------------------------------


WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def worker_command(name: str, *, result: Path, out: Path, run_dir: Path, model_dir: Path, resolution: int,
                   batch_size: int, rank: int, steps: int, extra: tuple[str, ...] = (), data: Path | None = None) -> list[str]:
    """The command line of one configuration's worker subprocess (`run_worker`); the dataset is `data`
    (default `out/data`)."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result), "--out", str(out),
            "--data", str(data or out / "data"), "--run-dir", str(run_dir), "--model-dir", str(model_dir), "--resolution", str(resolution),
            "--batch-size", str(batch_size), "--rank", str(rank), "--steps", str(steps), *extra]


def spawn(args, name: str, repeat: int) -> dict:
    result = args.out / "results" / f"{name}-{repeat}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    extra = ("--sd15-resolution", str(args.sd15_resolution), "--sd15-steps", str(args.sd15_steps)) + ("--quick",) * args.quick
    if args.profile == name:
        extra += ("--profile", name)
    command = worker_command(name, result=result, out=args.out, run_dir=args.out / "runs" / f"{name}-{repeat}",
                             model_dir=args.model_dir, resolution=args.resolution, batch_size=args.batch_size,
                             rank=args.rank, steps=args.steps, extra=extra, data=args.data)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **WORKER_ENV}, stdout=subprocess.DEVNULL if not args.verbose else None,
                          stderr=None if args.verbose or args.profile == name else subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"configuration {name} failed:\n{(done.stderr or '')[-3000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - started
    return out


def native_bf16() -> bool:
    """A GPU, or a CPU with bf16 instructions: where bf16 is worth measuring."""
    import torch

    from sd_lora.precision import cpu_has_bf16

    return torch.cuda.is_available() or cpu_has_bf16()


def images_per_second(run: dict) -> float:
    """Images trained per second over the steps after the warm-up: their images over their time. Not
    `batch / median(s/step)`: with aspect-ratio buckets a bucket's last batch can be short and fast."""
    timed = slice(WARMUP_STEPS, None) if len(run["step_s"]) > WARMUP_STEPS else slice(None)
    return sum(run["step_images"][timed]) / sum(run["step_s"][timed])


def summarise(name: str, runs: list[dict]) -> dict:
    per_step = [statistics.median(r["step_s"][WARMUP_STEPS:] or r["step_s"]) for r in runs]
    s_step = statistics.median(per_step)
    row = {
        "config": name, "repeats": len(runs), "s_per_step": s_step, "images_per_s": statistics.median(map(images_per_second, runs)),
        "images_per_step": statistics.median(statistics.mean(r["step_images"]) for r in runs),
        "s_per_step_runs": per_step, "train_s": statistics.median(r["train_s"] for r in runs),
        "setup_s": statistics.median(r["run_s"] - r["train_s"] for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "import_rss_mib": statistics.median(r["import_rss_mib"] for r in runs),
        "train_rss_mib": statistics.median(r["train_rss_mib"] for r in runs),
    }
    if "cuda_peak_mib" in runs[0]:
        row["cuda_peak_mib"] = statistics.median(r["cuda_peak_mib"] for r in runs)
    return row

RUN_LENGTHS = {"repeats": (3, 1), "steps": (24, 8), "sd15_resolution": (256, 128), "sd15_steps": (3, 1)}
"""Each run-length option's default, and its default with --quick."""

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_CONFIGS)} once, 8 steps, SD1.5 at 128 px with 1 timed step "
                        "(each where the option is not given)")
    parser.add_argument("--only", help="comma-separated configurations (naive, sd15, " + ", ".join([*CONFIGS, *EXPERIMENTS]) + ")")
    parser.add_argument("--experiments", action="store_true", help="also run the monkeypatched experiments")
    parser.add_argument("--repeats", type=int, help=f"default: {RUN_LENGTHS['repeats'][0]} ({RUN_LENGTHS['repeats'][1]} with --quick)")
    parser.add_argument("--steps", type=int, help=f"default: {RUN_LENGTHS['steps'][0]} ({RUN_LENGTHS['steps'][1]} with --quick)")
    parser.add_argument("--model", choices=("tiny", *FULL_SIZE_FAMILY), default="tiny",
                        help="model of the training runs: the tiny SD1 model, or full-size SD1.5 with random weights (4 GiB on disk)")
    parser.add_argument("--resolution", type=int, help="default: 64 (tiny), 256 (sd15), 1024 (sdxl)")
    parser.add_argument("--batch-size", type=int, help="default: 2 (tiny), 1 (sd15, sdxl)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sd15-resolution", type=int,
                        help=f"default: {RUN_LENGTHS['sd15_resolution'][0]} ({RUN_LENGTHS['sd15_resolution'][1]} with --quick)")
    parser.add_argument("--sd15-steps", type=int, help=f"default: {RUN_LENGTHS['sd15_steps'][0]} ({RUN_LENGTHS['sd15_steps'][1]} with --quick)")
    parser.add_argument("--profile", metavar="CONFIG", help="print a torch.profiler table for this configuration")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd_lora_train_speed"))
    parser.add_argument("--square", action="store_true",
                        help="train on 8 square images (one bucket, full batches, as the naive loop's crops) instead of three aspect ratios")
    parser.add_argument("--verbose", action="store_true")
    # internal: one configuration in this process
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, (default, quick) in RUN_LENGTHS.items():  # --quick shortens only what was not given
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.worker:
        args.profile = args.profile is not None
        return run_worker(args)

    names = args.only.split(",") if args.only else list(QUICK_CONFIGS if args.quick else ["naive", *CONFIGS])
    if args.quick and not args.only and not native_bf16():
        names.remove("bf16")  # a slow fallback there (sd_lora warns), and auto trains in fp32: 25 s of --quick's 2 minutes
    if args.experiments:
        names += list(EXPERIMENTS)
    if not args.only:
        names.append("sd15")
    # Checked before the model is written (4 GiB for --model sd15): a worker found these only after that, or never.
    known = ["naive", "sd15", *CONFIGS, *EXPERIMENTS]
    unknown = [n for n in names if n not in known]
    problems = [f"--only: unknown configurations {', '.join(unknown)} (known: {', '.join(known)})"] * bool(unknown)
    problems += [f"--profile {args.profile}: not a configuration this run measures ({', '.join(names)})"] * (
        args.profile is not None and args.profile not in names)
    problems += [f"--{name.replace('_', '-')} {value}: must be 1 or more" for name, value in vars(args).items()
                 if name in ("repeats", "steps", "rank", "batch_size", "resolution", "sd15_resolution", "sd15_steps")
                 and value is not None and value < 1]
    if problems:
        parser.error("; ".join(problems))
    full_size = args.model in FULL_SIZE_FAMILY
    if args.model == "sdxl" and {"naive", "sd15"} & set(names):
        raise SystemExit("--model sdxl: the naive loop is diffusers' SD1 example; pass --only with sd_lora configurations")
    args.resolution = args.resolution or {"tiny": 64, "sd15": 256, "sdxl": 1024}[args.model]
    args.batch_size = args.batch_size or (1 if full_size else 2)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = write_model(args.model, model_folder(args.out, args.model))
    args.data = dataset_dir(args.out, args.square)
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']} ({info['threads']} threads)"
          + (f", {info['gpu']}" if "gpu" in info else "") + f"; load average {os.getloadavg()[0]:.1f}")
    print(f"{f'full-size {args.model} (random weights)' if full_size else 'tiny SD1'} model, {args.resolution} px, batch {args.batch_size}, rank {args.rank}, {args.steps} steps, "
          + ("square images (one bucket), " if args.square else "")
          + f"{args.repeats} repeats (median s/step after {WARMUP_STEPS} warm-up steps)")

    train_names = [n for n in names if n != "sd15"]
    runs: dict[str, list[dict]] = {n: [] for n in train_names}
    for repeat in range(args.repeats):
        order = train_names if repeat % 2 == 0 else train_names[::-1]  # interleave, alternate the order
        for name in order:
            runs[name].append(spawn(args, name, repeat))
    rows = [summarise(n, runs[n]) for n in train_names]
    sd15 = spawn(args, "sd15", 0) if "sd15" in names else None

    header = f"{'config':<24}{'images/s':>10}{'s/step':>9}{'img/step':>9}{'setup s':>9}{'peak RSS MiB':>14}{'(imports':>10}{'training)':>10}"
    print(header + ("  CUDA peak MiB" if rows and "cuda_peak_mib" in rows[0] else ""))
    for row in rows:
        print(f"{row['config']:<24}{row['images_per_s']:>10.2f}{row['s_per_step']:>9.3f}{row['images_per_step']:>9.2f}{row['setup_s']:>9.1f}"
              f"{row['peak_rss_mib']:>14.0f}{row['import_rss_mib']:>10.0f}{row['train_rss_mib']:>10.0f}"
              + (f"{row['cuda_peak_mib']:>15.0f}" if "cuda_peak_mib" in row else ""))
    if sd15:
        r = sd15
        print(f"SD1.5 U-Net, {r['resolution']} px, batch 1, LoRA rank 16: {r['unet_step_gflop']:.1f} GFLOP per training step")
        if r.get("bf16_skipped"):
            print("  bfloat16: not measured, this CPU has no bf16 instructions (AVX512-BF16 or AMX); auto trains in fp32 here")
        for name in ("float32", "float32_channels_last", "bfloat16", "bfloat16_channels_last"):
            if f"unet_step_s_{name}" not in r:
                continue
            dtype = name.split("_")[0]
            print(f"  {name:<23}: {r[f'unet_step_s_{name}']:.2f} s/step = {r[f'achieved_{name}_gflops']:.1f} GFLOP/s = "
                  f"{100 * r[f'fraction_of_mm_peak_{name}']:.0f}% of the {dtype} matmul peak ({r[f'mm_peak_{dtype}_gflops']:.1f} GFLOP/s)")
        print(f"  VAE encode {r['vae_encode_s_float32']:.2f} s, text encode {r['text_encode_s_float32']:.2f} s per image (fp32): "
              f"latent cache x{r['projected_speedup_latent_cache']:.2f}, latent + text cache x{r['projected_speedup_latent_and_text_cache']:.2f} "
              f"over the naive step; peak RSS {r['peak_rss_mib']:.0f} MiB")
    summary = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "sd15": sd15,
               "wall_s": time.perf_counter() - started, "load_average": os.getloadavg()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"total {summary['wall_s']:.0f} s; details in {args.out / 'summary.json'}")
    by_name = {row["config"]: row for row in rows}
    if "naive" in by_name and "default" in by_name:
        naive, default = by_name["naive"], by_name["default"]
        print(f"images_per_s_ratio_vs_naive={default['images_per_s'] / naive['images_per_s']:.2f} "
              f"peak_rss_ratio_vs_naive={default['peak_rss_mib'] / naive['peak_rss_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
