"""`sd_lora.api`: LoRA files of any format on a pipeline, several at once with weights, and unloading.

Two adapters at 0.7 / 0.3 (a kohya file with alpha != rank and a diffusers file with another rank) must give the
U-Net and text-encoder outputs of the base model with W + 0.7 * dW_a + 0.3 * dW_b merged by hand; unloading
must give the base model's outputs back bit for bit.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sd_lora.api import load_lora, lora_scales, set_lora_scales, unload_lora
from sd_lora.errors import UserError
from sd_lora.formats.diffusers_format import to_diffusers_state_dict
from sd_lora.formats.kohya import save_lora_file, to_kohya_state_dict
from sd_lora.lora.inject import LoraModuleWeights
from sd_lora.lora.targets import text_encoder_target_modules, unet_target_modules
from sd_lora.models.tiny import build_tiny_pipeline

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pristine():
    return build_tiny_pipeline("sd1")


def _components(pipe, rank: int, alpha: float, seed: int, text_encoder: bool = True):
    g = torch.Generator().manual_seed(seed)
    models = {"unet": pipe.unet} | ({"text_encoder": pipe.text_encoder} if text_encoder else {})
    result = {}
    for component, model in models.items():
        modules = dict(model.named_modules())
        paths = unet_target_modules(model) if component == "unet" else text_encoder_target_modules(model)
        result[component] = {}
        for p in paths:
            shape = modules[p].weight.shape
            down = torch.randn(rank, *shape[1:], generator=g) * 0.2
            up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.2
            result[component][p] = LoraModuleWeights(down, up, alpha)
    return result


def _merge_by_hand(pipe, components, weight: float) -> None:
    """W += weight * (alpha / r) * up @ down; no PEFT involved."""
    for component, modules in components.items():
        layers = dict(getattr(pipe, component).named_modules())
        with torch.no_grad():
            for path, w in modules.items():
                W = layers[path].weight
                W += (weight * w.alpha / w.rank * (w.up.flatten(1) @ w.down.flatten(1))).reshape(W.shape)


def _outputs(pipe):
    g = torch.Generator().manual_seed(7)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    ids = torch.randint(0, 300, (1, 77), generator=g)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([321]), states).sample, pipe.text_encoder(ids).last_hidden_state


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture
def files(pristine, tmp_path):
    a = _components(pristine, rank=4, alpha=2.0, seed=1)
    b = _components(pristine, rank=2, alpha=2.0, seed=2, text_encoder=False)  # U-Net only, diffusers format
    save_lora_file(tmp_path / "char.v2.safetensors", to_kohya_state_dict(a), {"ss_base_model_version": "sd_v1"})
    save_file(to_diffusers_state_dict(b), tmp_path / "style.safetensors")
    return a, b, tmp_path


def test_two_adapters_with_weights_match_a_hand_merge_and_unload_restores_base(pristine, files):
    a, b, folder = files
    pipe = copy.deepcopy(pristine)
    base = _outputs(pipe)

    assert load_lora(pipe, folder / "char.v2.safetensors", scale=0.7) == "char_v2"
    assert load_lora(pipe, folder / "style.safetensors", scale=0.3, name="style") == "style"
    assert lora_scales(pipe) == {"char_v2": 0.7, "style": 0.3}
    both = _outputs(pipe)

    merged = copy.deepcopy(pristine)
    _merge_by_hand(merged, a, 0.7)
    _merge_by_hand(merged, b, 0.3)
    diff = _max_diff(both, _outputs(merged))
    print(f"two adapters 0.7/0.3 vs hand merge: max abs diff {diff:.2e}")
    assert diff < TOLERANCE
    assert _max_diff(both, base) > 100 * TOLERANCE

    set_lora_scales(pipe, {"style": 0.0})  # the other adapter keeps its 0.7
    only_a = copy.deepcopy(pristine)
    _merge_by_hand(only_a, a, 0.7)
    assert _max_diff(_outputs(pipe), _outputs(only_a)) < TOLERANCE

    set_lora_scales(pipe, {"style": 0.3})
    unload_lora(pipe, "char_v2")
    only_b = copy.deepcopy(pristine)
    _merge_by_hand(only_b, b, 0.3)
    assert _max_diff(_outputs(pipe), _outputs(only_b)) < TOLERANCE
    assert lora_scales(pipe) == {"style": 0.3}

    unload_lora(pipe, "style")  # the last one: the pipeline is the base model again, exactly
    assert all(torch.equal(x, y) for x, y in zip(_outputs(pipe), base))
    assert not any(type(m).__module__.startswith("peft") for m in pipe.unet.modules())

    load_lora(pipe, folder / "style.safetensors")
    unload_lora(pipe)
    assert all(torch.equal(x, y) for x, y in zip(_outputs(pipe), base)) and lora_scales(pipe) == {}
    set_lora_scales(pipe, lora_scales(pipe))  # nothing loaded, nothing to set: no error
    assert all(torch.equal(x, y) for x, y in zip(_outputs(pipe), base)) and lora_scales(pipe) == {}


def test_refusals_name_the_file(pristine, files, tmp_path):
    _, _, folder = files
    pipe = copy.deepcopy(pristine)
    load_lora(pipe, folder / "style.safetensors")
    with pytest.raises(UserError, match="already loaded"):
        load_lora(pipe, folder / "style.safetensors")
    with pytest.raises(UserError, match="cannot contain"):
        load_lora(pipe, folder / "style.safetensors", name="a.b")
    with pytest.raises(UserError, match="no adapters named 'nope'"):
        set_lora_scales(pipe, {"nope": 1.0})
    with pytest.raises(UserError, match="no adapter named 'nope'"):
        unload_lora(pipe, "nope")
    # a LoRA for another architecture: the tiny SD2's linear proj_in/out factors do not fit SD1's 1x1 convs
    sd2 = build_tiny_pipeline("sd2")
    save_file(to_diffusers_state_dict(_components(sd2, rank=2, alpha=2.0, seed=3)), tmp_path / "sd2.safetensors")
    with pytest.raises(UserError, match=r"sd2.safetensors: 8 modules do not fit this pipeline's model"):
        load_lora(pipe, tmp_path / "sd2.safetensors")
    assert lora_scales(pipe) == {"style": 1.0}
    assert isinstance(pipe.unet.conv_in, nn.Conv2d)


def test_sdxl_kohya_file_with_sgm_names(tmp_path):
    """SDXL: SGM-named kohya file, two text encoders; the loaded pipeline matches a hand merge."""
    from sd_lora.formats.sgm import sgm_module_map
    from sd_lora.models.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(tokenizer_dir=tmp_path / "tok")
    merged = copy.deepcopy(pipe)
    g = torch.Generator().manual_seed(4)
    components = {}
    for component, attr in (("unet", "unet"), ("text_encoder_1", "text_encoder"), ("text_encoder_2", "text_encoder_2")):
        model = getattr(pipe, attr)
        modules = dict(model.named_modules())
        paths = unet_target_modules(model) if component == "unet" else text_encoder_target_modules(model)
        components[component] = {
            p: LoraModuleWeights(torch.randn(2, modules[p].weight.shape[1], generator=g) * 0.2,
                                 torch.randn(modules[p].weight.shape[0], 2, generator=g) * 0.2, 1.0)
            for p in paths
        }  # fmt: skip
    state = to_kohya_state_dict(components, sgm_paths=sgm_module_map(pipe.unet))
    save_lora_file(tmp_path / "xl.safetensors", state, {"ss_base_model_version": "sdxl_base_v1-0"})
    load_lora(pipe, tmp_path / "xl.safetensors", scale=0.5)
    by_attr = {"unet": components["unet"], "text_encoder": components["text_encoder_1"],
               "text_encoder_2": components["text_encoder_2"]}  # fmt: skip
    _merge_by_hand(merged, by_attr, 0.5)

    g = torch.Generator().manual_seed(7)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 80, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    ids = torch.randint(0, 300, (1, 77), generator=g)

    def outputs(p):
        with torch.no_grad():
            return (p.unet(latents, torch.tensor([321]), states, added_cond_kwargs=added).sample,
                    p.text_encoder(ids).last_hidden_state, p.text_encoder_2(ids).text_embeds)  # fmt: skip

    assert _max_diff(outputs(pipe), outputs(merged)) < TOLERANCE


def test_package_level_names_are_the_api():
    import sd_lora
    from sd_lora import api

    assert sd_lora.load_lora is api.load_lora and sd_lora.unload_lora is api.unload_lora
    assert sd_lora.set_lora_scales is api.set_lora_scales


@pytest.mark.parametrize("scale", ["strong", None, float("nan"), float("inf")])
def test_a_bad_scale_is_refused_before_anything_is_loaded(pristine, files, scale):
    """A scale that is no finite number names the file and the value, and leaves the pipeline as it was: the
    same call with a good scale then works (it was refused as "already loaded", the adapter stuck at 1.0)."""
    _, _, folder = files
    pipe = copy.deepcopy(pristine)
    with pytest.raises(UserError, match=rf"style.safetensors: scale {re.escape(repr(scale))} is not a finite number"):
        load_lora(pipe, folder / "style.safetensors", scale=scale)
    assert lora_scales(pipe) == {}
    assert load_lora(pipe, folder / "style.safetensors", scale=0.5) == "style"
    with pytest.raises(UserError, match=rf"adapter 'style': scale {re.escape(repr(scale))} is not a finite number"):
        set_lora_scales(pipe, {"style": scale})
    assert lora_scales(pipe) == {"style": 0.5}
    with pytest.raises(UserError, match=r"set_lora_scales takes \{adapter name: weight\}, such as \{'zkchar': 0.6\}; got 'style'"):
        set_lora_scales(pipe, "style")


def test_pipeline_without_text_encoder(pristine, files):
    """`text_encoder=None` (a common way to save memory): a U-Net-only file loads; one that also changes the text
    encoder is refused with the file's name, not an AttributeError."""
    a, b, folder = files
    pipe = copy.deepcopy(pristine)
    pipe.text_encoder = None
    load_lora(pipe, folder / "style.safetensors", scale=0.3)
    merged = copy.deepcopy(pristine)
    _merge_by_hand(merged, b, 0.3)
    latents, states = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 32)
    with torch.no_grad():
        diff = (pipe.unet(latents, torch.tensor([321]), states).sample
                - merged.unet(latents, torch.tensor([321]), states).sample).abs().max().item()  # fmt: skip
    assert diff < TOLERANCE
    with pytest.raises(UserError, match=r"(?s)char.v2.safetensors: cannot load.*no text_encoder \(it is None\)"):
        load_lora(pipe, folder / "char.v2.safetensors")
    assert lora_scales(pipe) == {"style": 0.3}


