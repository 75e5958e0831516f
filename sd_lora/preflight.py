"""Before training: the checks a run makes while nothing slow has happened yet (options that need the
machine, the output folder, the prompt file, captions, free space), the clean-up of what a killed run left
half-written, and the summary it prints.

The checks raise a `UserError` that names the option or file and the fix; none needs more of the model than
its tokenizer.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import is_state_name
from .config import TrainConfig
from .data import ImageDataset
from .data.latent_cache import remove_abandoned_entries
from .errors import UserError
from .fsio import remove_abandoned
from .models.load import BaseModel
from .models.text import too_long
from .precision import cpu_has_bf16
from .sampling.prompts import read_prompt_file
from .sampling.samplers import zero_snr_problem


def check_precision(config: TrainConfig) -> None:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use --mixed-precision bf16, no or auto")
    if config.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        print("warning: --mixed-precision bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): PyTorch computes "
              "bf16 here in a slow fallback, from a few times slower than fp32 on a tiny model to about 100x for full-size "
              "convolutions. --mixed-precision auto or no trains in fp32, the fastest precision this CPU has.", file=sys.stderr)
    # torch.cuda.is_bf16_supported() alone says yes on every CUDA GPU: pre-Ampere ones (T4, V100) emulate bf16.
    if config.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        print(f"warning: --mixed-precision bf16 on a {torch.cuda.get_device_name()}, which has no bf16 arithmetic (it came with "
              "Ampere, compute capability 8.0): PyTorch emulates it, slower than fp16. --mixed-precision auto picks fp16, with "
              "a loss scaler, on this GPU", file=sys.stderr)


def check_xformers(config: TrainConfig) -> None:
    """--xformers needs the package and a CUDA GPU (its attention kernels run on CUDA only): refused before the model
    loads, not when the U-Net's attention is switched over."""
    if not config.xformers:
        return
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise UserError("--xformers needs the xformers package: pip install 'sd_lora[xformers]' (CUDA GPUs), or drop --xformers to use PyTorch SDPA") from None
    if not torch.cuda.is_available():
        raise UserError("--xformers runs on CUDA GPUs only; on this device drop --xformers to use PyTorch SDPA")


def check_output_dir(path: Path, flag: str = "--output-dir") -> None:
    """Create `path` if needed and write a file there, so that a folder the run cannot write is found before any
    model loads (`flag` names the option in the error)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".sd_lora_write_test.{os.getpid()}"  # per process: ranks probe at once
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose a writable folder") from None


SHOWN_REMOVED = 3  # removed temporaries named in the line; the rest are counted


def remove_abandoned_saves(config: TrainConfig, started: float) -> str | None:
    """Delete what an earlier run killed mid-save (`kill -9`, the OOM killer, a power cut) left half-written in the
    folders this run writes: the hidden `.<name>.XXXXXXXX.tmp` temporaries of LoRA files, training states, config.toml
    and metrics.jsonl in --output-dir, of sample grids, and of --latent-cache-dir's entries. `fsio.remove_abandoned`
    decides which are abandoned (never one a live writer holds, such as another run's in a shared folder); `started` is
    when this process started. Call it on the main process only. Returns the line that says what went and the space
    freed, or None when nothing did."""
    removed = remove_abandoned(config.output_dir, owns=_run_output, before=started)
    removed += remove_abandoned(config.samples_dir, owns=lambda name: name.endswith(".png"), before=started)
    if config.latent_cache_dir is not None:
        removed += remove_abandoned_entries(config.latent_cache_dir, started)
    if not removed:
        return None
    names = ", ".join(str(path) for path, _ in removed[:SHOWN_REMOVED])
    more = f" and {len(removed) - SHOWN_REMOVED} more" if len(removed) > SHOWN_REMOVED else ""
    saves = "half-written save" if len(removed) == 1 else "half-written saves"
    return f"removed {len(removed)} {saves} that a killed run left behind, freeing {_size(sum(n for _, n in removed))}: {names}{more}"


def _run_output(name: str) -> bool:
    """Whether a run writes files named `name` in --output-dir: LoRA files, state folders, config.toml, metrics.jsonl."""
    return name.endswith(".safetensors") or is_state_name(name) or name in ("config.toml", "metrics.jsonl")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def read_sample_prompts(config: TrainConfig):
    """The --sample-prompts file, parsed and its sizes checked (None: sample with the dataset's captions).

    A bad prompt file is an option problem: it is read before the model loads.
    """
    return read_prompt_file(config.sample_prompts) if config.sample_prompts else None


def check_zero_snr_samplers(config: TrainConfig, prompts, scheduler_config) -> None:
    """Refuse the samplers that would draw a zero-terminal-SNR model's grids on the wrong noise schedule
    (`samplers.ZERO_SNR_SAMPLERS`): --sample-sampler when a row uses it, and each prompt line's own --ss."""
    if not (config.sampling and scheduler_config.get("rescale_betas_zero_snr")):
        return
    used: dict[str, str] = {}  # sampler -> where it is set (its first place)
    if not prompts or any(p.sampler is None for p in prompts):
        used[config.sample_sampler] = f"--sample-sampler {config.sample_sampler}"
    for prompt in prompts or []:
        if prompt.sampler:
            used.setdefault(prompt.sampler, f"{config.sample_prompts}: --ss {prompt.sampler} (prompt {prompt.prompt!r})")
    problems = [f"{where}: {problem}" for name, where in used.items() if (problem := zero_snr_problem(name))]
    if problems:
        raise UserError("\n".join(problems))


def summary(config: TrainConfig, scan, dataset: ImageDataset, batches: int, steps_per_epoch: int, total_steps: int, epochs: int,
            n_params: int, model: BaseModel, n_validation: int = 0, processes: int = 1, targets: str | None = None) -> str:
    """The run as it will train. `targets`: the U-Net's LoRA modules when not --targets' (an --init-weights file's)."""
    bytes_per = {"fp32": 4, "fp16": 2, "bf16": 2}[config.save_precision]
    repeats = sum(r.repeats for r in dataset.records)
    prior = [r for r in dataset.records if r.prior]
    buckets = dataset.bucket_counts()
    bucket_text = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items(), key=lambda kv: -kv[1])[:8])
    if len(buckets) > 8:
        bucket_text += f", ... ({len(buckets)} buckets)"
    lines = [
        f"model: {model.name} ({model.family}, {model.prediction_type}, native {model.native_resolution}px)",
        f"images: {len(dataset.records) - len(prior)} ({repeats - sum(r.repeats for r in prior)} per epoch with repeats), skipped: {len(scan.skipped)}"
        + (f", validation: {n_validation}" if n_validation else "")
        + (f"; regularisation: {len(prior)} ({sum(r.repeats for r in prior)} per epoch)" if prior else ""),
        f"buckets: {bucket_text}",
        f"batch size: {config.batch_size} x {config.gradient_accumulation_steps} accumulation x {processes} processes; {batches} batches/epoch",
        f"steps per epoch: {steps_per_epoch}, total steps: {total_steps} ({epochs} epochs)",
        f"LoRA: rank {config.rank}, alpha {config.effective_alpha:g}, targets {targets or config.targets}"
        + ((" + text encoders" if model.family == "sdxl" else " + text encoder") if config.train_text_encoder else ""),
        f"trainable parameters: {n_params:,}; expected file size: {n_params * bytes_per / 2**20:.2f} MiB ({config.save_precision})",
        f"latent cache: {'on' if config.cache_latents else 'off'}; mixed precision: {config.mixed_precision}; CPU threads: {torch.get_num_threads()}",
    ]
    return "\n".join(lines)


