"""How the data stages before training grow with the number of images: each timed at N and at 4N in one process.

    python benchmarks/data_scaling.py [--images 1000] [--repeats 2]

Writes tiny captioned PNGs (kohya `N_name` folders of 20 images: .txt captions, a metadata.jsonl, uncaptioned
ones) and, for N and 4N images, times the folder scan, bucketing, the resume fingerprint, the `ss_*` metadata,
one epoch of the batch sampler, a disk latent cache build (flips on, a pooling stand-in for the VAE) and its
reuse, and a kohya dataset config with one [[datasets]] per two folders: its scan, and the is_reg balancing
(with the subsets' labels).
Each stage prints seconds at N and 4N and `growth` = t(4N) / (4 t(N)): about 1 for work linear in the images,
4 for quadratic (timings on a busy machine move; the best of `--repeats`). Last line:
`worst_growth=X (stage)`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_lora.data import (BucketBatchSampler, DataOptions, ImageDataset, build_latent_cache, dataset_metadata,  # noqa: E402
                          fingerprint, scan_dataset)
from sd_lora.data.kohya_dataset_config import balance_regularization, read_dataset_config, scan_subsets  # noqa: E402

PER_FOLDER = 20
OPTIONS = DataOptions(resolution=64, step=16, min_bucket_side=32, max_bucket_side=128, flip=True)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def write_images(root: Path, n: int) -> Path:
    sizes = [(32, 32), (48, 32), (32, 48), (64, 32), (32, 64)]
    blobs = []
    for i, size in enumerate(sizes):
        buffer = io.BytesIO()
        Image.new("RGB", size, (40 * i, 100, 200)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    for i in range(n):
        f = i // PER_FOLDER
        folder = root / f"{f % 3 + 1}_concept{f}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(blobs[i % len(blobs)])
        caption = f"concept{f}, tag{i % 97}, tag{i % 13}"
        if f % 3 == 0:
            with open(folder / "metadata.jsonl", "a") as metadata:
                metadata.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
        elif f % 3 == 1 or i % 2:
            (folder / f"{i}.txt").write_text(caption)
    return root


def pooled(pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 4, H/8, W/8)
    x = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([x, x.mean(1, keepdim=True)], dim=1)


def stages(root: Path, work: Path) -> dict[str, float]:
    times: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - start
        return out

    records = timed("scan", lambda: scan_dataset(root)).records
    dataset = timed("buckets", lambda: ImageDataset(records, OPTIONS))
    timed("fingerprint", lambda: fingerprint(records))
    timed("ss_metadata", lambda: (dataset_metadata(records), json.dumps(dataset.bucket_info())))

    def epoch():
        sampler = BucketBatchSampler(dataset.bucket_of, [r.repeats for r in records], 4, seed=0)
        sampler.set_epoch(1)
        return sum(1 for _ in sampler)
    timed("sampler_epoch", epoch)
    disk = {"cache_dir": Path(tempfile.mkdtemp(dir=work)), "vae_id": "pooled"}
    timed("latent_cache_build", lambda: build_latent_cache(dataset, pooled, batch_size=16, progress=False, **disk))
    timed("latent_cache_reuse", lambda: build_latent_cache(dataset, pooled, batch_size=16, progress=False, **disk))
    folders = sorted({r.path.parent for r in records})
    config = work / f"{root.name}.toml"
    tables = []
    for i, folder in enumerate(folders):  # [[datasets]] of two folders: the second's images regularise the first's
        tables.append(("[[datasets]]\n" if i % 2 == 0 else "") + f"[[datasets.subsets]]\nimage_dir = '{folder}'\n"
                      + ("is_reg = true\n" if i % 2 else ""))
    config.write_text("[general]\ncaption_extension = '.txt'\n" + "".join(tables))

    def kohya():
        kohya_config = read_dataset_config(config)
        return (kohya_config, scan_subsets(kohya_config, prior=False, caption_extension=".txt").records,
                scan_subsets(kohya_config, prior=True, caption_extension=".txt").records)
    kohya_config, train, prior = timed("kohya_config_scan", kohya)
    timed("kohya_is_reg_balance", lambda: balance_regularization(kohya_config, train, prior))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive, default=1000, help="N: the smaller dataset (the larger has 4N)")
    parser.add_argument("--repeats", type=positive, default=2, help="runs of each size; the best time counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = {n: write_images(work / f"n{n}", n) for n in (args.images, 4 * args.images)}
        best: dict[int, dict[str, float]] = {n: {} for n in roots}
        for _ in range(args.repeats):
            for n, root in roots.items():
                for name, seconds in stages(root, work).items():
                    best[n][name] = min(seconds, best[n].get(name, seconds))
    small, large = best[args.images], best[4 * args.images]
    growth = {name: large[name] / (4 * small[name]) for name in small}
    for name in small:
        print(f"{name:20s} N={args.images}: {small[name]:7.3f} s  4N: {large[name]:7.3f} s  growth {growth[name]:.2f}")
    worst = max(growth, key=growth.get)
    print(f"worst_growth={growth[worst]:.2f} ({worst})")


if __name__ == "__main__":
    main()
