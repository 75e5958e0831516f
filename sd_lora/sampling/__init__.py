"""Sample images during training: prompt files (`prompts`), grid layout (`grid`), the pipeline (`sampler`).

`prompts` and `grid` are pure and cheap to import; `sampler` (torch, diffusers) loads on first use of one
of its names, so config code can import `SamplePrompt` without pulling in the models.
"""

from __future__ import annotations

from sd_lora.sampling.grid import make_grid
from sd_lora.sampling.prompts import (
    SamplePrompt,
    default_prompts,
    parse_prompt_line,
    read_prompt_file,
    validate_size,
)

_SAMPLER_NAMES = (
    "SAMPLERS",
    "SampleSettings",
    "build_sampling_pipeline",
    "generate_grid",
    "generate_images",
    "make_scheduler",
    "save_grid",
)

__all__ = [
    "SamplePrompt",
    "default_prompts",
    "make_grid",
    "parse_prompt_line",
    "read_prompt_file",
    "validate_size",
    *_SAMPLER_NAMES,
]


def __getattr__(name: str):
    # PEP 562 lazy import: `from sd_lora.sampling import generate_grid` works, but importing the package
    # alone does not import torch and diffusers.
    if name in _SAMPLER_NAMES:
        from sd_lora.sampling import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
