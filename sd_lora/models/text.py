"""Caption -> U-Net conditioning for SD1.x/SD2.x CLIP text encoders.

CLIP reads 77 tokens (start, 75, end). With `max_tokens` 150 or 225 (`--max-token-length`) a caption is read
as kohya sd-scripts trains it: tokenized to `max_tokens + 2` ids, cut into k = max_tokens / 75 windows of
start + 75 ids + end, each window encoded as its own 77-token sequence, and the hidden states joined back to
(B, 75k + 2, D): the first window's start token, the 75 inner tokens of every window, the last window's final
token (`split_windows`, `join_windows`). Captions are padded to the full length, so every caption gives k
windows and the same sequence length.
"""

from __future__ import annotations

import torch


def window_count(tokenizer, max_tokens: int | None) -> int:
    """k: how many 77-token windows a caption is read in (1 without `max_tokens` or with 75)."""
    inner = tokenizer.model_max_length - 2  # 75
    if max_tokens is None:
        return 1
    if max_tokens <= 0 or max_tokens % inner:
        raise ValueError(f"max_tokens must be a multiple of {inner}, got {max_tokens}")
    return max_tokens // inner


def tokenize(tokenizer, captions: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (B * k, 77), padded; a caption's k windows are consecutive rows (k = `window_count`).

    Without `max_tokens` (or with 75) that is (B, 77), and longer captions are cut (see `too_long`).
    """
    k = window_count(tokenizer, max_tokens)
    if k == 1:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    ids = tokenizer(captions, padding="max_length", max_length=max_tokens + 2, truncation=True, return_tensors="pt").input_ids
    return split_windows(ids, k, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id).flatten(0, 1)


def split_windows(ids: torch.Tensor, k: int, *, eos: int, pad: int) -> torch.Tensor:
    """(B, 75k + 2) ids -> (B, k, 77) windows, each `ids[:, 0]` (start) + 75 ids + `ids[:, -1]` (end or pad),
    as kohya's `_get_input_ids` builds them.

    Tokenizers that pad with the end token (SD1, SDXL's first) need nothing more. Those that pad with another
    token (SD2 and SDXL's second: "!") get kohya's two fixes, so that each window has an end token for CLIP to
    pool at: a window whose last id follows a caption token ends with the end token instead of a pad, and a
    window holding nothing of the caption (start, pad, pad, ...) starts start, end, pad, ...
    """
    b, length = ids.shape
    inner = (length - 2) // k
    if inner * k + 2 != length:
        raise ValueError(f"{length} ids do not split into {k} windows of start + n + end")
    start = ids[:, None, :1].expand(b, k, 1)
    end = ids[:, None, -1:].expand(b, k, 1)
    windows = torch.cat([start, ids[:, 1:-1].reshape(b, k, inner), end], dim=2)  # (B, k, 77), a copy
    if pad != eos:
        before_end = windows[..., -2]
        windows[..., -1] = torch.where((before_end != eos) & (before_end != pad), eos, windows[..., -1])
        windows[..., 1] = torch.where(windows[..., 1] == pad, eos, windows[..., 1])
    return windows


def join_windows(hidden: torch.Tensor, k: int) -> torch.Tensor:
    """(B * k, 77, D) hidden states of consecutive windows -> (B, 75k + 2, D): the first window's start token,
    the inner tokens of every window, the last window's final token (kohya's `get_hidden_states`; the start
    and end tokens of the windows in between are dropped). k = 1 returns `hidden` itself."""
    if k == 1:
        return hidden
    n, length, dim = hidden.shape
    windows = hidden.reshape(n // k, k, length, dim)
    inner = windows[:, :, 1:-1].reshape(n // k, k * (length - 2), dim)
    return torch.cat([windows[:, 0, :1], inner, windows[:, -1, -1:]], dim=1)


def too_long(tokenizer, captions: list[str], max_tokens: int | None = None) -> dict[str, int]:
    """{caption: its token count} for the distinct captions longer than the text encoder reads: the model
    length (77 for CLIP, start and end tokens included), or `max_tokens` + 2. They lose their end."""
    limit = tokenizer.model_max_length if window_count(tokenizer, max_tokens) == 1 else max_tokens + 2
    distinct = list(dict.fromkeys(captions))
    counts = [len(ids) for ids in tokenizer(distinct, padding=False, truncation=False, verbose=False).input_ids]
    return {c: n for c, n in zip(distinct, counts) if n > limit}


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
    norm = _final_layer_norm(text_encoder)
    # A text encoder prepared by accelerate for mixed precision returns fp32 outputs; its 16-bit layer norm gets
    # them in its own dtype (CPU autocast does not cast layer_norm's inputs, and it refuses fp32 with bf16 weights).
    return norm(out.hidden_states[-clip_skip].to(norm.weight.dtype))
