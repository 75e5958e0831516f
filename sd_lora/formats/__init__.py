"""LoRA file formats: the kohya/WebUI portable profile (`kohya`), the diffusers profile (`diffusers_format`),
readers for any format (`readers`) and model-family metadata (`modelspec`)."""

from sd_lora.formats.diffusers_format import from_diffusers_state_dict, to_diffusers_state_dict
from sd_lora.formats.kohya import (
    from_kohya_state_dict,
    kohya_module_name,
    read_lora_file,
    save_lora_file,
    tensor_data_sha256,
    to_kohya_state_dict,
)
from sd_lora.formats.modelspec import family_metadata
from sd_lora.formats.readers import LoraFile, read_any_lora, read_as_kohya

__all__ = [
    "LoraFile",
    "family_metadata",
    "from_diffusers_state_dict",
    "from_kohya_state_dict",
    "kohya_module_name",
    "read_any_lora",
    "read_as_kohya",
    "read_lora_file",
    "save_lora_file",
    "tensor_data_sha256",
    "to_diffusers_state_dict",
    "to_kohya_state_dict",
]
