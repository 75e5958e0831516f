"""Single-file checkpoints: our writer against diffusers' own single-file loader, detection, offline loading,
pickle refusal, full-size key sets on the meta device, and one training step on a loaded checkpoint."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_lora.errors import UserError
from sd_lora.models.checkpoint_layout import checkpoint_state_dict
from sd_lora.models.single_file import (
    SKELETONS,
    detect_checkpoint,
    detect_from_shapes,
    infer_family,
    load_single_file,
    read_safetensors_header,
    save_single_file,
    write_skeleton,
)


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from sd_lora.models.tiny import save_tiny_sdxl_model

    return save_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clip-tokenizer-cache")


def _folder(request, family: str) -> Path:
    fixture = {"sd1": "tiny_model_dir", "sd2-v": "tiny_v_model_dir", "sdxl": "tiny_sdxl_dir"}[family]
    return request.getfixturevalue(fixture)


def _pipeline(folder: Path):
    """The tiny pipeline with every parameter perturbed: freshly initialised norms are all ones and zeros, so
    a writer that swapped two norms would otherwise still round-trip "bit-exactly"."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in pipe.components.values():
            for p in module.parameters() if isinstance(module, torch.nn.Module) else ():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return pipe


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, what: str) -> None:
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys(), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture
def no_network(monkeypatch):
    """Hub offline mode off (the suite sets HF_HUB_OFFLINE=1), every connection attempt refused and recorded:
    the test fails if anything tried the network, even where a library swallowed the error."""
    import huggingface_hub.constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append((args, kwargs))
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts[:3]}"


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_written_file_loads_back_bit_exact_in_diffusers_and_ours(request, tmp_path, family, no_network):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = _folder(request, family)
    pipe = _pipeline(folder)
    base = family.split("-")[0]
    assert infer_family(pipe.components) == base
    path = save_single_file(pipe.components, tmp_path / f"{family}.safetensors")

    # The oracle: diffusers' own single-file conversion, given the tiny folder as config.
    cls = StableDiffusionXLPipeline if base == "sdxl" else StableDiffusionPipeline
    oracle = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    ours = load_single_file(path, config_dir=folder)

    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if base == "sdxl" else [])
    for name in names:
        _assert_same_weights(pipe.components[name], oracle.components[name], f"diffusers {name}")
        _assert_same_weights(pipe.components[name], ours[name], f"sd_lora {name}")
    assert ours["family"] == base and ours["info"].family == base
    assert ours["prediction_type"] == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert ours["scheduler_config"]["prediction_type"] == ours["prediction_type"]
    assert ours["tokenizer"]("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    if base == "sdxl":
        assert ours["tokenizer_2"].pad_token == "!"


def test_a_file_name_that_is_not_utf8_gets_a_readable_title(request, tmp_path):
    """A Latin-1 file name (a Windows zip unpacked on Linux) is a valid path, but safetensors metadata is UTF-8."""
    import os

    pipe = _pipeline(_folder(request, "sd1"))
    path = save_single_file(pipe.components, tmp_path / os.fsdecode(b"caf\xe9.safetensors"), "sd1")
    assert read_safetensors_header(path)[1]["modelspec.title"] == "caf\ufffd"


def test_layout_names_and_markers(request, tmp_path):
    pipe = _pipeline(_folder(request, "sd2-v"))
    path = save_single_file(pipe.components, tmp_path / "m.safetensors", "sd2")
    shapes, metadata = read_safetensors_header(path)
    # Names A1111 / ComfyUI look for, in the original layout.
    assert "model.diffusion_model.input_blocks.0.0.weight" in shapes
    assert "model.diffusion_model.out.0.weight" in shapes  # conv_norm_out
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in shapes  # resnet norm1
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.norm3.bias" in shapes
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)  # 1x1 conv, as in LDM
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in shapes  # diffusers up_blocks.0 = LDM up.1
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in shapes
    assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (96, 32)  # q|k|v
    assert "cond_stage_model.model.positional_embedding" in shapes
    # v-prediction markers: the key ComfyUI reads and the metadata our detection reads.
    assert shapes["v_pred"] == (0,)
    assert metadata["modelspec.prediction_type"] == "v"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["modelspec.resolution"] == "32x32"


