"""The models of a run made ready to train: the Accelerator, the frozen base placed in its compute dtype with LoRA
injected in fp32 (from a preset or an --init-weights file), the text encoders' outputs cached up front, a trial
step at the largest bucket that checks the run fits in memory, and the CPU threads the run uses.

`train.train_lora` calls these in order; each takes the resolved `TrainConfig` (`--mixed-precision` already
decided, never "auto").
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys

import torch

from . import loop, memory
from .compiling import compile_unet
from .config import TrainConfig
from .data import collate
from .errors import UserError
from .export import trained_modules
from .lora.inject import inject_lora, load_lora_weights_into, trainable_parameters
from .lora.targets import text_encoder_target_modules, unet_target_modules
from .models.conditioning import Conditioner
from .models.load import BaseModel
from .precision import vae_dtype

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(config: TrainConfig, *, unused_lora: bool = False):
    """The Accelerator for a resolved `config` (`mixed_precision` is no, fp16 or bf16, not auto).

    `unused_lora`: some trained LoRA layers never reach the loss (text-encoder layers after the hidden state
    that conditions the U-Net: SDXL's first encoder, --clip-skip > 1). DDP must then look for them every step,
    or it fails waiting for their gradients."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, PartialState

    # Hack: accelerate keeps one process-wide state and refuses a second Accelerator with another
    # mixed precision. A notebook (or test) that trains twice in one process needs a fresh one; reset
    # it only in single-process runs, where no other rank shares that state.
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    # Without a GPU, say so: under `accelerate launch --num_processes N` accelerate then joins the processes
    # with gloo on the CPU instead of running N independent trainings.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused_lora else []
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=ddp)


def read_init_weights(config: TrainConfig, model: BaseModel) -> tuple[TrainConfig, dict]:
    """--init-weights: the file's LoRA modules by component, and the config with the file's rank and alpha,
    and with the text encoder trained when the file has modules for it, unless --(no-)train-text-encoder says
    otherwise (a LoRA from any trainer, in any format sd_lora reads). A --rank or --alpha the user set that
    differs from the file's is refused, not silently replaced."""
    from .formats.architecture import architecture_of
    from .formats.readers import read_any_lora, require_exact

    names = list(trained_modules(model, True))[1:]
    source = config.init_weights
    lora = read_any_lora(source, architecture=architecture_of(model.unet, dict(zip(names, model.text_encoders))))
    require_exact(lora, "start training from")
    modules = [w for component in lora.components.values() for w in component.values()]
    ranks, alphas = {w.rank for w in modules}, {round(w.alpha, 6) for w in modules}
    if len(ranks) > 1 or len(alphas) > 1:
        raise UserError(f"--init-weights {source}: modules have different ranks {sorted(ranks)} or alphas "
                        f"{sorted(alphas)}; make them uniform first, e.g. python -m sd_lora.resize {source} OUT --rank {max(ranks)}")
    rank, alpha = modules[0].rank, modules[0].alpha
    text = any(lora.components.get(n) for n in names)
    conflicts = []
    if config.rank is not None and config.rank != rank:
        conflicts.append(f"--rank {config.rank}: the file's rank is {rank}; drop --rank, or resize the file first: "
                         f"python -m sd_lora.resize {source} OUT --rank {config.rank}")
    if config.alpha is not None and not math.isclose(config.alpha, alpha, rel_tol=1e-6):
        conflicts.append(f"--alpha {config.alpha:g}: the file's alpha is {alpha:g}; drop --alpha")
    if config.train_text_encoder is False and text:
        conflicts.append("--no-train-text-encoder: the file has text-encoder modules, which the trained file would lose; "
                         "drop --no-train-text-encoder to train them too")
    if conflicts:
        raise UserError(f"--init-weights {source} decides the LoRA's shape, and it differs from options you set:\n"
                        + "\n".join(f"  {c}" for c in conflicts))
    train_text = text if config.train_text_encoder is None else config.train_text_encoder
    if config.text_encoder_lr is not None and not train_text:
        raise UserError(f"--text-encoder-lr is set but --init-weights {source} has no text-encoder modules, so the text "
                        "encoder is not trained; add --train-text-encoder to train a fresh text-encoder LoRA, or drop --text-encoder-lr")
    fresh = [c for c in ["unet", *(names if train_text else [])] if not lora.components.get(c)]
    print(f"--init-weights {source}: {lora.format} file, rank {rank}, alpha {alpha:g}, "
          f"{len(lora.components.get('unet', {}))} U-Net modules" + (", text encoder modules too (they train)" if text else "")
          + (f"; nothing for {' and '.join(fresh)}, which start{'s' if len(fresh) == 1 else ''} a fresh LoRA" if fresh else ""))
    config = dataclasses.replace(config, rank=rank, alpha=alpha, train_text_encoder=train_text)
    return config, lora.components


