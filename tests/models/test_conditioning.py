"""Text conditioning: the caption cache is filled up front, batched, and equals fresh encoding."""

from __future__ import annotations

import pytest
import torch

from sd_lora.models.conditioning import Conditioner
from sd_lora.models.load import load_base_model
from sd_lora.models.text import encode_tokens

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


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sdxl_model_dir"])
def test_cached_outputs_stay_in_host_memory_and_a_batch_goes_to_the_device(request, model_fixture, monkeypatch):
    """An entry per distinct caption (a tagged dataset: per image) is kept on the host; a batch's rows are stacked
    and copied to the device through `memory.to_device` as it trains."""
    import sd_lora.models.conditioning as conditioning

    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    cached = Conditioner(model.family, model.tokenizers, model.text_encoders, cache_outputs=True)
    cached.cache(CAPTIONS, "cpu", torch.float32)
    assert all(t.device.type == "cpu" for row in cached._cache.values() for t in row if t is not None)
    sent, original = [], conditioning.to_device
    monkeypatch.setattr(conditioning, "to_device",
                        lambda t, device, dtype=None: sent.append(tuple(t.shape)) or original(t, device, dtype))
    out = cached(CAPTIONS[:3], _sizes(3), "cpu", torch.float32)
    expected = [tuple(out["encoder_hidden_states"].shape)]
    if model.family == "sdxl":  # then the pooled embeddings, then the three size tensors of the time ids
        expected += [tuple(out["added_cond_kwargs"]["text_embeds"].shape)] + [(3, 2)] * 3
    assert sent == expected and expected[0][0] == 3


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sdxl_model_dir"])
def test_token_ids_go_to_the_text_encoders_without_a_wait(request, model_fixture, monkeypatch):
    """Captions encoded at each step (a trained text encoder, shuffled tags) send their token ids as the batches go,
    through `memory.to_device` (pinned, asynchronous on a GPU): a plain `.to(device)` of the tokenizer's pageable ids
    made every step wait for the GPU to finish the previous one."""
    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    copies, original = [], torch.Tensor.to

    def spy(self, *args, **kwargs):
        if self.dtype == torch.long and self.shape[-1] == 77 and args and isinstance(args[0], (str, torch.device)):  # token ids
            copies.append(kwargs.get("non_blocking", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    with torch.no_grad():
        Conditioner(model.family, model.tokenizers, model.text_encoders)(CAPTIONS[:2], _sizes(2), "cpu", torch.float32)
    assert copies == [True] * len(model.text_encoders)


def test_cache_needs_cached_outputs(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match="cache_outputs=True"):
        Conditioner(model.family, model.tokenizers, model.text_encoders).cache(["a"], "cpu", torch.float32)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sdxl_model_dir"])
def test_cache_bytes_count_every_cached_output(request, model_fixture):
    """The memory estimate's text-encoder output cache: one hidden state (and SDXL pooled embedding) per distinct caption."""
    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    cached = Conditioner(model.family, model.tokenizers, model.text_encoders, cache_outputs=True)
    assert cached.cache_bytes() == 0
    cached.cache(CAPTIONS, "cpu", torch.float32)
    out = cached(CAPTIONS[:1], _sizes(1), "cpu", torch.float32)
    per_caption = out["encoder_hidden_states"][0].numel() * 4
    if model.family == "sdxl":
        per_caption += out["added_cond_kwargs"]["text_embeds"][0].numel() * 4
    assert cached.cache_bytes() == 4 * per_caption > 0  # 4 distinct captions


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sdxl_model_dir"])
def test_released_encoders_free_their_weights_and_the_cache_still_conditions(request, model_fixture):
    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    cached = Conditioner(model.family, model.tokenizers, model.text_encoders, cache_outputs=True)
    cached.cache(CAPTIONS, "cpu", torch.float32)
    before = cached(CAPTIONS, _sizes(5), "cpu", torch.float32)
    weights = sum(p.numel() * p.element_size() for e in model.text_encoders for p in (*e.parameters(), *e.buffers()))
    assert cached.release_encoders() == weights > 0
    assert {p.device.type for e in model.text_encoders for p in (*e.parameters(), *e.buffers())} == {"meta"}
    _assert_same_conditioning(before, cached(CAPTIONS, _sizes(5), "cpu", torch.float32), model.family)
    with pytest.raises(RuntimeError, match="caption 'a red circle' was not cached before the text encoders were released"):
        cached(["zkchar, red circle", "a red circle"], _sizes(2), "cpu", torch.float32)
    with pytest.raises(ValueError, match="needs cache_outputs=True"):
        Conditioner(model.family, model.tokenizers, model.text_encoders).release_encoders()

# --- long captions (--max-token-length) ---------------------------------------------------------------

LONG = "zkchar, " + ", ".join(f"tag {i}" for i in range(22))  # 125 tokens with the tiny models' vocabulary
LONG_CAPTIONS = [LONG, "a red circle"]


def test_the_long_test_caption_needs_two_windows(tiny_model_dir):
    n = len(load_base_model(str(tiny_model_dir)).tokenizer(LONG).input_ids)
    assert n == 125  # two windows: 75 + 50 tokens between the start and end tokens


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_v_model_dir", "tiny_sdxl_model_dir"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_max_token_length_75_gives_exactly_todays_outputs(request, model_fixture, clip_skip):
    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    today = Conditioner(model.family, model.tokenizers, model.text_encoders, clip_skip)
    at_75 = Conditioner(model.family, model.tokenizers, model.text_encoders, clip_skip, max_tokens=75)
    with torch.no_grad():
        a, b = (c(LONG_CAPTIONS, _sizes(2), "cpu", torch.float32) for c in (today, at_75))
    assert a["encoder_hidden_states"].shape[1] == 77
    assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])
    if model.family == "sdxl":
        assert torch.equal(a["added_cond_kwargs"]["text_embeds"], b["added_cond_kwargs"]["text_embeds"])


