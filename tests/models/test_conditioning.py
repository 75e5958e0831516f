"""Text conditioning: the caption cache is filled up front, batched, and equals fresh encoding."""

from __future__ import annotations

import pytest
import torch

from sd_lora.models.conditioning import Conditioner
from sd_lora.models.load import load_base_model

CAPTIONS = ["zkchar, red circle", "", "zkchar, red circle", "a blue square", "zkchar, green star"]


def _sizes(n: int) -> dict:
    return {"original_size": torch.tensor([[40, 36]] * n), "crop_top_left": torch.tensor([[2, 0]] * n),
            "target_size": torch.tensor([[32, 32]] * n)}


def _assert_same_conditioning(a: dict, b: dict, family: str) -> None:
    assert torch.allclose(a["encoder_hidden_states"], b["encoder_hidden_states"], atol=1e-6)
    if family == "sdxl":
        for key in ("text_embeds", "time_ids"):
            assert torch.allclose(a["added_cond_kwargs"][key], b["added_cond_kwargs"][key], atol=1e-6)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sdxl_model_dir"])
def test_cached_text_conditioning_equals_fresh_encoding(request, model_fixture):
    """The lazy cache: captions encoded as batches first bring them, once each."""
    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    captions, batch = CAPTIONS[:4], _sizes(4)
    fresh = Conditioner(model.family, model.tokenizers, model.text_encoders)
    cached = Conditioner(model.family, model.tokenizers, model.text_encoders, cache_outputs=True)
    with torch.no_grad():
        a = fresh(captions, batch, "cpu", torch.float32)
        cached(captions[:2], {k: v[:2] for k, v in batch.items()}, "cpu", torch.float32)  # fills two entries
        b = cached(captions, batch, "cpu", torch.float32)
    assert len(cached._cache) == 3  # one entry per distinct caption
    _assert_same_conditioning(a, b, model.family)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sdxl_model_dir"])
def test_cache_encodes_each_caption_once_in_batches_then_never_calls_the_encoders(request, model_fixture):
    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    fresh = Conditioner(model.family, model.tokenizers, model.text_encoders)
    cached = Conditioner(model.family, model.tokenizers, model.text_encoders, cache_outputs=True)
    batches = []
    assert cached.cache(CAPTIONS, "cpu", torch.float32, batch_size=3, progress=batches.append) == 4
    assert batches == [3, 1]  # 4 distinct captions, 3 at a time
    assert cached.cache(CAPTIONS[:2], "cpu", torch.float32) == 0

    calls = []
    for encoder in model.text_encoders:
        encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    b = cached(CAPTIONS, _sizes(5), "cpu", torch.float32)
    assert calls == []  # training draws only cached captions
    with torch.no_grad():
        a = fresh(CAPTIONS, _sizes(5), "cpu", torch.float32)
    _assert_same_conditioning(a, b, model.family)


def test_cache_needs_cached_outputs(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match="cache_outputs=True"):
        Conditioner(model.family, model.tokenizers, model.text_encoders).cache(["a"], "cpu", torch.float32)
