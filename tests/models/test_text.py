"""Long captions in 77-token windows (--max-token-length), as kohya sd-scripts splits and joins them."""

from __future__ import annotations

import pytest
import torch

from sd_lora.models.text import join_windows, split_windows, too_long, tokenize, window_count
from sd_lora.models.tiny import build_tiny_pipeline

BOS, EOS, PAD = 8, 9, 0


def _ids(n_tokens: int, length: int, pad: int) -> torch.Tensor:
    """(1, length) ids as a tokenizer pads them: start, n caption tokens (100, 101, ...), end, pad, pad, ..."""
    caption = list(range(100, 100 + min(n_tokens, length - 2)))
    ids = [BOS, *caption, EOS]
    return torch.tensor([ids + [pad] * (length - len(ids))])


def test_windows_of_a_tokenizer_that_pads_with_the_end_token():
    """SD1 (and SDXL's first tokenizer): start + 75 ids + the last id, which is always the end token."""
    windows = split_windows(_ids(100, 152, EOS), 2, eos=EOS, pad=EOS)
    assert windows.shape == (1, 2, 77)
    assert windows[0, 0].tolist() == [BOS, *range(100, 175), EOS]
    assert windows[0, 1].tolist() == [BOS, *range(175, 200), *[EOS] * 51]


@pytest.mark.parametrize("n_tokens, first, second", [
    # a long caption: the first window's last id follows a caption token, so it becomes the end token
    (100, [BOS, *range(100, 175), EOS], [BOS, *range(175, 200), EOS, *[PAD] * 50]),
    # a short one: the second window holds nothing of it and starts start, end, pad, ... (kohya's fix)
    (10, [BOS, *range(100, 110), EOS, *[PAD] * 65], [BOS, EOS, *[PAD] * 75]),
    # exactly 75 tokens: the end token falls into the second window
    (75, [BOS, *range(100, 175), EOS], [BOS, EOS, *[PAD] * 75]),
    # as long as the maximum: the tokenizer's end token closes the last window
    (150, [BOS, *range(100, 175), EOS], [BOS, *range(175, 250), EOS]),
])
def test_windows_of_a_tokenizer_that_pads_with_another_token_each_get_an_end_token(n_tokens, first, second):
    """SD2 and SDXL's second tokenizer pad with "!": kohya's two fixes give every window an end token to pool at."""
    windows = split_windows(_ids(n_tokens, 152, PAD), 2, eos=EOS, pad=PAD)
    assert windows[0, 0].tolist() == first
    assert windows[0, 1].tolist() == second


def test_join_keeps_the_first_start_token_every_inner_token_and_the_last_end_token():
    hidden = torch.arange(3 * 77, dtype=torch.float32).reshape(3, 77, 1).repeat(2, 1, 4)  # 2 captions x 3 windows
    joined = join_windows(hidden, 3)
    assert joined.shape == (2, 227, 4)
    expected = [0, *range(1, 76), *range(78, 153), *range(155, 230), 230]  # window w's token t is 77w + t
    assert joined[1, :, 0].tolist() == expected
    assert join_windows(hidden, 1) is hidden


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tokenize_unset_or_75_is_todays_and_the_first_window_is_todays_ids(family):
    tokenizer = build_tiny_pipeline(family).tokenizer
    captions = ["zkchar, " + ", ".join(f"tag {i}" for i in range(20)), "a red circle"]
    today = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tokenize(tokenizer, captions), today) and torch.equal(tokenize(tokenizer, captions, 75), today)
    windows = tokenize(tokenizer, captions, 225)
    assert windows.shape == (2 * 3, 77)
    assert torch.equal(windows[::3], today)  # what CLIP read before is the first window, unchanged


def test_window_count_and_too_long_count_against_the_chosen_length():
    tokenizer = build_tiny_pipeline("sd1").tokenizer
    assert [window_count(tokenizer, n) for n in (None, 75, 150, 225)] == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="multiple of 75, got 100"):
        window_count(tokenizer, 100)
    caption = "zkchar, " + ", ".join(f"tag {i}" for i in range(20))
    n = len(tokenizer(caption).input_ids)
    assert 77 < n <= 152
    assert too_long(tokenizer, [caption]) == {caption: n}
    assert too_long(tokenizer, [caption], 150) == {}
    assert too_long(tokenizer, [caption * 2], 150) == {caption * 2: len(tokenizer(caption * 2).input_ids)}
