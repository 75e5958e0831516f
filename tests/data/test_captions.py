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


def test_tag_dropout_leaves_out_tags_after_the_kept_ones_at_its_rate():
    tags = split_tags(CAPTION)
    results = [process(seed=s, tag_dropout=0.3, keep_tokens=1) for s in range(2000)]
    assert all(r.split(", ")[0] == "zk" for r in results)  # the trigger is kept
    kept = sum(len(r.split(", ")) - 1 for r in results)
    assert 0.66 < kept / (2000 * (len(tags) - 1)) < 0.74  # each of the 4 other tags kept with p = 0.7
    assert all(r.split(", ")[1:] == [t for t in tags[1:] if t in r.split(", ")] for r in results)  # order kept
    assert process(tag_dropout=1.0, keep_tokens=1) == "zk" and process(tag_dropout=1.0) == ""


def test_tag_dropout_draws_after_the_shuffle():
    rng = random.Random(5)
    rng.random()
    tags = split_tags(CAPTION)
    rng.shuffle(tags)
    expected = [t for t in tags if rng.random() >= 0.5]
    assert process(seed=5, shuffle_tags=True, tag_dropout=0.5) == ", ".join(expected)


@pytest.mark.parametrize("kw", [dict(dropout=-0.1), dict(dropout=1.5), dict(keep_tokens=-1), dict(tag_dropout=1.1)])
def test_invalid_arguments(kw):
    with pytest.raises(ValueError):
        process(**kw)
