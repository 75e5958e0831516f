"""Fixtures for file-format tests: tiny diffusers model folders and full-size models on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd_lora.models.tiny import save_tiny_model


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir("sd1" | "sd2")`: a saved tiny diffusers folder (built once per session and family)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = save_tiny_model(tmp_path_factory.mktemp(f"tiny_{family}"), family)
        return cache[family]

    return get


@pytest.fixture
def full_size_models():
    """`full_size_models("sd1" | "sd2")` -> (U-Net, text encoder) of SD1.5 / SD2.1, on the meta device."""
    return lambda family: (_full_size_unet(family), _full_size_text_encoder(family))


def _full_size_unet(family: str):
    """SD1.5 / SD2.1 `UNet2DConditionModel` on the meta device (configs: /work/shared/reference/model-configs.md)."""
    from diffusers import UNet2DConditionModel

    sd2 = family == "sd2"
    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=96 if sd2 else 64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
            cross_attention_dim=1024 if sd2 else 768,
            use_linear_projection=sd2,
            upcast_attention=sd2,
            transformer_layers_per_block=1,
            norm_num_groups=32,
        )


def _full_size_text_encoder(family: str):
    """CLIP ViT-L/14 (SD1.x) or OpenCLIP ViT-H/14 with 23 layers (SD2.x) as `CLIPTextModel`, on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = family == "sd2"
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1024 if sd2 else 768,
        intermediate_size=4096 if sd2 else 3072,
        num_hidden_layers=23 if sd2 else 12,
        num_attention_heads=16 if sd2 else 12,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
    )
    with torch.device("meta"):
        return CLIPTextModel(config)


@pytest.fixture
def random_lora():
    """`random_lora(model, seed)`: overwrite every LoRA weight with non-zero values (a stand-in for training)."""
    from sd_lora.lora.inject import trainable_parameters

    def fill(model, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in trainable_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    return fill