def warn_long_captions(tokenizer, captions: list[str], max_tokens: int | None = None) -> None:
    """Captions longer than the text encoder reads (77 tokens, or --max-token-length + 2) lose their end: said
    once, before training."""
    _warn_long(tokenizer, captions, max_tokens, "captions")


def warn_long_sample_prompts(tokenizer, prompts, max_tokens: int | None, source) -> None:
    """The same for a prompt file's prompts and negative prompts, which the sample grids cut as training cuts
    captions (silently on the --clip-skip and --max-token-length paths, where diffusers does not warn)."""
    texts = [text for p in prompts for text in (p.prompt, p.negative) if text]
    _warn_long(tokenizer, texts, max_tokens, f"prompts and negative prompts in {source}")


def _warn_long(tokenizer, texts: list[str], max_tokens: int | None, what: str) -> None:
    long = too_long(tokenizer, texts, max_tokens)
    if long:
        caption, tokens = max(long.items(), key=lambda item: item[1])
        shown = caption if len(caption) <= 80 else caption[:77] + "..."
        if max_tokens in (None, 75):
            reads = f"the {tokenizer.model_max_length} tokens the text encoder reads"
            fix = "shorten them, put what matters first or pass --max-token-length 150 or 225"
        else:
            reads = f"--max-token-length {max_tokens} ({max_tokens + 2} tokens with the start and end tokens)"
            fix = "shorten them or put what matters first" + (" or pass --max-token-length 225" if max_tokens < 225 else "")
        print(f"warning: {len(long)} of {len(set(texts))} {what} are longer than {reads}, and lose their end (the longest, "
              f"{tokens} tokens: {shown!r}); {fix}", file=sys.stderr)


def check_free_space(path: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise UserError(f"--output-dir {path}: only {free / 2**20:.0f} MiB free, the run needs about {needed_bytes / 2**20:.0f} MiB; free some space or choose another folder")


def check_epoch_schedules(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> None:
    """--save-every-epochs and --sample-every-epochs must reach an epoch end before the last step (whose file
    and grid are the final ones, as kohya's last epoch), or they would do nothing."""
    ends_before_last = (total_steps - 1) // steps_per_epoch  # epoch e ends at step e * steps_per_epoch
    run = f"the run has {total_steps} steps, {steps_per_epoch} per epoch"
    problems = []
    for flag, every, final in (("--save-every-epochs", config.save_every_epochs, f"{config.output_name}.safetensors"),
                               ("--sample-every-epochs", config.sample_every_epochs, "the end's grid")):
        if every and every > ends_before_last:
            fix = f"use 1 to {ends_before_last}" if ends_before_last else "train more than one epoch"
            problems.append(f"{flag} {every}: {run}, so no epoch before the last one ends on a multiple of {every} (the last "
                            f"epoch's is {final}); {fix}, or drop {flag}")
    if problems:
        raise UserError("\n".join(problems))