def prepare_models(config: TrainConfig, model: BaseModel, device: torch.device, weight_dtype: torch.dtype,
                   init_weights: dict | None = None, batch_shapes: int = 1) -> list[torch.nn.Parameter]:
    """Freeze the base, inject LoRA where the preset (or the --init-weights file) says, cast and place;
    returns the trainable parameters. A trained component the --init-weights file has nothing for (a
    text-encoder-only file, an SDXL file without its second encoder) starts a fresh LoRA on the preset's
    targets. `batch_shapes`: input shapes --compile must hold graphs for."""
    fp16_safe = bool(model.vae_name) and not model.vae.config.get("force_upcast", True)
    for module in (model.unet, model.vae, *model.text_encoders):
        module.requires_grad_(False)
        module.to(device)
        dtype = vae_dtype(model.family, weight_dtype, fp16_safe=fp16_safe) if module is model.vae else weight_dtype
        if next(module.parameters()).dtype != dtype:  # loading usually chose it already
            module.to(dtype=dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: TF32 tensor cores for fp32 matmuls/convs
        torch.backends.cudnn.allow_tf32 = True
        model.unet.to(memory_format=torch.channels_last)  # NHWC convolutions are faster on tensor cores
    if config.xformers:  # (preflight.check_xformers: the package and a CUDA GPU are there)
        model.unet.enable_xformers_memory_efficient_attention()
    # LoRA parameters are created and kept in fp32 whatever the base dtype.
    lora = dict(rank=config.rank, alpha=config.effective_alpha, dropout=config.lora_dropout)
    text_encoders = model.text_encoders if config.train_text_encoder else []
    targets = dict(zip(trained_modules(model, config.train_text_encoder), [model.unet, *text_encoders]))
    for component, module in targets.items():
        if init_weights is not None and init_weights.get(component):
            inject_lora(module, sorted(init_weights[component]), **lora)
            load_lora_weights_into(module, init_weights[component], source=str(config.init_weights))
        elif component == "unet":
            inject_lora(module, unet_target_modules(module, config.targets), **lora)
        else:  # SDXL: both encoders, six linears per layer each
            inject_lora(module, text_encoder_target_modules(module), **lora)
    for module in (model.unet, *model.text_encoders):
        module.to(device)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for encoder in text_encoders:
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_unet(model.unet, config.compile, batch_shapes)
    model.unet.train()
    for encoder in model.text_encoders:
        encoder.train(bool(config.train_text_encoder))  # None (unresolved) trains nothing
    model.vae.eval()
    return trainable_parameters(model.unet) + [p for e in text_encoders for p in trainable_parameters(e)]


def cache_text_conditioning(conditioner: Conditioner, captions: list[str], accelerator, dtype: torch.dtype) -> None:
    """Encode every caption the run can draw before training, batched (frozen text encoders, fixed captions), so
    that training never runs the text encoders (`release_text_encoders`)."""
    if not conditioner.cache_outputs:
        return
    from tqdm.auto import tqdm

    with tqdm(total=len(set(captions)), desc="caching text", unit="caption", disable=not accelerator.is_main_process) as bar:
        conditioner.cache(captions, accelerator.device, dtype, progress=bar.update)


def release_text_encoders(conditioner: Conditioner, show: bool) -> None:
    """Let the text encoders go once their outputs are cached: training only reads the cache, and sample grids use
    prompts encoded ahead (`RunOutputs.encode_prompts`). SD1.5's encoder is about 235 MiB in bf16, SDXL's two
    about 1.5 GiB, of host memory on the CPU and of GPU memory on a GPU."""
    if not conditioner.cache_outputs:
        return
    freed = conditioner.release_encoders()
    if show:
        print(f"text encoder outputs cached: text encoders released ({freed / 2**20:.0f} MiB)")


def largest_bucket_batch(dataset, batch_size: int, seed: int) -> tuple[tuple[int, int], dict]:
    """((width, height), batch): the largest batch the loader can yield (pixels x images), as it yields one.
    A bucket's batches hold at most its samples per epoch (kohya repeats included, so images may recur),
    never more: a --batch-size beyond every bucket would otherwise test a batch the run never builds."""
    counts = dataset.bucket_counts()
    bucket = max(counts, key=lambda size: (size[0] * size[1] * min(batch_size, counts[size]), size))
    members = [i for i, b in enumerate(dataset.bucket_of) if b == bucket]
    return bucket, collate([dataset[(members[j % len(members)], seed + j)] for j in range(min(batch_size, counts[bucket]))])


def check_step_memory(trainee: loop.Trainee, objective: loop.Objective, dataset, batch_size: int, seed: int) -> str:
    """One forward and backward pass at the largest bucket before training, so that a run that cannot fit
    fails now (not when that bucket first comes up, maybe hours in), and a line with the run's peak so far, that
    step included (not reset: the run's final peak must still count the caching before it).
    The run is left as it was: no update, gradients cleared, the global and CUDA RNG states restored, and the
    trainee's own generator untouched (the trial draws from a copy)."""
    device = trainee.accelerator.device
    (width, height), batch = largest_bucket_batch(dataset, batch_size, seed)
    trial = dataclasses.replace(trainee, generator=torch.Generator(device=device).manual_seed(seed))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loop.forward_backward(trial, objective, batch, loop.TrainState(), sync=False)
    trainee.optimizer.zero_grad(set_to_none=True)
    images = len(batch["captions"])
    return f"memory check, one step at the largest bucket ({width}x{height}, batch {images}): {memory.describe_peak(device)}"


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """Run with `threads` CPU threads for PyTorch's operations (None: PyTorch's own setting), and put the previous
    count back afterwards, so that a notebook or script that trains keeps its setting."""
    before = torch.get_num_threads()
    if threads is not None:
        cores = os.cpu_count() or 1
        if threads > cores:
            print(f"warning: --threads {threads} is more than the {cores} CPU cores here; threads that share a core wait on "
                  f"each other (use --threads {cores} or fewer)", file=sys.stderr)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
