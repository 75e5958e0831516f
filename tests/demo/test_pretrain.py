"""`python -m sd_lora.demo.pretrain`: a smoke run writes a loadable model; --vae-from reuses a trained VAE."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sd_lora.demo import pretrain


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "base"
    assert pretrain.main(["--quick", "--no-eval", "--output", str(out)]) == 0
    return out


def test_quick_run_writes_a_model_that_loads_and_samples(quick_model):
    from sd_lora.demo import evaluate

    pipe, base = evaluate.load_pipeline(quick_model)
    assert base.vae_scale_factor == 4 and base.unet.config.sample_size == 16
    images = evaluate.generate(pipe, ["a red circle on a blue background"], evaluate.GenerationSettings(seeds=(0,), steps=2))
    assert images[0][0].size == (64, 64)


def test_vae_from_reuses_the_vae_and_writes_the_same_config(quick_model, tmp_path):
    out = tmp_path / "again"
    assert pretrain.main(["--quick", "--no-eval", "--output", str(out), "--vae-from", str(quick_model)]) == 0
    before, after = (load_file(str(d / "vae" / "diffusion_pytorch_model.safetensors")) for d in (quick_model, out))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "vae" / "config.json").read_text()) == json.loads((quick_model / "vae" / "config.json").read_text())
    # Stage 2 is seeded: with the same VAE it trains the same U-Net.
    unet_before, unet_after = (load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors")) for d in (quick_model, out))
    assert all(torch.equal(unet_before[k], unet_after[k]) for k in unet_before)


def test_vae_from_a_folder_without_a_vae_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--quick", "--no-eval", "--output", str(tmp_path / "x"), "--vae-from", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--vae-from {tmp_path}: no vae/config.json there" in err


def test_vae_from_a_different_vae_or_with_vae_steps_is_refused(quick_model, tmp_path, capsys):
    other = tmp_path / "other"
    (other / "vae").mkdir(parents=True)
    config = json.loads((quick_model / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    with pytest.raises(SystemExit):
        pretrain.main(["--quick", "--no-eval", "--output", str(tmp_path / "x"), "--vae-from", str(other)])
    assert "its VAE has latent_channels=16 where this script builds 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["--quick", "--no-eval", "--output", str(tmp_path / "x"), "--vae-from", str(quick_model), "--vae-steps", "5"])
    assert "--vae-steps trains stage 1, which --vae-from skips" in capsys.readouterr().err
