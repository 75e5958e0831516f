"""--compile: what is compiled, and how many graphs dynamo may keep (compiling itself is tested end to end
in tests/test_train.py)."""

from __future__ import annotations

import pytest
import torch

from sd_lora.compiling import compile_unet
from sd_lora.models.tiny import build_tiny_pipeline


@pytest.mark.parametrize("mode", ["blocks", "unet"])
def test_recompile_limit_holds_every_bucket_shape_of_every_block(mode):
    """Blocks of one class share their forward's code object, and dynamo keeps 8 graphs per code object by
    default, then silently runs eagerly: 3 cross-attention blocks used it up by the third bucket shape."""
    config = torch._dynamo.config
    with config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        unet = build_tiny_pipeline("sd1").unet
        compile_unet(unet, mode, batch_shapes=20)
        compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        blocks = len(unet.down_blocks) + 1 + len(unet.up_blocks) if mode == "blocks" else 1
        assert len(compiled) == blocks
        assert config.recompile_limit == 20 * blocks and config.accumulated_recompile_limit == max(256, 40 * blocks)
    assert config.recompile_limit == 8


def test_off_compiles_nothing_and_unknown_modes_are_refused():
    unet = build_tiny_pipeline("sd1").unet
    compile_unet(unet, "off", batch_shapes=20)
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in unet.modules())
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        compile_unet(unet, "fast")
