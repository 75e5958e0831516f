"""Fixtures for LoRA tests: fresh tiny Stable Diffusion pipelines (real architectures, built in code)."""

from __future__ import annotations

import pytest
import torch

from sd_lora.models.tiny import build_tiny_pipeline, write_clip_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def make_pipe(tokenizer_dir):
    """`make_pipe("sd1" | "sd2")`: a fresh tiny pipeline; the same seed gives the same base weights."""

    def make(family: str, seed: int = 0):
        return build_tiny_pipeline(family, seed=seed, tokenizer_dir=tokenizer_dir)

    return make


@pytest.fixture
def unet_inputs():
    """Fixed U-Net inputs for the tiny models: latents (1, 4, 8, 8), timestep, text states (1, 8, 32)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 8, 32, generator=g)


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, 300, (1, 77), generator=g)
