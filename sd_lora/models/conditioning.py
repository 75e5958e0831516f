"""Captions (and, for SDXL, image sizes) -> the U-Net's conditioning keyword arguments.

SD1.x/SD2.x: one CLIP text encoder; the hidden states condition cross-attention.
SDXL: two text encoders; their penultimate hidden states are concatenated (768 + 1280 = 2048 channels),
the second encoder's pooled, projected output and six size numbers per image (`add_time_ids`: original
height/width, crop top/left, target height/width) enter through `added_cond_kwargs` (Podell et al. 2023,
"SDXL", section 2.2).

With `max_tokens` 150 or 225 each caption is read in 77-token windows (`text.py`): the hidden states are
(B, 75k + 2, D) instead of (B, 77, D), and SDXL's pooled output is the first window's, as kohya trains.
"""

from __future__ import annotations

import copy

import torch

from ..memory import release_modules, to_device
from .text import encode_tokens, join_windows, tokenize, window_count


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """(B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), from (B, 2) size tensors."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.float32)


def batch_time_ids(batch: dict, device, dtype) -> torch.Tensor:
    """A batch's (B, 6) time ids on `device` in `dtype`; the (B, 2) size tensors are copied first, from the
    DataLoader's pinned memory without a wait."""
    sizes = [to_device(batch[key], device) for key in ("original_size", "crop_top_left", "target_size")]
    return sdxl_time_ids(*sizes).to(dtype)


