"""Shared fixtures: tiny models saved as diffusers folders and a small captioned dataset.

Models are built from config in code (`sd_lora.models.tiny`) once per session and loaded by the tests
through the same `--model <folder>` path a user's model takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_dataset

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


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")
