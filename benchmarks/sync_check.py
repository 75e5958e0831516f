"""Host/device synchronisations inside sd_lora's training steps, counted on a CUDA GPU.

    python benchmarks/sync_check.py [--model tiny|sd15|sdxl] [--resolution 64] [--steps 6] [--out /tmp/sd_lora_sync_check]

Trains the default configuration (no sampling, saving or validation: those wait for the GPU on purpose)
with `torch.cuda.set_sync_debug_mode("warn")` on from the end of step 2 until the loop returns, so that every
call that makes the host wait for the GPU (`.item()`, a blocking copy, `cudaStreamSynchronize`) inside
the later steps is reported where it happened. sd_lora's loop should show none per step; the loop's last
read of the final step's numbers is expected once. The last line is `syncs_per_step=X` over the watched steps.

No CUDA device: says so and exits 2 (the CPU has nothing to wait for; tests/test_loop.py checks the
loop's reads on the CPU instead).
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import write_dataset, write_model  # noqa: E402

WATCH_FROM = 2  # steps 1-2 build caches, compile kernels and allocate: syncs there are one-off


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15", "sdxl"), default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd_lora_sync_check"))
    args = parser.parse_args()
    if args.steps <= WATCH_FROM:
        parser.error(f"--steps must be more than {WATCH_FROM}: the first {WATCH_FROM} steps are not watched")
    if args.resolution < 1:  # 0 wrote the model at its default size, then sd_lora's config check failed in a traceback
        parser.error(f"--resolution {args.resolution}: must be 1 or more")

    import torch

    if not torch.cuda.is_available():
        print("sync_check.py needs a CUDA GPU: on the CPU nothing waits for a device", file=sys.stderr)
        return 2
    from sd_lora import loop, outputs
    from sd_lora.config import load_config
    from sd_lora.train import run

    data = write_dataset(args.out / "data", count=8)
    model = write_model(args.model, args.out / f"{args.model}-model", args.resolution)
    caught: list[warnings.WarningMessage] = []

    original_end, original_train = outputs.RunOutputs.on_step_end, loop.train

    def on_step_end(self, state):
        original_end(self, state)
        if state.step == WATCH_FROM:
            torch.cuda.set_sync_debug_mode("warn")

    def watched_train(*a, **kw):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                return original_train(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                caught.extend(w for w in seen if "synchroniz" in str(w.message))

    outputs.RunOutputs.on_step_end = on_step_end
    loop.train = watched_train  # train.py calls loop.train through the module
    run(load_config(["--data", str(data), "--model", str(model), "--output-dir", str(args.out / "run"),
                     "--resolution", str(args.resolution), "--max-steps", str(args.steps), "--sample-every", "0", "--seed", "0"]))
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught)
    watched = args.steps - WATCH_FROM
    print(f"{args.model} at {args.resolution} px, steps {WATCH_FROM + 1}-{args.steps} watched on {torch.cuda.get_device_name()}:")
    for place, count in where.most_common():
        print(f"  {count:4d}  {place}")
    print(f"syncs_per_step={len(caught) / watched:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
