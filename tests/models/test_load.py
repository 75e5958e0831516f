"""Loading base models from diffusers folders, and the refusals for everything else."""

import json

import pytest
import torch

from sd_lora.errors import UserError
from sd_lora.models.load import _variant, detect_family, load_base_model
from sd_lora.models.text import encode_tokens, tokenize, too_long


def test_loads_tiny_sd1_folder(tiny_model_dir):
    m = load_base_model(str(tiny_model_dir))
    assert (m.family, m.prediction_type) == ("sd1", "epsilon")
    assert m.vae_scale_factor == 2 and m.pixel_step == 4 and m.native_resolution == 32
    assert m.alphas_cumprod.shape == (1000,) and m.num_train_timesteps == 1000
    assert m.tokenizer.model_max_length == 77


def test_v_prediction_read_from_scheduler_and_overridable(tiny_v_model_dir, capsys):
    assert load_base_model(str(tiny_v_model_dir)).prediction_type == "v_prediction"
    assert load_base_model(str(tiny_v_model_dir), prediction_type="v_prediction").prediction_type == "v_prediction"
    assert "warning" not in capsys.readouterr().err  # the model's own type, as a resumed run's config.toml names it
    overridden = load_base_model(str(tiny_v_model_dir), prediction_type="epsilon")
    # an override against the scheduler is said: a config.toml reused for another model carries its type along
    assert "its scheduler predicts v_prediction, but --prediction-type epsilon" in capsys.readouterr().err
    # the sample grids' schedulers are built from scheduler_config: it must say what training predicts
    assert overridden.prediction_type == overridden.scheduler_config["prediction_type"] == "epsilon"
    assert load_base_model(str(tiny_v_model_dir)).family == "sd2"


