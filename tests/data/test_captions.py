from __future__ import annotations

import random

import pytest

from sd_lora.data.captions import process_caption, split_tags

CAPTION = "zk, red hair, smile, outdoors, night"


def process(caption=CAPTION, seed=0, **kw):
    options = dict(shuffle_tags=False, keep_tokens=0, dropout=0.0) | kw
    return process_caption(caption, random.Random(seed), **options)


def test_split_tags_strips_and_drops_empty():
    assert split_tags(" a ,b,, c ,") == ["a", "b", "c"]
    assert split_tags("") == []


def test_unchanged_without_options():
    assert process("a,b ,c") == "a,b ,c"


def test_shuffle_keeps_leading_tokens_and_every_tag():
    results = {process(seed=s, shuffle_tags=True, keep_tokens=2) for s in range(50)}
    assert len(results) > 1
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["zk", "red hair"]
        assert sorted(tags[2:]) == ["night", "outdoors", "smile"]


def test_shuffle_reproducible_for_a_seed():
    assert process(seed=7, shuffle_tags=True) == process(seed=7, shuffle_tags=True)
    assert len({process(seed=s, shuffle_tags=True) for s in range(30)}) > 5


def test_keep_tokens_beyond_tag_count_keeps_order():
    assert process("a,b", shuffle_tags=True, keep_tokens=5) == "a, b"


def test_dropout_probability():
    rng = random.Random(0)
    dropped = sum(
        process_caption(CAPTION, rng, shuffle_tags=False, keep_tokens=0, dropout=0.25) == ""
        for _ in range(4000)
    )
    assert 900 <= dropped <= 1100
    assert all(process(seed=s, dropout=1.0) == "" for s in range(20))
    assert all(process(seed=s, dropout=0.0) == CAPTION for s in range(20))


def test_draw_order_is_fixed():
    # One random() for dropout, always; then the shuffle. So dropout=0 and dropout=0.001 give the same
    # shuffle for a seed whose first draw is not below 0.001.
    with_dropout = process(seed=3, shuffle_tags=True, dropout=0.001)
    assert with_dropout != "" and process(seed=3, shuffle_tags=True, dropout=0.0) == with_dropout
    rng = random.Random(3)
    rng.random()
    tags = split_tags(CAPTION)
    rng.shuffle(tags)
    assert process(seed=3, shuffle_tags=True) == ", ".join(tags)


@pytest.mark.parametrize("kw", [dict(dropout=-0.1), dict(dropout=1.5), dict(keep_tokens=-1)])
def test_invalid_arguments(kw):
    with pytest.raises(ValueError):
        process(**kw)
