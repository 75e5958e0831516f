"""Loading a U-Net tensor by tensor, cast as read: the same weights as diffusers' loader, and its fallbacks."""

import json
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sd_lora.errors import UserError
from sd_lora.models.load import load_base_model
from sd_lora.models.streaming import WEIGHTS_NAME, load_cast, parameter_count, read_cast


def test_read_cast_casts_floats_and_keeps_integers(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3), "c": torch.randn(5).half(),
               "empty": torch.zeros(0, 2)}
    save_file(tensors, str(path))
    read = read_cast(path, torch.bfloat16)
    assert read.keys() == tensors.keys()
    assert torch.equal(read["a"], tensors["a"].to(torch.bfloat16))
    assert torch.equal(read["c"], tensors["c"].to(torch.bfloat16))
    assert read["b"].dtype == torch.int64 and torch.equal(read["b"], tensors["b"])
    assert read["empty"].shape == (0, 2) and read["empty"].dtype == torch.bfloat16


def test_a_truncated_file_is_reported_with_the_fix(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="damaged or truncated; download the model again"):
        read_cast(path, torch.bfloat16)
    header = b'{"a":{"dtype":"F32","shape":[3,3],"data_offsets":[0,30]}}'  # 30 bytes cannot hold 9 floats
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(30))
    with pytest.raises(UserError, match="damaged or truncated"):
        read_cast(path, torch.bfloat16)
    path.write_bytes((2**60).to_bytes(8, "little") + b"{}")  # a header size no file has
    with pytest.raises(UserError, match="damaged or truncated"):
        read_cast(path, torch.bfloat16)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(UserError, match="w.safetensors: the weights file is damaged"):
        read_cast(path, torch.bfloat16)


def test_load_cast_matches_diffusers_cast_exactly(tiny_model_dir):
    reference = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet").to(torch.bfloat16)
    streamed = load_cast(UNet2DConditionModel, tiny_model_dir / "unet", torch.bfloat16)
    assert streamed is not None and not streamed.training
    expected = reference.state_dict()
    got = streamed.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert parameter_count(UNet2DConditionModel, dict(reference.config)) == sum(p.numel() for p in reference.parameters())


def test_other_layouts_fall_back_to_diffusers(tiny_model_dir, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(tiny_model_dir / "unet", folder)
    # Keys diffusers would have to convert (or report): not ours to guess.
    weights = read_cast(folder / WEIGHTS_NAME, torch.float32)
    weights["renamed.weight"] = weights.pop("conv_in.weight")
    save_file(weights, str(folder / WEIGHTS_NAME))
    assert load_cast(UNet2DConditionModel, folder, torch.bfloat16) is None
    # A dtype this reader does not handle.
    header = b'{"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}'
    (folder / WEIGHTS_NAME).write_bytes(len(header).to_bytes(8, "little") + header + bytes(2))
    assert load_cast(UNet2DConditionModel, folder, torch.bfloat16) is None
    # No single safetensors file (sharded or .bin weights).
    (folder / WEIGHTS_NAME).unlink()
    assert load_cast(UNet2DConditionModel, folder, torch.bfloat16) is None


def test_a_model_cast_on_load_has_the_same_unet_as_one_cast_after(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), dtype_for=lambda n: torch.bfloat16)
    reference = load_base_model(str(tiny_model_dir))
    for key, value in reference.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[key], value.to(torch.bfloat16)), key
    assert not model.unet.training and model.family == reference.family == "sd1"


def test_a_broken_unet_config_is_reported(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "unet" / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="cannot load unet/ .*config.json"):
        load_base_model(str(folder))
    json.loads((tiny_model_dir / "unet" / "config.json").read_text())  # the fixture itself is untouched
