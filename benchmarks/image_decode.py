"""Decoding phone-sized JPEGs for training: sd_lora's reduced-scale decode against a full decode, in one process.

    python benchmarks/image_decode.py [--images 8] [--size 4032x3024] [--resolution 512] [--repeats 3]

Writes `--images` synthetic photos (gradients and texture, quality 92; every second one progressive, as many
cameras and editors save them) and times, per image, the two places training decodes them:

- the scan's check (`check_image`, 1/8-scale decode of all the data) against the full decode it replaces;
- the load for a `--resolution` bucket (`ImageDataset.load_pixels`) against the same load with the image
  decoded whole (sd_lora before the reduced decode, and what the diffusers example does);

and the images/s of the cache builder's pixel pipeline (two loader threads, as when caching latents), which
is what a GPU's VAE waits on. Medians over images and repeats; the baseline runs in the same process,
interleaved. Last line: `scan_check_speedup=X load_speedup=Y pipeline_images_per_s_ratio=Z`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_lora.data import dataset as dataset_module  # noqa: E402
from sd_lora.data.dataset import DataOptions, ImageDataset  # noqa: E402
from sd_lora.data.images import check_image, open_image  # noqa: E402
from sd_lora.data.latent_cache import _prefetched_pixels  # noqa: E402
from sd_lora.data.scan import scan_dataset  # noqa: E402

from data_scaling import positive  # noqa: E402  (the sibling benchmark's --images/--repeats check)


def size_arg(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 4032x3024, got {text!r}") from None
    if min(width, height) < 64 or width * height > 50_000_000:
        raise argparse.ArgumentTypeError(f"{text}: each side at least 64 px and at most 50 megapixels")
    return width, height


def bucket_resolution(text: str) -> int:
    value = int(text)
    if value < 64 or value % 64:
        raise argparse.ArgumentTypeError(f"a multiple of 64 px (SD's bucket step), got {value}")
    return value


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        texture = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), np.float32)
        gradient = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
        pixels = 0.5 * gradient + 0.5 * texture + rng.normal(0, 6, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"photo_{i:02d}.jpg", quality=92, progressive=i % 2 == 1)
        (folder / f"photo_{i:02d}.txt").write_text("a photo")


def full_decode(path, size):
    """The baseline: the whole picture, as `open_image` decodes it, resized; the same return shape as the reduced one."""
    image = open_image(path)
    return image.resize(size, Image.Resampling.LANCZOS), image.size


REDUCED = dataset_module.open_image_resized


@contextlib.contextmanager
def full_decodes():
    """Inside: `ImageDataset.load_pixels` decodes whole pictures (the baseline); outside: sd_lora's reduced decode."""
    dataset_module.open_image_resized = full_decode
    try:
        yield
    finally:
        dataset_module.open_image_resized = REDUCED


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive, default=8)
    parser.add_argument("--size", type=size_arg, default=(4032, 3024), help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--resolution", type=bucket_resolution, default=512)
    parser.add_argument("--repeats", type=positive, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sd_lora_decode_") as tmp:
        folder = Path(tmp)
        write_photos(folder, args.images, args.size)
        records = scan_dataset(folder).records
        ds = ImageDataset(records, DataOptions(resolution=args.resolution, step=64,  # buckets as the trainer's defaults
                                               min_bucket_side=max(64, args.resolution // 128 * 64),
                                               max_bucket_side=args.resolution * 2))
        plans = [ds.crop_plan(i) for i in range(len(ds))]
        times: dict[str, list[float]] = {k: [] for k in ("check full", "check", "load full", "load")}
        differences = []  # mean |reduced - full| per image, in 8-bit levels
        rates: dict[str, list[float]] = {"full": [], "reduced": []}
        batches = [list(range(i, min(i + 2, len(ds)))) for i in range(0, len(ds), 2)]
        for i in range(len(ds)):
            with full_decodes():
                full = ds.load_pixels(i, plans[i])
            differences.append(float((ds.load_pixels(i, plans[i]) - full).abs().mean()) * 127.5)
        for repeat in range(args.repeats):
            for i, record in enumerate(records):
                times["check full"].append(seconds(lambda: open_image(record.path)))
                times["check"].append(seconds(lambda: check_image(record.path)))
                with full_decodes():
                    times["load full"].append(seconds(lambda: ds.load_pixels(i, plans[i])))
                times["load"].append(seconds(lambda: ds.load_pixels(i, plans[i])))
            for name in ("full", "reduced") if repeat % 2 == 0 else ("reduced", "full"):
                with full_decodes() if name == "full" else contextlib.nullcontext():
                    rates[name].append(len(ds) / seconds(lambda: sum(1 for _ in _prefetched_pixels(ds, batches))))

    median = {k: statistics.median(v) * 1000 for k, v in times.items()}
    rate = {k: statistics.median(v) for k, v in rates.items()}
    bucket = ds.bucket_of[0]
    print(f"{args.images} JPEGs of {args.size[0]}x{args.size[1]} (half progressive), bucket {bucket[0]}x{bucket[1]} "
          f"at --resolution {args.resolution}, {args.repeats} repeats; median ms per image")
    print(f"  scan check : full decode {median['check full']:7.1f}   1/8-scale decode {median['check']:7.1f}")
    print(f"  bucket load: full decode {median['load full']:7.1f}   reduced decode   {median['load']:7.1f}")
    print(f"  the reduced load differs from the full one by {statistics.mean(differences):.2f} levels of 255 on "
          f"average (largest image mean {max(differences):.2f})")
    print(f"  pixel pipeline (2 threads): full {rate['full']:.1f} images/s, reduced {rate['reduced']:.1f} images/s")
    print(f"scan_check_speedup={median['check full'] / median['check']:.2f} "
          f"load_speedup={median['load full'] / median['load']:.2f} "
          f"pipeline_images_per_s_ratio={rate['reduced'] / rate['full']:.2f}")


if __name__ == "__main__":
    main()
