"""`python -m sd_lora.demo`: train a LoRA on `datasets/chars` end to end on a CPU in about a minute.

Interim demo: until the pretrained demo base model ships, the base is a tiny *randomly initialised*
SD1-architecture model built in code (`sd_lora.models.tiny`), so the run exercises the whole product
(scan, buckets, latent cache, LoRA, loop, sample grids, kohya export) but its samples are noise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..models.tiny import save_tiny_model
from ..train import main as train_main

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    out = Path("out/demo")
    data = REPO_ROOT / "datasets" / "chars"
    if not data.is_dir():
        print(f"sd_lora: error: {data} not found; run from a checkout of the repository", file=sys.stderr)
        return 2
    base = out / "base-model"
    if not (base / "model_index.json").is_file():
        print(f"building the tiny base model in {base} ...")
        save_tiny_model(base, family="sd1", seed=0)
    args = [
        "--data", str(data), "--model", str(base), "--output-dir", str(out), "--output-name", "zkchar",
        "--resolution", "64", "--batch-size", "4", "--max-steps", "60", "--learning-rate", "1e-3",
        "--rank", "8", "--sample-every", "20", "--sample-steps", "10", "--flip",
    ]
    return train_main(args + list(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
