"""SD1.5's 3x3 convolution shapes against the matmul peak, per dtype and memory format, in one process.

    OMP_NUM_THREADS=1 python benchmarks/conv_peak.py

Explains `train_speed.py`'s peak fractions: whether the U-Net step's largest operations reach the matmul peak
by themselves (forward, no grad, batch 1; median of 10 calls after 2 warm-up calls). Prints GFLOP/s and the
fraction of a 3072^3 `torch.mm` in the same dtype, measured first.
"""

from __future__ import annotations

import statistics
import time

import torch

SHAPES = ((320, 64), (640, 32), (1280, 16), (1280, 8))  # (channels, side): SD1.5's levels at 512 px
MM_SIDE = 3072


def median_seconds(fn, calls: int = 10) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(MM_SIDE, MM_SIDE, dtype=dtype), torch.randn(MM_SIDE, MM_SIDE, dtype=dtype)
        peak = 2 * MM_SIDE**3 / median_seconds(lambda: a @ b) / 1e9
        print(f"{dtype}: mm {MM_SIDE}^3 {peak:.0f} GFLOP/s")
        for channels, side in SHAPES:
            for channels_last in (False, True):
                conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype).requires_grad_(False)
                x = torch.randn(1, channels, side, side, dtype=dtype)
                if channels_last:
                    conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    rate = 2 * channels * channels * 9 * side * side / median_seconds(lambda: conv(x)) / 1e9
                layout = "channels_last" if channels_last else "NCHW"
                print(f"  conv3x3 {channels} ch {side}x{side} {layout:<13}: {rate:7.0f} GFLOP/s = {rate / peak:.2f} x mm peak")


if __name__ == "__main__":
    main()
