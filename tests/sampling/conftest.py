"""Tiny SD pipelines shared by the sampling tests (built in code, nothing downloaded)."""

from __future__ import annotations

import pytest


def _sampling_pipe(family: str, sampler: str = "ddim"):
    from sd_lora.models.tiny import build_tiny_pipeline
    from sd_lora.sampling.sampler import build_sampling_pipeline

    tiny = build_tiny_pipeline(family)
    return build_sampling_pipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=tiny.unet,
        scheduler_config=tiny.scheduler.config,
        sampler=sampler,
    )


@pytest.fixture(scope="module")
def sd1_pipe():
    return _sampling_pipe("sd1")


@pytest.fixture(scope="module")
def sd2v_pipe():
    return _sampling_pipe("sd2-v")


@pytest.fixture
def fresh_sd1_pipe():
    """A pipeline of its own, for tests that change module dtypes or modes."""
    return _sampling_pipe("sd1")