@pytest.mark.parametrize("model_fixture, dim", [("tiny_model_dir", 32), ("tiny_sdxl_model_dir", 32 + 48)])
@pytest.mark.parametrize("max_tokens, length", [(150, 152), (225, 227)])
def test_long_captions_condition_on_75_tokens_per_window_plus_start_and_end(request, model_fixture, dim, max_tokens, length):
    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    with torch.no_grad():
        cond = Conditioner(model.family, model.tokenizers, model.text_encoders, max_tokens=max_tokens)(LONG_CAPTIONS, _sizes(2), "cpu", torch.float32)
    assert cond["encoder_hidden_states"].shape == (2, length, dim)  # short captions are padded to the same length
    if model.family == "sdxl":
        assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)


def _kohya_windows(tokenizer, caption: str) -> torch.Tensor:
    """(2, 77) windows of a 76..150-token caption for --max-token-length 150, written out by hand: the first
    ends with the end token (after a caption token), the second holds the rest and the padding."""
    ids = tokenizer(caption, padding="max_length", max_length=152, truncation=True, return_tensors="pt").input_ids[0]
    first = torch.cat([ids[:76], torch.tensor([tokenizer.eos_token_id])])
    second = torch.cat([ids[:1], ids[76:151], ids[151:]])
    return torch.stack([first, second])


def test_sd1_windows_encoded_one_by_one_and_joined_equal_the_conditioning(tiny_model_dir):
    """The maths, with --clip-skip 2: each window is its own 77-token sequence; the joined states keep the first
    window's start token, every window's 75 inner tokens and the last window's end token."""
    model = load_base_model(str(tiny_model_dir))
    encoder = model.text_encoder
    with torch.no_grad():
        cond = Conditioner(model.family, model.tokenizers, model.text_encoders, 2, max_tokens=150)([LONG], {}, "cpu", torch.float32)
        windows = _kohya_windows(model.tokenizer, LONG)
        states = [encode_tokens(encoder, w[None], clip_skip=2)[0] for w in windows]  # one at a time: (77, 32) each
    expected = torch.cat([states[0][:-1], states[1][1:]])  # start + 75 | 75 + end
    assert expected.shape == (152, 32)
    assert torch.allclose(cond["encoder_hidden_states"][0], expected, atol=1e-5)
    with torch.no_grad():  # what the first window reads is what 77 tokens read before
        today = Conditioner(model.family, model.tokenizers, model.text_encoders, 2)([LONG], {}, "cpu", torch.float32)
    assert torch.allclose(cond["encoder_hidden_states"][0, :76], today["encoder_hidden_states"][0, :76], atol=1e-5)


