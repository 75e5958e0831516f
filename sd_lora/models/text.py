"""Caption -> U-Net conditioning for SD1.x/SD2.x CLIP text encoders."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (B, 77) padded to the model length; longer captions are cut (see `too_long`)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def too_long(tokenizer, captions: list[str]) -> dict[str, int]:
    """{caption: its token count} for the distinct captions longer than the model length (77 for CLIP, start
    and end tokens included): the text encoder sees only their first tokens."""
    distinct = list(dict.fromkeys(captions))
    counts = [len(ids) for ids in tokenizer(distinct, padding=False, truncation=False, verbose=False).input_ids]
    return {c: n for c, n in zip(distinct, counts) if n > tokenizer.model_max_length}


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    text_encoder = getattr(text_encoder, "module", text_encoder)  # under DDP (several processes, TE trained)
    # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`); older versions nest it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_tokens(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states (B, 77, D) that condition the U-Net.

    clip_skip=1 is the last layer (with CLIP's final layer norm, as the pipelines do); clip_skip=N takes the
    N-th hidden state from the end and applies the final layer norm to it, as kohya and A1111 do.
    """
    if clip_skip == 1:
        return text_encoder(input_ids, return_dict=True).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True, return_dict=True)
    return _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
