"""The objective's maths against diffusers' scheduler and closed forms."""

import torch
from diffusers import DDPMScheduler

from sd_lora import diffusion


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)


def test_add_noise_and_velocity_match_diffusers():
    s = scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ours = diffusion.add_noise(x0, eps, t, s.alphas_cumprod)
    assert torch.allclose(ours, s.add_noise(x0, eps, t), atol=1e-6)
    assert torch.allclose(diffusion.velocity(x0, eps, t, s.alphas_cumprod), s.get_velocity(x0, eps, t), atol=1e-6)


def test_training_target_per_prediction_type():
    s = scheduler()
    x0, eps, t = torch.ones(2, 4, 2, 2), torch.full((2, 4, 2, 2), 2.0), torch.tensor([10, 900])
    assert diffusion.training_target("epsilon", x0, eps, t, s.alphas_cumprod) is eps
    v = diffusion.training_target("v_prediction", x0, eps, t, s.alphas_cumprod)
    a = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * 2 - (1 - a).sqrt() * 1)


def test_timesteps_uniform_and_seeded():
    t1 = diffusion.sample_timesteps(10_000, 1000, torch.Generator().manual_seed(1), "cpu")
    t2 = diffusion.sample_timesteps(10_000, 1000, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(t1, t2)
    assert t1.min() >= 0 and t1.max() <= 999
    assert abs(t1.float().mean().item() - 499.5) < 15  # mean of U{0..999}, sd of the mean ~2.9


def test_noise_offset_adds_per_channel_constant():
    latents = torch.zeros(4, 4, 16, 16)
    plain = diffusion.sample_noise(latents, torch.Generator().manual_seed(3), 0.0)
    offset = diffusion.sample_noise(latents, torch.Generator().manual_seed(3), 0.5)
    diff = offset - plain  # identical base draw, then 0.5 * (B, C, 1, 1)
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff))
    assert diff.abs().max() > 0.01


def test_min_snr_weights_closed_form():
    s = scheduler()
    t = torch.tensor([1, 100, 500, 999])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    w_eps = diffusion.min_snr_weights(t, s.alphas_cumprod, 5.0, "epsilon")
    w_v = diffusion.min_snr_weights(t, s.alphas_cumprod, 5.0, "v_prediction")
    assert torch.allclose(w_eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert torch.allclose(w_v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert w_eps[0] < 1 and w_eps[-1] == 1  # low-noise steps (high SNR) are down-weighted



def test_min_snr_weights_at_zero_terminal_snr_are_finite():
    # A rescaled schedule ends at SNR 0 (alphas_cumprod[-1] == 0): epsilon's min(SNR, 5) / SNR is 0 / 0 there,
    # and one such sample made a whole batch's loss NaN. Its limit is 1; v-prediction's weight is 0 / 1 = 0.
    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    t = torch.tensor([999, 998, 500, 1])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    assert snr[0] == 0
    w_eps = diffusion.min_snr_weights(t, s.alphas_cumprod, 5.0, "epsilon")
    w_v = diffusion.min_snr_weights(t, s.alphas_cumprod, 5.0, "v_prediction")
    assert w_eps.tolist()[:3] == [1.0, 1.0, 1.0] and torch.allclose(w_eps[3], 5.0 / snr[3])
    assert w_v[0] == 0 and torch.allclose(w_v[1:], torch.minimum(snr[1:], torch.tensor(5.0)) / (snr[1:] + 1))

def test_loss_is_weighted_per_sample_mean():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert diffusion.diffusion_loss(pred, target).item() == 2.5  # (1 + 4) / 2
    assert diffusion.diffusion_loss(pred, target, torch.tensor([1.0, 0.5])).item() == 1.5  # (1 + 2) / 2


def test_sharded_draws_are_slices_of_the_global_batch():
    latents = torch.zeros(2, 4, 8, 8)
    whole = diffusion.sample_noise(torch.zeros(4, 4, 8, 8), torch.Generator().manual_seed(5), 0.1)
    parts = [diffusion.sample_noise(latents, torch.Generator().manual_seed(5), 0.1, replicas=2, rank=r) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)
    t_whole = diffusion.sample_timesteps(4, 1000, torch.Generator().manual_seed(6), "cpu")
    t_parts = [diffusion.sample_timesteps(2, 1000, torch.Generator().manual_seed(6), "cpu", replicas=2, rank=r) for r in (0, 1)]
    assert torch.equal(torch.cat(t_parts), t_whole)