def test_sdxl_windows_joined_per_encoder_and_pooled_at_the_first_windows_end_token(tiny_sdxl_model_dir):
    model = load_base_model(str(tiny_sdxl_model_dir))
    with torch.no_grad():
        cond = Conditioner(model.family, model.tokenizers, model.text_encoders, max_tokens=150)([LONG], _sizes(1), "cpu", torch.float32)
        joined, first_window_outputs = [], []
        for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
            windows = _kohya_windows(tokenizer, LONG)
            outs = [encoder(w[None], output_hidden_states=True, return_dict=True) for w in windows]
            joined.append(torch.cat([outs[0].hidden_states[-2][0, :-1], outs[1].hidden_states[-2][0, 1:]]))  # penultimate layer
            first_window_outputs.append(outs[0])
        # kohya's pool_workaround: the last layer's state at the first window's end token, projected
        tokenizer_2, encoder_2, out = model.tokenizers[1], model.text_encoders[1], first_window_outputs[1]
        end = int((_kohya_windows(tokenizer_2, LONG)[0] == tokenizer_2.eos_token_id).int().argmax())
        pooled = encoder_2.text_projection(out.last_hidden_state[0, end])
    assert tokenizer_2.pad_token_id != tokenizer_2.eos_token_id  # SDXL's second tokenizer pads with "!"
    assert end == 76  # the long caption fills the first window: the end token is the one kohya's fix put there
    assert torch.allclose(cond["encoder_hidden_states"][0], torch.cat(joined, dim=-1), atol=1e-5)
    assert torch.allclose(cond["added_cond_kwargs"]["text_embeds"][0], pooled, atol=1e-5)
    with torch.no_grad():  # the pooled embedding is the one 77 tokens gave before
        today = Conditioner(model.family, model.tokenizers, model.text_encoders)([LONG], _sizes(1), "cpu", torch.float32)
    assert torch.allclose(cond["added_cond_kwargs"]["text_embeds"], today["added_cond_kwargs"]["text_embeds"], atol=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sdxl_model_dir"])
def test_cached_long_caption_conditioning_equals_fresh_encoding(request, model_fixture):
    model = load_base_model(str(request.getfixturevalue(model_fixture)))
    captions = [LONG, "", "a red circle", LONG]
    fresh = Conditioner(model.family, model.tokenizers, model.text_encoders, max_tokens=225)
    cached = Conditioner(model.family, model.tokenizers, model.text_encoders, cache_outputs=True, max_tokens=225)
    assert cached.cache(captions, "cpu", torch.float32) == 3
    with torch.no_grad():
        a = fresh(captions, _sizes(4), "cpu", torch.float32)
    b = cached(captions, _sizes(4), "cpu", torch.float32)
    assert b["encoder_hidden_states"].shape[1] == 227
    _assert_same_conditioning(a, b, model.family)


def test_sdxl_clip_skip_2_is_the_third_layer_from_the_end_and_the_help_says_so(tiny_sdxl_model_dir):
    """SDXL conditions on the penultimate layer at --clip-skip 1, so a kohya SDXL command's --clip_skip 2 (which kohya
    ignores for SDXL) reads one layer further back here; the help said "2 = penultimate" for every family."""
    from sd_lora.options import FIELDS

    model = load_base_model(str(tiny_sdxl_model_dir))
    ids = [t(["zkchar, red circle"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for t in model.tokenizers]
    with torch.no_grad():
        cond = Conditioner(model.family, model.tokenizers, model.text_encoders, 2)(["zkchar, red circle"], _sizes(1), "cpu", torch.float32)
        third = [e(i, output_hidden_states=True).hidden_states[-3] for e, i in zip(model.text_encoders, ids)]
    assert torch.allclose(cond["encoder_hidden_states"], torch.cat(third, dim=-1), atol=1e-5)
    assert "SDXL" in FIELDS["clip_skip"].metadata["help"] and "the third from the end" in FIELDS["clip_skip"].metadata["help"]
