"""Where a training run's resident memory goes, phase by phase: sd_lora's default configuration or the naive
loop of `train_speed.py`, in this process, with RSS sampled every 2 ms.

    python benchmarks/rss_phases.py default --out /tmp/ts_rss           # sd_lora: imports, load, caches, check, steps
    python benchmarks/rss_phases.py naive --out /tmp/ts_rss             # the diffusers-example loop
    python benchmarks/rss_phases.py default --out /tmp/ts_rss --square  # one 64x64 bucket, as the naive loop trains
    python benchmarks/rss_phases.py default --out /tmp/ts_sd15 --model sd15 --resolution 256 --batch-size 1 --steps 6

`--out` is a `train_speed.py` output folder (its tiny model and dataset are written there if missing). Each line
is a phase boundary: VmRSS, its anonymous part (heap: Python objects, tensors, allocator caches) and its
file-backed part (shared-library code and mapped files), the highest sampled RSS so far, and the number of
imported modules. At the end, `malloc_trim(0)` shows how much of the anonymous part was free memory that glibc
kept rather than live objects. Run with `MALLOC_TRIM_THRESHOLD_=0` to see live memory only (slower steps: every
large tensor is then a fresh mapping).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_speed  # noqa: E402


def status_mib() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile of this process in MiB (/proc/self/status)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


class Recorder:
    """Samples VmRSS in a thread; `mark(name)` records a phase boundary."""

    def __init__(self, interval_s: float = 0.002):
        self.started = time.perf_counter()
        self.peak, self.marks, self.interval_s = 0.0, [], interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_mib()["VmRSS"])
            time.sleep(self.interval_s)

    def mark(self, name: str) -> None:
        now = status_mib()
        self.peak = max(self.peak, now["VmRSS"])
        self.marks.append((time.perf_counter() - self.started, name, now, self.peak, len(sys.modules)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def table(self) -> str:
        lines = [f"{'s':>7}  {'phase':<32}{'RSS':>8}{'anon':>8}{'file':>8}{'peak':>8}{'modules':>9}"]
        for t, name, now, peak, modules in self.marks:
            lines.append(f"{t:7.2f}  {name:<32}{now['VmRSS']:8.1f}{now['RssAnon']:8.1f}{now['RssFile']:8.1f}{peak:8.1f}{modules:9d}")
        return "\n".join(lines)


def instrument(recorder: Recorder, naive: bool) -> None:
    """Phase marks: every listed sd_lora set-up function (before and after), and optimizer steps 1-6, 12, 24."""
    import torch

    step, count = torch.optim.AdamW.step, [0]

    def counted_step(self, *a, **kw):
        out = step(self, *a, **kw)
        count[0] += 1
        if count[0] <= 6 or count[0] % 12 == 0:
            recorder.mark(f"after optimizer step {count[0]}")
        return out

    torch.optim.AdamW.step = counted_step
    init = torch.optim.AdamW.__init__

    def marked_init(self, *a, **kw):
        recorder.mark("optimizer created")
        init(self, *a, **kw)

    torch.optim.AdamW.__init__ = marked_init
    if naive:
        return
    from sd_lora import outputs, train

    def wrap(owner, name: str) -> None:
        original = getattr(owner, name)

        def marked(*a, **kw):
            recorder.mark(f"before {name}")
            out = original(*a, **kw)
            recorder.mark(f"after {name}")
            return out

        setattr(owner, name, marked)

    for name in ("load_base_model", "prepare_models", "build_latent_cache", "build_validation", "cache_text_conditioning",
                 "release_text_encoders", "check_step_memory"):
        wrap(train, name)
    wrap(outputs.RunOutputs, "sample")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", choices=("naive", "default"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd_lora_train_speed"))
    parser.add_argument("--square", action="store_true", help="train on the square dataset: one bucket, full batches")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny",
                        help="sd15: the full-size SD1.5 architecture with random weights (use --resolution 256)")
    args = parser.parse_args()
    small = [f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()
             if name in ("steps", "resolution", "batch_size", "rank") and value < 1]
    if small:
        parser.error(f"{', '.join(small)}: must be 1 or more")

    recorder = Recorder()
    recorder.mark("start")
    import torch  # both loops start with it

    recorder.mark(f"torch {torch.__version__} imported")
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = train_speed.write_model(args.model, train_speed.model_folder(args.out, args.model))
    data = train_speed.dataset_dir(args.out, args.square)
    worker = argparse.Namespace(out=args.out, data=data, model_dir=args.model_dir, run_dir=args.out / "runs" / f"rss-{args.config}",
                                resolution=args.resolution, batch_size=args.batch_size, rank=args.rank, steps=args.steps,
                                profile=False)
    instrument(recorder, args.config == "naive")
    if args.config == "naive":
        result = train_speed.worker_naive(worker)
    else:
        result = train_speed.worker_sd_lora(worker, train_speed.CONFIGS["default"], None)
    recorder.mark("run returned")
    gc.collect()
    recorder.mark("gc.collect()")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        recorder.mark("malloc_trim(0)")
    except (OSError, AttributeError):  # not glibc
        pass
    recorder.stop()
    print(recorder.table())
    print(f"{args.config}{' (square data)' if args.square else ''}: peak RSS {result['peak_rss_mib']:.1f} MiB (VmHWM), "
          f"median s/step {sorted(result['step_s'])[len(result['step_s']) // 2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
