"""Peak RSS of loading a diffusers U-Net into bf16: diffusers' loader against sd_lora's tensor-by-tensor reader.

    python benchmarks/load_peak.py [--model-dir DIR] [--out /tmp/sd_lora_train_speed]

Without --model-dir it uses (and writes once, 4 GiB) the full-size SD1.5 folder with random fp32 weights that
`train_speed.py --model sd15` uses. Each way of loading runs in its own subprocess (peak RSS is that process's
VmHWM, imports included: `sd_lora.memory.peak_rss_bytes`):

- `from_pretrained+cast`: `UNet2DConditionModel.from_pretrained(...)` in fp32, then `.to(bfloat16)` (what
  sd_lora did before `models/streaming.py`);
- `from_pretrained(torch_dtype)`: diffusers casting while it loads;
- `streamed`: `sd_lora.models.streaming.load_cast`.

The last line is `streamed_peak_rss_ratio_vs_from_pretrained=X`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

WAYS = ("from_pretrained+cast", "from_pretrained(torch_dtype)", "streamed")


def load(way: str, folder: Path) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from sd_lora.memory import peak_rss_bytes
    from sd_lora.models.streaming import load_cast

    start = time.perf_counter()
    if way == "from_pretrained+cast":
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").to(torch.bfloat16)
    elif way == "from_pretrained(torch_dtype)":
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=torch.bfloat16)
    else:
        unet = load_cast(UNet2DConditionModel, folder / "unet", torch.bfloat16)
        if unet is None:
            raise SystemExit(f"{folder}/unet: not a layout the streaming reader handles")
    seconds = time.perf_counter() - start
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    return {"way": way, "seconds": seconds, "peak_rss_mib": peak_rss_bytes() / 2**20,
            "parameters": sum(p.numel() for p in unet.parameters())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a diffusers folder (default: the random SD1.5 one under --out)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd_lora_train_speed"))
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(load(args.worker, args.model_dir)))
        return 0

    folder = args.model_dir
    if folder is not None and not (folder / "unet" / "config.json").is_file():
        parser.error(f"--model-dir {folder}: not a diffusers model folder (needs unet/config.json)")
    if folder is None:
        from train_speed import save_sd15_model  # same folder as this script

        folder = args.out / "sd15-model"
        if not (folder / "model_index.json").is_file():
            args.out.mkdir(parents=True, exist_ok=True)
            save_sd15_model(folder)
    results = {}
    for way in WAYS:
        proc = subprocess.run([sys.executable, __file__, "--worker", way, "--model-dir", str(folder)],
                              capture_output=True, text=True, check=True)
        results[way] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[way]
        print(f"{way:<30} {r['peak_rss_mib']:8.0f} MiB peak  {r['seconds']:6.1f} s  ({r['parameters'] / 1e6:.0f}M parameters)")
    ratio = results["streamed"]["peak_rss_mib"] / results["from_pretrained+cast"]["peak_rss_mib"]
    print(f"streamed_peak_rss_ratio_vs_from_pretrained={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