def test_family_detection_from_full_size_configs():
    assert detect_family({"cross_attention_dim": 768}, {}, "x") == "sd1"
    assert detect_family({"cross_attention_dim": 1024, "use_linear_projection": True}, {}, "x") == "sd2"
    sdxl_index = {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    assert detect_family({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, sdxl_index, "x") == "sdxl"
    with pytest.raises(UserError, match="refiner"):
        detect_family({"cross_attention_dim": 1280, "addition_embed_type": "text_time"}, {"text_encoder": []}, "x")
    with pytest.raises(UserError, match="two text encoders but no SDXL U-Net"):
        detect_family({"cross_attention_dim": 2048}, sdxl_index, "x")


def test_refusals(tmp_path):
    with pytest.raises(UserError, match="no such folder, and not a Hugging Face id"):
        load_base_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load_base_model(str(tmp_path))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "v1-5-pruned.safetensors").write_bytes(b"x")  # a folder of single files, given for the file
    with pytest.raises(UserError, match=r"no model_index.json\); it holds the checkpoint file v1-5-pruned.safetensors: pass it as --model"):
        load_base_model(str(tmp_path / "sub"))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(UserError, match="not a valid .safetensors file"):
        load_base_model(str(ckpt))
    (tmp_path / "model_index.json").write_text(json.dumps({}))
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        load_base_model(str(tmp_path))


def test_clip_skip_uses_earlier_hidden_state(tiny_model_dir):
    m = load_base_model(str(tiny_model_dir))
    ids = tokenize(m.tokenizer, ["zkchar, a red circle", "a " * 100])
    assert ids.shape == (2, 77)
    assert too_long(m.tokenizer, ["zkchar, a red circle", "a " * 100, "a " * 100]) == {"a " * 100: 102}  # + start, end
    with torch.no_grad():
        last = encode_tokens(m.text_encoder, ids, 1)
        skip2 = encode_tokens(m.text_encoder, ids, 2)
        hidden = m.text_encoder(ids, output_hidden_states=True).hidden_states
    assert last.shape == skip2.shape == (2, 77, 32)
    assert torch.allclose(skip2, m.text_encoder.final_layer_norm(hidden[-2]))
    assert not torch.allclose(last, skip2)


def test_dtype_for_picks_the_storage_dtype_from_the_unet_size(tiny_model_dir):
    seen = []

    def dtype_for(unet_parameters):
        seen.append(unet_parameters)
        return torch.bfloat16

    model = load_base_model(str(tiny_model_dir), dtype_for=dtype_for)
    assert seen == [sum(p.numel() for p in model.unet.parameters())]
    for module in (model.unet, model.vae, model.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    reference = load_base_model(str(tiny_model_dir))
    assert {p.dtype for p in reference.unet.parameters()} == {torch.float32}
    name, weight = next(iter(reference.text_encoder.state_dict().items()))
    assert torch.equal(model.text_encoder.state_dict()[name], weight.to(torch.bfloat16))


def test_sdxl_vae_stays_fp32_when_the_rest_loads_in_fp16(tiny_sdxl_model_dir):
    model = load_base_model(str(tiny_sdxl_model_dir), dtype_for=lambda n: torch.float16)
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    for module in (model.unet, model.text_encoder, model.text_encoder_2):
        assert {p.dtype for p in module.parameters()} == {torch.float16}


def test_loads_a_folder_of_fp16_variant_weights_only(tiny_model_dir, tmp_path):
    """`variant="fp16"` downloads hold `*.fp16.safetensors` and no plain weights; diffusers finds them only
    when told the variant."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert not list((tmp_path / "fp16").glob("*/diffusion_pytorch_model.safetensors"))
    m = load_base_model(str(tmp_path / "fp16"))
    assert m.family == "sd1"
    expected = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    assert torch.equal(m.unet.conv_in.weight, expected.unet.conv_in.weight.half().float())
    pipe.unet.save_pretrained(tmp_path / "sharded" / "unet", variant="fp16", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded" / "unet").glob("*.fp16-0000*.safetensors"))) > 1
    assert _variant(tmp_path / "sharded" / "unet") == "fp16" and _variant(tiny_model_dir / "unet") is None


def test_half_precision_weights_load_in_the_dtype_asked_for(tiny_model_dir, tmp_path):
    """Many published folders store fp16 weights under the plain names; transformers 5 would keep the text
    encoder in the file's dtype unless told one."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float16).save_pretrained(tmp_path / "half")
    m = load_base_model(str(tmp_path / "half"))
    for module in (m.unet, m.vae, m.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_vae_of_another_architecture_or_family_is_refused(tiny_model_dir, tiny_sdxl_model_dir, tmp_path):
    """A 16-channel VAE used to fail mid-training with a conv traceback; an SD1.x VAE on SDXL (another
    scaling_factor) trained without error on latents the U-Net never saw."""
    from sd_lora.models.tiny import tiny_vae

    tiny_vae(latent_channels=16).save_pretrained(tmp_path / "vae16")
    with pytest.raises(UserError, match=r"--vae .*vae16: makes 16-channel latents, but the sd1 U-Net takes 4"):
        load_base_model(str(tiny_model_dir), vae=str(tmp_path / "vae16"))
    with pytest.raises(UserError, match=r"scaling_factor is 0.18215, the model's own VAE uses 0.13025.*made for sdxl"):
        load_base_model(str(tiny_sdxl_model_dir), vae=str(tiny_model_dir))  # a model folder: its vae/
    m = load_base_model(str(tiny_sdxl_model_dir), vae=str(tiny_sdxl_model_dir / "vae"))
    assert m.vae_name == str(tiny_sdxl_model_dir / "vae")


def test_a_mistyped_local_path_is_named_missing_not_a_hub_problem(tmp_path, monkeypatch):
    """"models/sd15x" or "models/sd15.safetensor" look like Hub ids: the error sent the user to check the id,
    their network and their Hugging Face login, never saying the local path is not there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    (tmp_path / "models" / "xl.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"there is no local folder models/sd15x; did you mean models/sd15\?"):
        load_base_model("models/sd15x")
    with pytest.raises(UserError, match=r"^--model models/xI.safetensors: no such file; did you mean models/xl.safetensors\?$"):
        load_base_model("models/xI.safetensors")


def test_vae_from_a_single_file(tiny_sdxl_model_dir, tmp_path):
    """A1111-style VAE files (`sdxl_vae.safetensors`: original LDM names, no config) were refused; they load
    under the model's own VAE config, bit-exact. A file that is no VAE (a LoRA) is a UserError, not a traceback."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from sd_lora.models.single_file import checkpoint_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model_dir))
    full = checkpoint_state_dict(pipe.components, "sdxl")
    prefix = "first_stage_model."
    save_file({k[len(prefix):]: v.contiguous() for k, v in full.items() if k.startswith(prefix)}, tmp_path / "xl_vae.safetensors")
    m = load_base_model(str(tiny_sdxl_model_dir), vae=str(tmp_path / "xl_vae.safetensors"))
    expected = AutoencoderKL.from_pretrained(str(tiny_sdxl_model_dir / "vae")).state_dict()
    assert m.vae.config.scaling_factor == 0.13025
    assert m.vae.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[k]) for k, t in m.vae.state_dict().items())
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, tmp_path / "lora.safetensors")
    with pytest.raises(UserError, match=r"--vae .*lora.safetensors: cannot load it as the sdxl model's VAE"):
        load_base_model(str(tiny_sdxl_model_dir), vae=str(tmp_path / "lora.safetensors"))


def test_a_folder_whose_unet_takes_more_than_4_channels_is_refused(tiny_v_model_dir, tmp_path):
    """An SD2 inpainting (9 channels) or depth (5) folder crashed at the first step's conv_in; the single-file path
    refuses the same U-Net up front, saying why."""
    import shutil

    folder = shutil.copytree(tiny_v_model_dir, tmp_path / "inpaint")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    with pytest.raises(UserError, match="9 input channels .*inpainting"):
        load_base_model(str(folder))
