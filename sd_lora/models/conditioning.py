"""Captions (and, for SDXL, image sizes) -> the U-Net's conditioning keyword arguments.

SD1.x/SD2.x: one CLIP text encoder; the hidden states condition cross-attention.
SDXL: two text encoders; their penultimate hidden states are concatenated (768 + 1280 = 2048 channels),
the second encoder's pooled, projected output and six size numbers per image (`add_time_ids`: original
height/width, crop top/left, target height/width) enter through `added_cond_kwargs` (Podell et al. 2023,
"SDXL", section 2.2).
"""

from __future__ import annotations

import torch

from .text import encode_tokens, tokenize


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """(B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), from (B, 2) size tensors."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.float32)


class Conditioner:
    """Encodes a batch's captions with the (possibly LoRA-carrying, possibly DDP-wrapped) text encoders."""

    def __init__(self, family: str, tokenizers: list, text_encoders: list, clip_skip: int = 1):
        if family == "sdxl" and len(text_encoders) != 2:
            raise ValueError("SDXL needs two text encoders")
        self.family, self.tokenizers, self.text_encoders, self.clip_skip = family, tokenizers, text_encoders, clip_skip

    def __call__(self, captions: list[str], batch: dict, device, dtype) -> tuple[dict, int]:
        """(U-Net keyword arguments, number of captions truncated to 77 tokens)."""
        if self.family != "sdxl":
            ids, truncated = tokenize(self.tokenizers[0], captions)
            hidden = encode_tokens(self.text_encoders[0], ids.to(device), self.clip_skip)  # (B, 77, D)
            return {"encoder_hidden_states": hidden}, truncated
        hidden_states, truncated, pooled = [], 0, None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids, n = tokenize(tokenizer, captions)
            truncated = max(truncated, n)
            out = encoder(ids.to(device), output_hidden_states=True, return_dict=True)
            # SDXL conditions on the penultimate layer ("clip skip 2" is built in); --clip-skip N goes N-1
            # layers further back, without the final layer norm, as the SDXL pipeline does.
            hidden_states.append(out.hidden_states[-(self.clip_skip + 1)])
            pooled = getattr(out, "text_embeds", None)
        hidden = torch.cat(hidden_states, dim=-1)  # (B, 77, 768 + 1280)
        time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        added = {"text_embeds": pooled, "time_ids": time_ids.to(device, dtype)}  # (B, 1280), (B, 6)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": added}, truncated
