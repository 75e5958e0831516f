"""Sampler names: which diffusers scheduler each one builds, under kohya sd-scripts' names.

Pure data and name checks (no torch), so the options and the prompt-file parser can validate a name before
any model loads. `sampler.make_scheduler` builds them, configured from the model's own scheduler config so
the prediction type, betas and timestep spacing carry over.
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers scheduler class, config overrides)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as the SD pipelines ship it (PLMS steps only)
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# The samplers whose diffusers scheduler rescales its betas to zero terminal SNR (`rescale_betas_zero_snr`) as
# a zero-terminal-SNR model was trained; the others ignore that setting and denoise on the plain schedule.
ZERO_SNR_SAMPLERS = ("ddim", "euler", "euler_a", "dpmsolver++", "unipc")
# kohya's k-diffusion spellings of the same samplers
ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}
NAMES = (*SAMPLERS, *ALIASES)


def canonical_sampler(name: str) -> str:
    """The SAMPLERS key for `name` (an alias resolved); ValueError naming the supported ones otherwise.
    Of kohya's names, lms/k_lms are not offered (diffusers' LMS scheduler needs scipy, which sd_lora does not
    install), nor dpmsolver (deprecated in diffusers; dpmsolver++ is its successor)."""
    name = ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; supported: {', '.join(NAMES)}")
    return name


def zero_snr_problem(name: str) -> str | None:
    """Why sampler `name` cannot sample a zero-terminal-SNR model, or None when it can."""
    if canonical_sampler(name) in ZERO_SNR_SAMPLERS:
        return None
    return (f"sampler {name!r} ignores the zero-terminal-SNR noise schedule this model trains on, so its samples would be "
            f"denoised on another schedule; use one of {', '.join(ZERO_SNR_SAMPLERS)}")
