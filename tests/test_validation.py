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
