"""SDXL end to end on a tiny SDXL pipeline: the real CLI trains, the file loads in diffusers' SDXL pipeline
and reproduces the trained U-Net and both text encoders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sd_lora.config import TrainConfig, load_config
from sd_lora.models.conditioning import sdxl_time_ids
from sd_lora.models.load import load_base_model
from sd_lora.train import main, prepare_models, run

FAST = ["--resolution", "32", "--batch-size", "2", "--rank", "4", "--sample-steps", "2", "--sample-seeds", "1"]


def _outputs(unet, te1, te2, seed=0):
    """U-Net prediction with full SDXL conditioning, and both encoders' conditioning outputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 600, (2, 77), generator=g)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
        h2, pooled = out2.hidden_states[-2], out2.text_embeds
        time_ids = sdxl_time_ids(torch.tensor([[40, 36], [32, 32]]), torch.tensor([[2, 0], [0, 0]]), torch.tensor([[32, 32], [32, 32]]))
        pred = unet(latents, torch.tensor([10, 700]), torch.cat([h1, h2], -1),
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return pred, h1, h2, pooled


@pytest.mark.slow
def test_sdxl_cli_trains_and_diffusers_reproduces_it(tiny_sdxl_model_dir, tiny_dataset, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    config = load_config(["--data", str(tiny_dataset), "--model", str(tiny_sdxl_model_dir), "--output-dir", str(out), *FAST,
                          "--max-steps", "4", "--train-text-encoder", "--learning-rate", "5e-2", "--alpha", "2",
                          "--save-precision", "fp32", "--sample-every", "2", "--flip"])
    result = run(config)
    assert result.state.step == 4
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["data-compare-step00000004.png", "data-step00000000.png", "data-step00000002.png", "data-step00000004.png"]
    with safe_open(str(result.path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # kohya's SGM names, not down_blocks
    assert not any("down_blocks" in k for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    for m in (result.unet, *result.text_encoders):
        m.eval()
    trained = _outputs(result.unet, *result.text_encoders)
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model_dir))
    untouched = _outputs(base.unet, base.text_encoder, base.text_encoder_2)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(trained, untouched))  # all three models changed

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model_dir))
    pipe.load_lora_weights(str(out), weight_name=result.path.name)
    loaded = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for name, a, b in zip(("unet", "te1 hidden", "te2 hidden", "te2 pooled"), loaded, trained):
        assert (a - b).abs().max() < 1e-4, name


def test_sdxl_trains_its_text_encoders_on_long_captions_with_max_token_length_225(tiny_sdxl_model_dir, tiny_dataset, tmp_path):
    """Captions of ~200 tokens: the three windows of both encoders are joined without in-place edits, so the
    text-encoder LoRA gets gradients through them, and the sample grids read the prompts the same way."""
    for path in (tiny_dataset / "2_zkchar").glob("*.txt"):
        path.write_text(path.read_text() + ", " + ", ".join(f"tag {j}" for j in range(38)))
    tokenizer = load_base_model(str(tiny_sdxl_model_dir)).tokenizer
    lengths = {len(tokenizer(p.read_text(), verbose=False).input_ids) for p in (tiny_dataset / "2_zkchar").glob("*.txt")}
    assert all(152 < n <= 227 for n in lengths)  # three windows each
    out = tmp_path / "out"
    result = run(load_config(["--data", str(tiny_dataset), "--model", str(tiny_sdxl_model_dir), "--output-dir", str(out), *FAST,
                              "--max-steps", "1", "--train-text-encoder", "--sample-every", "1", "--max-token-length", "225"]))
    assert result.state.step == 1
    assert (out / "samples" / "data-step00000001.png").is_file()
    with safe_open(str(result.path), "pt") as f:
        te_up = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("lora_te1", "lora_te2")) and k.endswith("lora_up.weight")}
        assert f.metadata()["ss_max_token_length"] == "225"
    # One step moved every text-encoder LoRA (lora_up starts at 0) but those of TE1's last layer, which feeds
    # nothing (SDXL reads the penultimate layer); TE2's last layer moved through the pooled embedding.
    zero = {k for k, t in te_up.items() if t.abs().max() == 0}
    assert len(te_up) == 6 * (3 + 4) and zero == {k for k in te_up if k.startswith("lora_te1_text_model_encoder_layers_2_")}
    assert len(zero) == 6


