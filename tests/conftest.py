"""Shared fixtures: tiny models saved as diffusers folders and a small captioned dataset.

Models are built from config in code (`sd_lora.models.tiny`) once per session and loaded by the tests
through the same `--model <folder>` path a user's model takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the network
# Idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning threads slowed small linear
# algebra (SVDs, tiny convolutions) by up to 10x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sd_lora.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd1", family="sd1")


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory) -> Path:
    from sd_lora.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd2-v", family="sd2-v")


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory) -> Path:
    from sd_lora.models.tiny import save_tiny_sdxl_model

    return save_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def write_dataset(root: Path, count: int = 6, repeats: int = 2, sizes=((48, 64), (64, 48), (64, 64))) -> Path:
    """`root/<repeats>_zkchar/` with `count` drawn images of varied sizes and .txt captions."""
    import random

    from PIL import Image, ImageDraw

    folder = root / f"{repeats}_zkchar"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    colours = ["red", "blue", "green", "yellow"]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        bg = rng.choice(colours)
        image = Image.new("RGB", (w, h), bg)
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill="orange")
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"zkchar, orange circle, {bg} background")
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")
