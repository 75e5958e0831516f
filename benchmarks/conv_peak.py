"""SD1.5's 3x3 convolution shapes against the matmul peak, per dtype and memory format, in one process.

    OMP_NUM_THREADS=1 python benchmarks/conv_peak.py

Explains `train_speed.py`'s peak fractions: whether the U-Net step's largest operations reach the matmul peak
by themselves (forward, no grad, batch 1; median of 10 calls after a warm-up call). Prints GFLOP/s and the
fraction of the matmul peak in the same dtype (`train_speed.matmul_peak_gflops`: the faster of `torch.mm` and
oneDNN's matmul at 3072^3), measured first.
"""

from __future__ import annotations

import argparse

import torch

from train_speed import matmul_peak_gflops, median_seconds

SHAPES = ((320, 64), (640, 32), (1280, 16), (1280, 8))  # (channels, side): SD1.5's levels at 512 px


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no options: --help, and typos refused
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        peak = matmul_peak_gflops(dtype, torch.device("cpu"))
        print(f"{dtype}: matmul peak {peak:.0f} GFLOP/s")
        for channels, side in SHAPES:
            for channels_last in (False, True):
                conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype).requires_grad_(False)
                x = torch.randn(1, channels, side, side, dtype=dtype)
                if channels_last:
                    conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    rate = 2 * channels * channels * 9 * side * side / median_seconds(lambda: conv(x), 10, x.device) / 1e9
                layout = "channels_last" if channels_last else "NCHW"
                print(f"  conv3x3 {channels} ch {side}x{side} {layout:<13}: {rate:7.0f} GFLOP/s = {rate / peak:.2f} x matmul peak")


if __name__ == "__main__":
    main()
