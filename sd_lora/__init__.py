"""sd_lora: train Stable Diffusion LoRAs that load in AUTOMATIC1111, Forge, ComfyUI and diffusers.

`sd_lora.load_lora(pipe, path, scale=..., name=...)`, `sd_lora.set_lora_scales(pipe, {...})` and
`sd_lora.unload_lora(pipe)` apply LoRA files of any supported format to a diffusers pipeline. They are
imported on first use, so `import sd_lora` stays light (no torch).
"""

__version__ = "0.1.0"
__all__ = ["load_lora", "set_lora_scales", "unload_lora", "lora_scales"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sd_lora' has no attribute {name!r}")
