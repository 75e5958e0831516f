"""The noise-prediction objective as pure functions (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022).

Every function takes tensors (and a seeded generator where it draws) and returns tensors: no devices,
no modules, no state. `alphas_cumprod` is the scheduler's cumulative product of (1 - beta), shape (T,).
"""

from __future__ import annotations

import torch


# With several processes every rank draws the noise and timesteps of the whole global batch from the same
# seeded generator and keeps its own slice (`replicas`, `rank`): the run then sees exactly the draws a single
# process with the global batch would, and the generators of all ranks stay in step.


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator, device, *, replicas: int = 1, rank: int = 0) -> torch.Tensor:
    """Uniform integer timesteps in [0, T), shape (B,)."""
    t = torch.randint(0, num_train_timesteps, (batch * replicas,), generator=generator, device=device, dtype=torch.long)
    return t[rank * batch:(rank + 1) * batch]


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0, *, replicas: int = 1, rank: int = 0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus `noise_offset` x per-(sample, channel) constant noise.

    The offset lets the model change an image's mean brightness, which plain noise almost never teaches
    (Guttenberg, "Diffusion with Offset Noise", 2023).
    """
    b, c = latents.shape[:2]
    shape = (b * replicas, *latents.shape[1:])
    noise = torch.randn(shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((b * replicas, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise[rank * b:(rank + 1) * b]


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, *, replicas: int = 1, rank: int = 0) -> torch.Tensor:
    """One draw mean + std * eps from the VAE's diagonal Gaussian posterior, shape of `mean` (B, 4, h, w).

    Sharded like `sample_noise`: each rank's images get their own eps (the slice of a global-batch draw), not
    the same eps as every other rank's. With one process this is diffusers' `DiagonalGaussianDistribution.sample`
    draw for draw (same shape, generator, device and dtype).
    """
    return mean + std * sample_noise(mean, generator, replicas=replicas, rank=rank)


def _gather(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t] broadcast to `like`'s rank: (B,) -> (B, 1, 1, 1)."""
    a = alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (forward process q(x_t | x_0))."""
    a = _gather(alphas_cumprod, timesteps, latents)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a_t) eps - sqrt(1 - a_t) x_0, the v-prediction target."""
    a = _gather(alphas_cumprod, timesteps, latents)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(latents.dtype)


def training_target(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """What the U-Net must predict: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(latents, noise, timesteps, alphas_cumprod)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t), shape (B,)."""
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1 - a)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556), shape (B,).

    For epsilon targets the weight is min(SNR, gamma) / SNR; for v targets, whose loss already carries a
    factor (SNR + 1), it is min(SNR, gamma) / (SNR + 1). A zero-terminal-SNR schedule has SNR 0 at its last
    step: there the epsilon weight is its limit 1, not 0 / 0.
    """
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return torch.where(s > 0, clipped / s, 1.0)
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def prior_weights(prior: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """(B,) per-sample loss weights: `prior_loss_weight` for regularisation images (`prior` True), else 1."""
    return torch.where(prior, torch.full(prior.shape, prior_loss_weight, device=prior.device), torch.ones(prior.shape, device=prior.device))


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32, averaged per sample, optionally weighted per sample, then over the batch."""
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))  # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
