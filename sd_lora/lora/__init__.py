"""LoRA: where it goes (`targets`) and PEFT injection plus by-name weight access (`inject`)."""

from sd_lora.lora.inject import (
    LoraModuleWeights,
    count_parameters,
    inject_lora,
    load_lora_weights_into,
    lora_weights,
    set_lora_enabled,
    trainable_parameters,
)
from sd_lora.lora.targets import UNET_PRESETS, text_encoder_target_modules, unet_target_modules

__all__ = [
    "UNET_PRESETS",
    "LoraModuleWeights",
    "count_parameters",
    "inject_lora",
    "load_lora_weights_into",
    "lora_weights",
    "set_lora_enabled",
    "text_encoder_target_modules",
    "trainable_parameters",
    "unet_target_modules",
]
