"""Tiny images written with Pillow into tmp_path; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_image(path: Path, size=(32, 32), color=(128, 128, 128), fmt: str | None = None) -> Path:
    """A solid RGB image at `path` (parents created); the format follows the suffix unless `fmt` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_halves(path: Path, size: tuple[int, int]) -> Path:
    """Left half red, right half blue: shows where a flip or rotation put things."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2:] = BLUE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def photo(path, size, orientation=None):
    """A JPEG with smooth gradients and texture (a stand-in for a photo), stored at `size` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    texture = np.asarray(Image.effect_noise((width // 8, height // 8), 60).resize(size, Image.Resampling.BICUBIC))
    pixels = np.stack([x * 255 / width, y * 255 / height, texture], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=92, exif=exif)
    return path


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Three aspect ratios under kohya repeat folders, with sidecar captions."""
    root = tmp_path / "data"
    write_halves(root / "2_zk" / "wide.png", (96, 48))
    write_text(root / "2_zk" / "wide.txt", "zk, red, blue, wide")
    write_halves(root / "2_zk" / "square.png", (64, 64))
    write_text(root / "2_zk" / "square.txt", "zk, square")
    write_halves(root / "1_tall" / "tall.png", (48, 96))
    write_text(root / "1_tall" / "tall.txt", "tall")
    return root