@pytest.mark.slow
def test_sdxl_v_prediction_with_zero_terminal_snr(tiny_dataset, tmp_path):
    from sd_lora.models.tiny import save_tiny_sdxl_model

    model = save_tiny_sdxl_model(tmp_path / "vmodel", prediction_type="v_prediction")
    out = tmp_path / "out"
    code = main(["--data", str(tiny_dataset), "--model", str(model), "--output-dir", str(out), *FAST, "--max-steps", "2",
                 "--zero-terminal-snr", "--min-snr-gamma", "5", "--sample-every", "0"])
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    with safe_open(str(out / "data.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"


def test_zero_terminal_snr_refused_for_epsilon_models(tiny_sdxl_model_dir, tiny_dataset, tmp_path, capsys):
    code = main(["--data", str(tiny_dataset), "--model", str(tiny_sdxl_model_dir), "--output-dir", str(tmp_path / "o"),
                 *FAST, "--zero-terminal-snr", "--sample-every", "0"])
    assert code == 2 and "--zero-terminal-snr needs a v-prediction model" in capsys.readouterr().err


def test_clip_skip_on_sdxl_is_warned_about(tiny_sdxl_model_dir, tiny_dataset, tmp_path, capsys):
    """kohya ignores --clip_skip for SDXL; here --clip-skip 2 reads one layer further back than SDXL's penultimate."""
    code = main(["--data", str(tiny_dataset), "--model", str(tiny_sdxl_model_dir), "--output-dir", str(tmp_path / "o"),
                 *FAST, "--clip-skip", "2", "--max-steps", "1", "--sample-every", "0"])
    assert code == 0
    assert ("warning: --clip-skip 2 on SDXL conditions on hidden state 3 from the end: SDXL already uses the penultimate "
            "at 1. kohya ignores --clip_skip for SDXL" in capsys.readouterr().err)


def test_zero_terminal_snr_schedule_ends_in_pure_noise(tiny_sdxl_model_dir):
    from sd_lora.models.load import load_base_model

    plain = load_base_model(str(tiny_sdxl_model_dir))
    rescaled = load_base_model(str(tiny_sdxl_model_dir), zero_terminal_snr=True)
    assert plain.family == rescaled.family == "sdxl" and plain.text_encoder_2 is not None
    assert plain.alphas_cumprod[-1] > 1e-3 and rescaled.alphas_cumprod[-1] < 1e-6


def test_fp16_keeps_the_sdxl_vae_in_exact_fp32(tiny_sdxl_model_dir):
    """SDXL's VAE stays fp32 under fp16; it must not pass through fp16 on the way (a lossy round trip)."""
    model = load_base_model(str(tiny_sdxl_model_dir))
    reference = {k: v.clone() for k, v in model.vae.state_dict().items()}
    prepare_models(TrainConfig(rank=2), model, torch.device("cpu"), torch.float16)
    assert {p.dtype for p in model.unet.parameters() if not p.requires_grad} == {torch.float16}
    for name, value in model.vae.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, reference[name]), name



def test_fp16_keeps_a_replaced_vae_in_fp32_unless_its_config_says_it_is_fp16_safe(tiny_sdxl_model_dir, tmp_path):
    """Any --vae went to fp16 under fp16, the original SDXL VAE too (stabilityai/sdxl-vae, sdxl_vae.safetensors):
    NaN latents. Only a VAE whose config says force_upcast: false (the fp16-fix VAE) may."""
    from diffusers import AutoencoderKL

    for force_upcast, expected in ((True, torch.float32), (False, torch.float16)):
        AutoencoderKL.from_pretrained(str(tiny_sdxl_model_dir / "vae"), force_upcast=force_upcast).save_pretrained(tmp_path / str(force_upcast))
        model = load_base_model(str(tiny_sdxl_model_dir), vae=str(tmp_path / str(force_upcast)))
        prepare_models(TrainConfig(rank=2), model, torch.device("cpu"), torch.float16)
        assert {p.dtype for p in model.vae.parameters()} == {expected}, force_upcast


@pytest.mark.slow
def test_sdxl_bf16_run_samples_with_its_text_encoders_released(tiny_sdxl_model_dir, tiny_dataset, tmp_path):
    # Every module in bf16 and the frozen text encoders let go after caching: the grids come from prompts
    # encoded ahead, through a pipeline without text encoders, decoded by the bf16 VAE.
    import numpy as np
    from PIL import Image

    out = tmp_path / "out"
    config = load_config(["--data", str(tiny_dataset), "--model", str(tiny_sdxl_model_dir), "--output-dir", str(out), *FAST,
                          "--max-steps", "2", "--mixed-precision", "bf16", "--sample-every", "2"])
    result = run(config)
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["data-compare-step00000002.png", "data-step00000000.png", "data-step00000002.png"]
    for name in grids:
        assert np.asarray(Image.open(out / "samples" / name).convert("L")).std() > 0
    assert result.outputs.model.vae.dtype == torch.bfloat16
    assert all(p.device.type == "meta" for encoder in result.text_encoders for p in encoder.parameters())
