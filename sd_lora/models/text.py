"""Caption -> U-Net conditioning for SD1.x/SD2.x CLIP text encoders."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, int]:
    """Token ids (B, 77) padded to the model length, and how many captions were truncated."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    full = tokenizer(captions, padding=False, truncation=False).input_ids
    truncated = sum(len(f) > tokenizer.model_max_length for f in full)
    return ids, truncated


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