def test_detection_of_tiny_checkpoints_and_prediction_sources(request, tmp_path):
    pipe = _pipeline(_folder(request, "sd2-v"))
    path = save_single_file(pipe.components, tmp_path / "tiny.safetensors", "sd2")
    info = detect_checkpoint(path)
    assert (info.family, info.prediction_type, info.prediction_source, info.resolution) == ("sd2", "v_prediction", "key", 32)
    assert "v_pred" in str(info) and "cross-attention context width 32" in str(info)
    assert detect_checkpoint(path, prediction_type="epsilon").prediction_type == "epsilon"

    # The same file stripped of every marker: SD2 cannot be told apart, says so, and assumes epsilon ...
    bare = tmp_path / "bare.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if k != "v_pred"}
    save_file(tensors, bare)
    info = detect_checkpoint(bare)
    assert (info.prediction_type, info.prediction_source) == ("epsilon", "default")
    assert "--prediction-type v_prediction" in str(info)
    # ... unless a config folder says v (its scheduler), an A1111 .yaml sidecar does, or the file name does.
    assert load_single_file(bare, config_dir=_folder(request, "sd2-v"))["prediction_type"] == "v_prediction"
    bare.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert detect_checkpoint(bare).prediction_source == "yaml"
    assert detect_checkpoint(bare).prediction_type == "v_prediction"
    named = tmp_path / "model-768-v.safetensors"
    save_file(tensors, named)
    assert detect_checkpoint(named).prediction_type == "v_prediction"
    # A `ztsnr` key: a zero-terminal-SNR schedule, sampled from its last step as --zero-terminal-snr samples
    # (its grids began at t = 951 with "leading" spacing).
    ztsnr = tmp_path / "ztsnr.safetensors"
    save_file({**load_file(path), "ztsnr": torch.zeros(0)}, ztsnr)
    scheduler = load_single_file(ztsnr, config_dir=_folder(request, "sd2-v"))["scheduler_config"]
    assert (scheduler["rescale_betas_zero_snr"], scheduler["timestep_spacing"]) == (True, "trailing")


