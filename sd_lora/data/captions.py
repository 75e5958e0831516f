"""Caption augmentation: tag shuffling with kept leading tokens, and caption dropout. Pure functions.

Captions in the booru style are comma-separated tags ("zkchar, 1girl, red hair, smiling"). Shuffling the tags
stops the model from learning their order; `keep_tokens` pins the first tags (usually the trigger word) in
place. Caption dropout trains with an empty caption now and then, which keeps the LoRA usable without its
trigger and feeds classifier-free guidance (kohya `--caption_dropout_rate`).
"""

from __future__ import annotations

import random


def split_tags(caption: str) -> list[str]:
    """Split on ',' and strip each tag; empty tags ("a,,b", a trailing comma) are dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(
    caption: str, rng: random.Random, *, shuffle_tags: bool, keep_tokens: int, dropout: float, tag_dropout: float = 0.0
) -> str:
    """Return the caption to train on for one sample.

    Draw order (fixed, so a seed reproduces the result): one `rng.random()` for dropout, always, then
    `rng.shuffle` of the tags after the first `keep_tokens` when `shuffle_tags`, then with `tag_dropout` one
    `rng.random()` per tag after the first `keep_tokens` (below `tag_dropout`: the tag is left out; kohya's
    caption_tag_dropout_rate). A dropped caption is "". A shuffled or tag-dropped caption is re-joined with
    ", " (so "a,b" becomes "a, b"); otherwise the caption is returned unchanged.
    """
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"caption dropout must be in [0, 1], got {dropout}")
    if not 0.0 <= tag_dropout <= 1.0:
        raise ValueError(f"tag dropout must be in [0, 1], got {tag_dropout}")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if rng.random() < dropout:
        return ""
    if not shuffle_tags and not tag_dropout:
        return caption
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle_tags:
        rng.shuffle(rest)
    if tag_dropout:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    return ", ".join(kept + rest)
