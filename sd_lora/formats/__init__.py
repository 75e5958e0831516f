"""LoRA file formats: the kohya/WebUI portable profile (`kohya`) and model-family metadata (`modelspec`)."""

from sd_lora.formats.kohya import (
    from_kohya_state_dict,
    kohya_module_name,
    read_lora_file,
    save_lora_file,
    tensor_data_sha256,
    to_kohya_state_dict,
)
from sd_lora.formats.modelspec import family_metadata

__all__ = [
    "family_metadata",
    "from_kohya_state_dict",
    "kohya_module_name",
    "read_lora_file",
    "save_lora_file",
    "tensor_data_sha256",
    "to_kohya_state_dict",
]
