"""s/it, images/s and peak memory of sd_lora's default configuration at batch 1 and at the largest batch that
fits: full-size SD1.5 at 512 px and SDXL at 1024 px (random weights). Written for a CUDA machine (issue 7's
GPU numbers); on a CPU it runs too, with peak RSS against the machine's RAM.

    python benchmarks/batch_sizes.py                                        # sd15 @ 512, sdxl @ 1024
    python benchmarks/batch_sizes.py --models sd15 --config grad-ckpt       # with --gradient-checkpointing
    python benchmarks/batch_sizes.py --models tiny --max-batch 8 --steps 4  # the script itself, CPU, ~1 min

Every run is its own subprocess (`train_speed.py`'s worker for the configuration, `--sample-every 0`), so its
peak memory is its own: on a GPU `max_memory_reserved` (what the allocator held), else the process's VmHWM. The largest
batch is found without trying every size: batches 1 and 2 give the memory one more image costs; the first guess
is the batch whose peak that line puts at --fill of the device's memory (capped at --max-batch); a guess that
runs out of memory is cut by a fifth until one fits. The batch above the largest that fitted is not tried unless
a guess failed, and the table says which. Data: `--max-batch` square images (one bucket), so every batch is full.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import train_speed  # same folder: dataset, random full-size models, the per-configuration worker

MODELS = {  # name -> (train_speed --model, resolution)
    "sd15": ("sd15", 512),
    "sdxl": ("sdxl", 1024),
    "tiny": ("tiny", 64),  # checks this script on a CPU in about a minute
}
OUT_OF_MEMORY = ("OutOfMemoryError", "CUDA out of memory", "DefaultCPUAllocator: can't allocate memory")


def model_folder(args, model: str) -> Path:
    """The diffusers folder `model` trains from, written once under --out."""
    kind, resolution = MODELS[model]
    return train_speed.write_model(kind, args.out / f"{kind}-model", resolution)


def data_root(args) -> Path:
    """Holds `data/`: square images (one bucket), repeated so that the bucket fills a batch of --max-batch."""
    return args.out / f"dataset-max{args.max_batch}"


def train(args, model: str, batch: int) -> dict:
    """One run of `args.config` at `batch`: {"ok", "s_per_it", "images_per_s", "peak_mib", ...} or an OOM."""
    kind, resolution = MODELS[model]
    resolution = args.resolution or resolution
    name = f"{model}-{resolution}px-b{batch}"
    result = args.out / "results" / f"{name}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    command = train_speed.worker_command(args.config, result=result, out=data_root(args), run_dir=args.out / "runs" / name,
                                         model_dir=model_folder(args, model), resolution=resolution, batch_size=batch,
                                         rank=args.rank, steps=args.steps)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=train_speed.ROOT, env={**os.environ, **train_speed.WORKER_ENV},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        killed = done.returncode < 0  # the kernel's OOM killer on a CPU
        if killed or any(marker in done.stderr for marker in OUT_OF_MEMORY):
            return {"batch": batch, "ok": False, "wall_s": wall}
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    out = json.loads(result.read_text())
    s_per_it = statistics.median(out["step_s"][train_speed.WARMUP_STEPS:] or out["step_s"])
    peak = out.get("cuda_reserved_peak_mib", out["peak_rss_mib"])
    return {"batch": batch, "ok": True, "s_per_it": s_per_it, "images_per_s": train_speed.images_per_second(out), "peak_mib": peak,
            "cuda_allocated_peak_mib": out.get("cuda_peak_mib"), "peak_rss_mib": out["peak_rss_mib"],
            "device_total_mib": out.get("cuda_total_mib"), "wall_s": wall}


def first_guess(one: dict, two: dict, total_mib: float, fill: float, max_batch: int) -> int:
    """The batch whose peak the line through batches 1 and 2 puts at `fill` of `total_mib` (pure)."""
    per_image = max(two["peak_mib"] - one["peak_mib"], 1.0)
    fixed = one["peak_mib"] - per_image
    return max(2, min(max_batch, math.floor((fill * total_mib - fixed) / per_image)))


def largest_batch(args, model: str) -> list[dict]:
    """Runs at batch 1, 2 and the largest batch that fits (see the module docstring); returns them in order."""
    runs = [train(args, model, 1)]
    if not runs[0]["ok"] or args.max_batch < 2:  # --max-batch 1: the dataset holds one image, a "batch 2" would train 1
        return runs
    runs.append(train(args, model, 2))
    if not runs[1]["ok"] or args.max_batch <= 2:
        return runs
    total = runs[0]["device_total_mib"] or total_ram_mib()
    guess = first_guess(runs[0], runs[1], total, args.fill, args.max_batch)
    while guess > 2:
        runs.append(train(args, model, guess))
        if runs[-1]["ok"]:
            break
        guess = max(2, math.floor(guess * 0.8))
    return runs


def total_ram_mib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**20


def report(model: str, resolution: int, rank: int, runs: list[dict], max_batch: int) -> dict:
    print(f"\n{model} at {resolution} px, rank-{rank} attn-mlp LoRA")
    total = next((r["device_total_mib"] for r in runs if r.get("device_total_mib")), None)
    print(f"{'batch':>6}{'s/it':>9}{'images/s':>10}{'peak MiB':>10}{'RSS MiB':>9}"
          + (f"   (GPU memory {total:.0f} MiB; peak = CUDA reserved)" if total else "   (peak = RSS)"))
    for r in runs:
        if r["ok"]:
            print(f"{r['batch']:>6}{r['s_per_it']:>9.3f}{r['images_per_s']:>10.2f}{r['peak_mib']:>10.0f}{r['peak_rss_mib']:>9.0f}")
        else:
            print(f"{r['batch']:>6}   out of memory")
    fitted = [r for r in runs if r["ok"]]
    failed = [r["batch"] for r in runs if not r["ok"]]
    best = max(fitted, key=lambda r: r["batch"]) if fitted else None
    if best:
        above = f"batch {min(b for b in failed if b > best['batch'])} did not fit" if any(b > best["batch"] for b in failed) \
            else f"--max-batch {max_batch}: no larger batch tried" if best["batch"] >= max_batch else "the next size up was not tried"
        print(f"largest batch that fitted: {best['batch']} ({above})")
    return {"model": model, "resolution": resolution, "runs": runs, "largest_batch": best["batch"] if best else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sd15,sdxl", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--config", default="default", choices=list(train_speed.CONFIGS), help="sd_lora configuration (train_speed.py)")
    parser.add_argument("--steps", type=int, default=8, help=f"optimizer steps per run; s/it is the median after {train_speed.WARMUP_STEPS}")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--fill", type=float, default=0.9, help="fraction of the device's memory the first guess aims at")
    parser.add_argument("--resolution", type=int, help="one resolution for every model (default: 512 sd15, 1024 sdxl, 64 tiny)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd_lora_batch_sizes"))
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    small = args.rank < 1 or (args.resolution is not None and args.resolution < 1)  # --resolution 0 meant the default
    if unknown or args.steps < 1 or args.max_batch < 1 or small or not 0 < args.fill <= 1:
        parser.error(f"unknown models {unknown}" if unknown else "--steps, --max-batch, --rank and --resolution must be >= 1, --fill in (0, 1]")
    args.out.mkdir(parents=True, exist_ok=True)
    if not (data_root(args) / "data").is_dir():
        train_speed.write_dataset(data_root(args) / "data", count=min(8, args.max_batch), repeats=math.ceil(args.max_batch / 8), square=True)
    # Not train_speed.machine(): asking torch about the GPU here would create a CUDA context in this process and
    # hold some of the memory the runs are sizing their batches against.
    from importlib.metadata import version

    info = {"nproc": os.cpu_count(), "torch": version("torch")}
    print(f"machine: {info['nproc']} CPUs; torch {info['torch']}; config {args.config} (device memory: per run below)")
    started = time.perf_counter()
    summary = {"machine": info, "config": args.config, "models": []}
    for model in models:
        summary["models"].append(report(model, args.resolution or MODELS[model][1], args.rank, largest_batch(args, model), args.max_batch))
    summary["wall_s"] = time.perf_counter() - started
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"total {summary['wall_s']:.0f} s; details in {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