class Conditioner:
    """Encodes a batch's captions with the (possibly LoRA-carrying, possibly DDP-wrapped) text encoders.

    With `cache_outputs` (only valid while the text encoders are frozen) each distinct caption is encoded
    once and its outputs are reused: the text encoders then run once per caption instead of once per step.
    The caller enables it only when captions do not change from step to step (no tag shuffling or tag
    dropout), so the cache holds at most one entry per caption (plus the empty caption of caption dropout).
    """

    def __init__(self, family: str, tokenizers: list, text_encoders: list, clip_skip: int = 1, *, cache_outputs: bool = False,
                 max_tokens: int | None = None):
        if family == "sdxl" and len(text_encoders) != 2:
            raise ValueError("SDXL needs two text encoders")
        self.family, self.tokenizers, self.text_encoders, self.clip_skip = family, tokenizers, text_encoders, clip_skip
        self.cache_outputs, self.max_tokens = cache_outputs, max_tokens
        self.windows = window_count(tokenizers[0], max_tokens)  # k: 1, or 2/3 for --max-token-length 150/225
        self._cache: dict[str, tuple] = {}  # caption -> (hidden (75k + 2 or 77, D), pooled (P,) or None)
        self.released = False  # the text encoders' weights are gone: only cached captions can be conditioned on

    def __call__(self, captions: list[str], batch: dict, device, dtype) -> dict:
        """The U-Net's keyword arguments for `captions` (and, for SDXL, the batch's size conditioning)."""
        if self.cache_outputs:
            return self._cached(captions, batch, device, dtype)
        return self._encode(captions, batch, device, dtype)

    def cache(self, captions, device, dtype, *, batch_size: int = 32, progress=None) -> int:
        """Encode every distinct caption not cached yet, `batch_size` at a time, before training needs them;
        `progress(n)` is called after each batch. Returns how many captions were encoded. Once every caption a
        run can draw is cached, the text encoders are not called again: `release_encoders` lets them go."""
        if not self.cache_outputs:
            raise ValueError("cache() needs cache_outputs=True (frozen text encoders, fixed captions)")
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            self._cached(chunk, batch_for_text_only(len(chunk)), device, dtype)
            if progress is not None:
                progress(len(chunk))
        return len(missing)

    def release_encoders(self) -> int:
        """Let the text encoders' weights go (`memory.release_modules`) once every caption the run can draw is
        cached. Returns the bytes let go. A caption that is not cached is an error afterwards."""
        if not self.cache_outputs:
            raise ValueError("release_encoders() needs cache_outputs=True: without the cache every step runs the text encoders")
        self.released = True
        return release_modules(self.text_encoders)

    def cache_bytes(self) -> int:
        """Bytes of the cached outputs, held in host memory (SDXL at 77 tokens: about 0.3 MiB a caption in bf16); a
        batch's rows are copied to the device when it trains."""
        return sum(t.numel() * t.element_size() for row in self._cache.values() for t in row if t is not None)

    def with_encoders(self, text_encoders: list) -> Conditioner:
        """This conditioner over other modules holding the same weights (the text encoders without their DDP
        wrappers): it shares the tokenizers and the cache of caption outputs with this one."""
        other = copy.copy(self)
        other.text_encoders = text_encoders
        return other

    def _cached(self, captions: list[str], batch: dict, device, dtype) -> dict:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing and self.released:
            raise RuntimeError(f"caption {missing[0]!r} was not cached before the text encoders were released; "
                               "cache() every caption the run can draw before release_encoders()")
        if missing:
            with torch.no_grad():
                kwargs = self._encode(missing, batch_for_text_only(len(missing)), device, dtype)
            # Kept in host memory, as the latent cache: an entry per distinct caption, and datasets of tagged images have
            # one per image (50,000 SDXL captions: about 15 GiB, which would not fit beside the U-Net on most GPUs).
            hidden = kwargs["encoder_hidden_states"].cpu()
            pooled = kwargs.get("added_cond_kwargs", {}).get("text_embeds")
            pooled = None if pooled is None else pooled.cpu()
            for i, caption in enumerate(missing):
                self._cache[caption] = (hidden[i], None if pooled is None else pooled[i])
        rows = [self._cache[c] for c in captions]
        kwargs = {"encoder_hidden_states": to_device(torch.stack([r[0] for r in rows]), device)}
        if self.family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": to_device(torch.stack([r[1] for r in rows]), device),
                                           "time_ids": batch_time_ids(batch, device, dtype)}
        return kwargs

    def _encode(self, captions: list[str], batch: dict, device, dtype) -> dict:
        if self.family != "sdxl":
            ids = tokenize(self.tokenizers[0], captions, self.max_tokens)  # (B * k, 77)
            hidden = encode_tokens(self.text_encoders[0], to_device(ids, _device_of(self.text_encoders[0])), self.clip_skip)
            return {"encoder_hidden_states": join_windows(hidden, self.windows).to(device)}  # (B, 77 or 75k + 2, D)
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenize(tokenizer, captions, self.max_tokens)  # (B * k, 77)
            out = encoder(to_device(ids, _device_of(encoder)), output_hidden_states=True, return_dict=True)
            # SDXL conditions on the penultimate layer ("clip skip 2" is built in); --clip-skip N goes N-1
            # layers further back, without the final layer norm, as the SDXL pipeline does.
            hidden_states.append(join_windows(out.hidden_states[-(self.clip_skip + 1)], self.windows))
            pooled = getattr(out, "text_embeds", None)
        hidden = torch.cat(hidden_states, dim=-1).to(device)  # (B, 77 or 75k + 2, 768 + 1280)
        if pooled is not None:  # (B * k, 1280): the first window's, at its end token (kohya: pool2[::k])
            pooled = pooled[::self.windows].to(device)
        added = {"text_embeds": pooled, "time_ids": batch_time_ids(batch, device, dtype)}  # (B, 1280), (B, 6)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": added}


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where a text encoder's weights are: its inputs go there, its outputs come back."""
    return next(module.parameters()).device


def batch_for_text_only(n: int) -> dict:
    """Placeholder size conditioning for encoding captions alone (the cached path adds the real sizes)."""
    zeros = torch.zeros(n, 2, dtype=torch.long)
    return {"original_size": zeros, "crop_top_left": zeros, "target_size": zeros}