def test_sd2_statistic_heuristic_and_sdxl_v_pred_keys():
    shapes = _minimal_shapes("sd2") | {"model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,)}
    g = torch.Generator().manual_seed(0)
    for std, expected in ((0.2, "v_prediction"), (0.02, "epsilon")):
        bias = torch.randn(320, generator=g) * std
        info = detect_from_shapes(shapes, read_tensor=lambda key, b=bias: b)
        assert (info.prediction_type, info.prediction_source) == (expected, "statistic")
        assert info.resolution == (768 if expected == "v_prediction" else 512)
    info = detect_from_shapes(_minimal_shapes("sdxl") | {"v_pred": (0,), "ztsnr": (0,)})
    assert (info.family, info.prediction_type, info.zero_terminal_snr, info.resolution) == ("sdxl", "v_prediction", True, 1024)
    assert detect_from_shapes(_minimal_shapes("sd1")).prediction_type == "epsilon"


def _minimal_shapes(family: str) -> dict[str, tuple[int, ...]]:
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    context = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
    unet["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] = (640, context)
    text = {
        "sd1": {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
        "sd2": {"cond_stage_model.model.ln_final.weight": (1024,)},
        "sdxl": {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                 "conditioner.embedders.1.model.ln_final.weight": (1280,),
                 "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)},
    }[family]
    return unet | text


FULL_SIZE = {  # family -> (diffusers' own model-type guess, tensors written per component)
    "sd1": ("v1", {"unet": 686, "vae": 248, "text_encoder": 196}),
    "sd2": ("v2", {"unet": 686, "vae": 248, "text_encoder": 4 + 12 * 23}),  # 23 layers, q|k|v fused: 12 per layer
    "sdxl": ("xl_base", {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 5 + 12 * 32}),
}


def _full_size_components(family: str, skeleton: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(skeleton), subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(str(skeleton), subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(str(skeleton / "text_encoder"))),
        }
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(skeleton / "text_encoder_2")))
    return parts


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_key_sets_on_meta_device(family, tmp_path, tokenizer_cache):
    """SD1.5, SD2.1 and SDXL base built from the shipped skeletons, written by our writer (names and shapes
    only): diffusers recognises the model type, its converters map every key back, and we detect the family."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    skeleton = write_skeleton(family, tmp_path / "skeleton", prediction_type="epsilon", resolution=1024 if family == "sdxl" else 512,
                              tokenizer_cache=tokenizer_cache)
    parts = _full_size_components(family, skeleton)
    checkpoint = checkpoint_state_dict(parts, family)
    diffusers_type, counts = FULL_SIZE[family]
    assert infer_diffusers_model_type(checkpoint) == diffusers_type

    shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
    info = detect_from_shapes(shapes)
    assert info.family == family and f"context width {({'sd1': 768, 'sd2': 1024, 'sdxl': 2048})[family]}" in str(info)

    back = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, dict(parts["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, dict(parts["vae"].config)),
    }
    if family == "sd2":
        back["text_encoder"] = convert_open_clip_checkpoint(parts["text_encoder"], checkpoint)
    else:
        back["text_encoder"] = convert_ldm_clip_checkpoint(checkpoint)
    if family == "sdxl":
        back["text_encoder_2"] = convert_open_clip_checkpoint(parts["text_encoder_2"], checkpoint, prefix="conditioner.embedders.1.model.")
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
                "text_encoder_2": "conditioner.embedders.1."}
    for name, converted in back.items():
        # Compared without "text_model.": transformers >= 5.6 flattened CLIPTextModel, not the projection model.
        expected = {k.removeprefix("text_model."): tuple(v.shape) for k, v in parts[name].state_dict().items()
                    if not k.endswith("position_ids")}
        got = {k.removeprefix("text_model."): tuple(v.shape) for k, v in converted.items()}
        assert got == expected, f"{family} {name}: {sorted(set(got) ^ set(expected))[:5]}"
        assert sum(k.startswith(prefixes[name]) for k in checkpoint) == counts[name]
    assert len(checkpoint) == sum(counts.values())


def test_skeletons_are_the_full_size_configs(tmp_path, tokenizer_cache):
    from transformers import CLIPTokenizer

    skeleton = write_skeleton("sdxl", tmp_path / "sdxl", prediction_type="v_prediction", resolution=1024,
                              zero_terminal_snr=True, tokenizer_cache=tokenizer_cache)
    scheduler = json.loads((skeleton / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing"  # sampling starts at t = 999, where the SNR is 0
    assert json.loads((skeleton / "unet" / "config.json").read_text())["sample_size"] == 128
    tok, tok2 = (CLIPTokenizer.from_pretrained(str(skeleton / t)) for t in ("tokenizer", "tokenizer_2"))
    assert len(tok) == len(tok2) == 49408 and (tok.pad_token, tok2.pad_token) == ("<|endoftext|>", "!")
    sd2 = write_skeleton("sd2", tmp_path / "sd2", prediction_type="v_prediction", resolution=768, tokenizer_cache=tokenizer_cache)
    assert json.loads((sd2 / "unet" / "config.json").read_text())["sample_size"] == 96
    assert CLIPTokenizer.from_pretrained(str(sd2 / "tokenizer")).pad_token == "!"
    assert sorted(p.name for p in SKELETONS.iterdir() if p.is_dir()) == ["sd1", "sd2", "sdxl"]


def test_pickled_checkpoints_need_the_flag(request, tmp_path):
    folder = _folder(request, "sd1")
    pipe = _pipeline(folder)
    tensors = checkpoint_state_dict(pipe.components, "sd1")
    plain = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 470000}, plain)
    with pytest.raises(UserError, match="pickle.*arbitrary code.*--allow-unsafe-pickle"):
        load_single_file(plain, config_dir=folder)
    with pytest.raises(UserError, match="--allow-unsafe-pickle"):
        detect_checkpoint(plain)

    loaded = load_single_file(plain, config_dir=folder, allow_unsafe_pickle=True)
    _assert_same_weights(pipe.unet, loaded["unet"], "unet from .ckpt")
    assert "weights_only=True" in str(loaded["info"])

    # A pickle that weights_only refuses (a non-tensor object inside) falls back to full unpickling.
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": tensors, "hparams": argparse.Namespace(lr=1e-4)}, legacy)
    loaded = load_single_file(legacy, config_dir=folder, allow_unsafe_pickle=True)
    _assert_same_weights(pipe.text_encoder, loaded["text_encoder"], "text encoder from legacy .ckpt")
    assert "full unpickling" in str(loaded["info"])


def test_refusals(request, tmp_path):
    def write(name, keys):
        path = tmp_path / name
        save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
        return path

    sd1 = _minimal_shapes("sd1")
    cases = {
        "lora.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "is a LoRA file"),
        "unet.safetensors": ({"conv_in.weight": (32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (1,)}, "one diffusers component"),
        "inpaint.safetensors": (sd1 | {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "9 input channels"),
        "unet-only.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "no text encoder"),
        "no-vae.safetensors": ({k: s for k, s in sd1.items() if not k.startswith("first_stage")}, "without first_stage_model"),
        "refiner.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
                                 "conditioner.embedders.0.model.ln_final.weight": (1280,)}, "refiner"),
    }
    for name, (keys, message) in cases.items():
        with pytest.raises(UserError, match=message):
            detect_checkpoint(write(name, keys))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a valid .safetensors"):
        detect_checkpoint(broken)
    with pytest.raises(UserError, match="no such file"):
        load_single_file(tmp_path / "missing.safetensors")
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown checkpoint type"):
        load_single_file(tmp_path / "model.gguf")
    # A tiny checkpoint against configs of another shape / family: a clear error, not a traceback.
    pipe = _pipeline(_folder(request, "sd1"))
    path = save_single_file(pipe.components, tmp_path / "tiny.safetensors", "sd1")
    with pytest.raises(UserError, match="cannot load as sd1") as caught:
        load_single_file(path, config_dir=_folder(request, "sd2-v"))
    assert "--model-config" not in str(caught.value)  # the user gave one already
    # the folder the user gave is named as the likely culprit, not the file's "non-standard sd1" architecture
    assert f"the config folder {_folder(request, 'sd2-v')} does not describe this file's architecture" in str(caught.value)
    assert "standard sd1" not in str(caught.value)
    with pytest.raises(UserError, match="pass --model-config with a diffusers folder of its architecture") as caught:
        load_single_file(path)  # a reduced-size model against the shipped full-size configs
    assert "low_cpu_mem_usage" not in str(caught.value)  # diffusers' hint about its own arguments is cut
    with pytest.raises(UserError, match="does not fit the sd1 checkpoint"):
        load_single_file(path, config_dir=_folder(request, "sdxl"))


def test_half_precision_file_and_loading_dtype(request, tmp_path):
    pipe = _pipeline(_folder(request, "sd1"))
    path = save_single_file(pipe.components, tmp_path / "half.safetensors", "sd1", dtype=torch.float16,
                            metadata={"modelspec.title": "half"})
    assert read_safetensors_header(path)[1]["modelspec.title"] == "half"
    loaded = load_single_file(path, config_dir=_folder(request, "sd1"))
    for name, p in pipe.unet.state_dict().items():
        assert torch.equal(loaded["unet"].state_dict()[name], p.half().float()), name
    half = load_single_file(path, config_dir=_folder(request, "sd1"), dtype=torch.float16)
    for name, p in pipe.text_encoder.state_dict().items():
        assert torch.equal(half["text_encoder"].state_dict()[name], p.half()), name
    assert half["unet"].dtype == half["vae"].dtype == torch.float16


def test_dtype_for_picks_the_loading_dtype_from_the_unet_config(request, tmp_path):
    pipe = _pipeline(_folder(request, "sdxl"))
    path = save_single_file(pipe.components, tmp_path / "xl.safetensors", "sdxl")
    seen = []

    def dtype_for(unet_parameters):
        seen.append(unet_parameters)
        return torch.float16

    loaded = load_single_file(path, config_dir=_folder(request, "sdxl"), dtype_for=dtype_for)
    assert seen == [sum(p.numel() for p in pipe.unet.parameters())]  # counted before any weight was read
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in loaded[name].parameters()} == {torch.float16}, name
    # SDXL's own VAE overflows in fp16: it loads in fp32, its weights exactly the file's.
    for name, p in pipe.vae.state_dict().items():
        assert torch.equal(loaded["vae"].state_dict()[name], p), name


def test_single_file_checkpoint_trains_one_lora_step(request, tmp_path):
    from sd_lora.diffusion import add_noise, diffusion_loss, training_target
    from sd_lora.lora.inject import inject_lora, trainable_parameters
    from sd_lora.lora.targets import unet_target_modules
    from sd_lora.models.text import encode_tokens, tokenize

    folder = _folder(request, "sd2-v")
    path = save_single_file(_pipeline(folder).components, tmp_path / "base.safetensors", "sd2")
    m = load_single_file(path, config_dir=folder)
    unet, vae, scheduler = m["unet"], m["vae"], m["scheduler"]
    inject_lora(unet, unet_target_modules(unet), rank=4, alpha=4)
    params = trainable_parameters(unet)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = vae.encode(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        ids = tokenize(m["tokenizer"], ["zkchar, a red circle", "a blue square"])
        text = encode_tokens(m["text_encoder"], ids)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    noisy = add_noise(latents, noise, timesteps, alphas_cumprod)
    target = training_target(m["prediction_type"], latents, noise, timesteps, alphas_cumprod)
    loss = diffusion_loss(unet(noisy, timesteps, text).sample, target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "the LoRA step changed nothing"
