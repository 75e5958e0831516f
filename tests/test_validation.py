import torch

from sd_lora.validation import build_validation_set


def test_validation_set_takes_the_largest_seed():
    # --seed allows up to 2**63-1; the per-image noise seed must stay within what torch.Generator takes
    latents = [torch.zeros(4, 8, 8), torch.zeros(4, 8, 8)]
    items = build_validation_set(latents, ["a", "b"], [{}, {}], seed=2**63 - 1, num_train_timesteps=1000)
    assert [i.timestep for i in items] == [250, 750]
    assert not torch.equal(items[0].noise, items[1].noise)


def test_validation_noise_is_unchanged_for_usual_seeds():
    items = build_validation_set([torch.zeros(4, 8, 8)], ["a"], [{}], seed=42, num_train_timesteps=1000)
    expected = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(42 * 1_000_003))
    assert torch.equal(items[0].noise, expected)


def test_shards_split_the_items_evenly_by_shape_and_one_process_keeps_them_all():
    from sd_lora.validation import shard

    shapes = [(4, 8, 8), (4, 8, 6), (4, 8, 8), (4, 6, 8), (4, 8, 8), (4, 8, 6), (4, 8, 8)]
    items = build_validation_set([torch.zeros(s) for s in shapes], list("abcdefg"), [{}] * 7, seed=0, num_train_timesteps=1000)
    single = shard(items, 0, 1)
    assert single == {(4, 8, 8): [items[0], items[2], items[4], items[6]], (4, 8, 6): [items[1], items[5]], (4, 6, 8): [items[3]]}
    shares = [shard(items, rank, 2) for rank in (0, 1)]
    assert all(len(group) and len({tuple(i.latents.shape) for i in group}) == 1 for s in shares for group in s.values())
    flat = [[i.caption for group in s.values() for i in group] for s in shares]
    assert sorted(flat[0] + flat[1]) == list("abcdefg") and [len(f) for f in flat] == [4, 3]
    assert [len(s.get((4, 8, 8), [])) for s in shares] == [2, 2]  # each takes its half of a bucket
    assert shard(items[:1], 1, 2) == {}  # fewer items than processes: nothing to run, the sums still meet