def test_a_text_encoder_adapter_loads_without_transformers_false_missing_report(tmp_path, capfd):
    # transformers 5 listed every base weight of the text encoder as MISSING, "newly initialized"; nothing was.
    # It takes keys holding the adapter's name for adapter keys: "w" is in every "weight".
    from diffusers import StableDiffusionPipeline

    from sd_lora.demo.defaults import BASE_MODEL_DIR

    pipe = StableDiffusionPipeline.from_pretrained(str(BASE_MODEL_DIR), safety_checker=None, requires_safety_checker=False)
    save_lora_file(tmp_path / "w.safetensors", to_kohya_state_dict(_components(pipe, rank=2, alpha=2.0, seed=4)),
                   {"ss_base_model_version": "sd_v1"})
    capfd.readouterr()
    assert load_lora(pipe, tmp_path / "w.safetensors") == "w"
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err


def test_modules_diffusers_did_not_load_are_an_error_and_the_adapter_is_removed(pristine, files, monkeypatch):
    _, _, folder = files
    pipe = copy.deepcopy(pristine)
    real = pipe.load_lora_weights

    def drop_one_module(state, adapter_name):
        first = sorted(k for k in state if k.startswith("unet."))[0].rsplit(".lora_", 1)[0]
        return real({k: v for k, v in state.items() if not k.startswith(first + ".")}, adapter_name=adapter_name)

    monkeypatch.setattr(pipe, "load_lora_weights", drop_one_module)
    with pytest.raises(RuntimeError, match=r"style.safetensors: diffusers did not load 1 of its modules \(unet\."):
        load_lora(pipe, folder / "style.safetensors")
    assert lora_scales(pipe) == {}


def test_a_compiled_unet_is_named_not_reported_as_a_file_for_another_model(pristine, files):
    # pipe.unet = torch.compile(pipe.unet), diffusers' speed-up: every module of the file was reported to "match no
    # layer of the sd1 model" (the wrapper's paths start with _orig_mod.), as if the LoRA were for another model
    _, _, folder = files
    pipe = copy.deepcopy(pristine)
    pipe.unet = torch.compile(pipe.unet)
    with pytest.raises(UserError, match=r"style.safetensors: pipe.unet is compiled \(torch.compile\); load LoRA files before compiling it"):
        load_lora(pipe, folder / "style.safetensors")
    assert lora_scales(pipe) == {}
