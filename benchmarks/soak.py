"""Soak test: thousands of optimizer steps on a tiny model; memory must stay flat.

    python benchmarks/soak.py [--steps 3000] [--out /tmp/sd_lora_soak]

Trains the tiny SD1 model on a generated dataset through the real CLI (sampling every 500 steps, a state
save every 1000, validation every 250, so every periodic path runs many times), then reads the RSS that
every metrics.jsonl line records and prints it at the start of training, the median of each tenth of the
run and the end, plus a least-squares slope in MiB per 1000 steps. A leak shows up as a steady slope.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import write_dataset  # noqa: E402

from sd_lora.models.tiny import save_tiny_model  # noqa: E402
from sd_lora.train import main as train_main  # noqa: E402


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd_lora_soak"))
    args = parser.parse_args()
    if args.steps < 3:
        parser.error(f"--steps {args.steps}: must be 3 or more (the slope is fitted to the steps after the first tenth)")
    for folder in ("data", "model", "run"):  # what this script writes: --out itself may hold other files (--out .)
        shutil.rmtree(args.out / folder, ignore_errors=True)
    data = write_dataset(args.out / "data", count=12)
    model = save_tiny_model(args.out / "model")
    started = time.perf_counter()
    code = train_main([
        "--data", str(data), "--model", str(model), "--output-dir", str(args.out / "run"), "--resolution", "32",
        "--batch-size", "2", "--rank", "4", "--max-steps", str(args.steps), "--sample-every", "500", "--sample-steps", "2",
        "--save-state-every", "1000", "--validation-split", "0.2", "--validate-every", "250", "--flip", "--shuffle-tags",
    ])
    seconds = time.perf_counter() - started
    if code:
        return code
    records = [json.loads(line) for line in (args.out / "run" / "metrics.jsonl").read_text().splitlines()]
    points = [(r["step"], r["rss_mb"]) for r in records if "loss" in r]
    tenth = max(1, len(points) // 10)
    medians = [statistics.median(rss for _, rss in points[i:i + tenth]) for i in range(0, len(points), tenth)]
    settled = points[tenth:]  # the first tenth includes allocator warm-up
    print(f"steps: {len(points)} in {seconds:.0f} s ({seconds / len(points) * 1000:.0f} ms/step incl. sampling/saves)")
    print(f"rss MiB: first step {points[0][1]:.1f}, end {points[-1][1]:.1f}, peak {max(r for _, r in points):.1f}")
    print("rss MiB median per tenth: " + ", ".join(f"{m:.1f}" for m in medians))
    print(f"slope after warm-up: {slope_per_1000(settled):+.2f} MiB per 1000 steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
