"""`formats.readers`: every supported key style resolved by lookup, family evidence, and what is reported.

Full-size names come from the golden lists (SD1.5, SD2.1, SDXL base, written by `formats.kohya` from meta-device
models), so resolving them exercises the cached full-size architectures without a base model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sd_lora.errors import UserError
from sd_lora.formats.diffusers_format import to_diffusers_state_dict
from sd_lora.formats.kohya import kohya_module_name, to_kohya_state_dict
from sd_lora.formats.architecture import architecture_of_pipeline, full_size_architecture
from sd_lora.formats.readers import parse_lora_state_dict, read_any_lora, read_as_kohya, shape_mismatches
from sd_lora.lora.inject import LoraModuleWeights
from sd_lora.lora.targets import text_encoder_target_modules, unet_target_modules
from sd_lora.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline


def _dummy_kohya(names: list[str]) -> dict[str, torch.Tensor]:
    state = {}
    for name in names:
        state |= {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1)}
        state[f"{name}.alpha"] = torch.tensor(1.0)
    return state


@pytest.mark.parametrize(
    "golden, version, counts",
    [
        ("sd15_attn_mlp.txt", "sd_v1", {"unet": 192, "text_encoder": 72}),
        ("sd21_attn_mlp.txt", "sd_v2", {"unet": 192, "text_encoder": 138}),
        ("sdxl_attn_mlp.txt", "sdxl_base_v1-0", {"unet": 722, "text_encoder_1": 72, "text_encoder_2": 192}),
    ],
)
def test_full_size_kohya_names_resolve_by_lookup(golden, version, counts, golden_dir):
    names = (golden_dir / golden).read_text().split()
    lora = parse_lora_state_dict(_dummy_kohya(names), {"ss_base_model_version": version})
    assert lora.format == "kohya" and not lora.unsupported
    assert {c: len(w) for c, w in lora.components.items()} == counts
    arch = lora.architecture
    sgm = arch.sgm_paths if arch.family == "sdxl" else None
    # the lookup is the exact inverse of the writer's naming, for every module
    assert sorted(kohya_module_name(c, p, sgm_paths=sgm) for c, ws in lora.components.items() for p in ws) == sorted(names)
    if arch.family == "sdxl":
        assert "text_model.encoder.layers.31.mlp.fc2" in lora.components["text_encoder_2"]  # WithProjection: nested
        assert "encoder.layers.11.mlp.fc2" in lora.components["text_encoder_1"]  # flattened CLIPTextModel
        assert all(m.sgm_name for m in lora.modules if m.component == "unet")


def test_names_that_only_guessing_would_split_are_resolved_exactly():
    """`ff_net_0_proj`, `to_out_0`, `transformer_blocks_9` and `time_emb_proj` must not be guessed apart."""
    arch = full_size_architecture("sdxl")
    for path in ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj", "up_blocks.0.resnets.2.time_emb_proj",
                 "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0", "add_embedding.linear_2"):  # fmt: skip
        for name in (kohya_module_name("unet", path, sgm_paths=arch.sgm_paths), kohya_module_name("unet", path)):
            assert arch.kohya_names[name][:2] == ("unet", path)


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_tiny_sdxl_pipeline()


def _components(pipe, text_encoders: dict, rank=2, alpha=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    result = {}
    for component, model in {"unet": pipe.unet, **text_encoders}.items():
        modules = dict(model.named_modules())
        paths = unet_target_modules(model) if component == "unet" else text_encoder_target_modules(model)
        result[component] = {}
        for path in paths:
            weight = modules[path].weight
            down = torch.randn(rank, *weight.shape[1:], generator=g)
            up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []), generator=g)
            result[component][path] = LoraModuleWeights(down, up, alpha)
    return result


def test_sdxl_sgm_names_resolve_against_the_given_model_or_sdxl_base(tiny_sdxl):
    components = _components(tiny_sdxl, {"text_encoder_1": tiny_sdxl.text_encoder, "text_encoder_2": tiny_sdxl.text_encoder_2})
    arch = architecture_of_pipeline(tiny_sdxl)
    state = to_kohya_state_dict(components, sgm_paths=arch.sgm_paths)
    given = parse_lora_state_dict(state, architecture=arch)
    default = parse_lora_state_dict(state)  # the tiny SDXL keeps SDXL base's block layout (2 layers per block)
    for lora in (given, default):
        assert lora.family == "sdxl" and not lora.unsupported
        assert {c: set(w) for c, w in lora.components.items()} == {c: set(w) for c, w in components.items()}
    assert not shape_mismatches(given, arch)
    # the same layers under diffusers-path names (as some tools write SDXL files) resolve too
    plain = parse_lora_state_dict(to_kohya_state_dict(components), architecture=arch)
    assert {c: set(w) for c, w in plain.components.items()} == {c: set(w) for c, w in components.items()}
    assert not any(m.sgm_name for m in plain.modules)


def test_sdxl_text_encoder_1_named_lora_te_reads_as_text_encoder_1(tiny_sdxl, tmp_path):
    # diffusers and ComfyUI apply SDXL `lora_te_` names to text encoder 1 when the file has no `lora_te1_` names
    encoders = {"text_encoder_1": tiny_sdxl.text_encoder, "text_encoder_2": tiny_sdxl.text_encoder_2}
    components = _components(tiny_sdxl, encoders)
    arch = architecture_of_pipeline(tiny_sdxl)
    written = to_kohya_state_dict(components, sgm_paths=arch.sgm_paths)
    state = {k.replace("lora_te1_", "lora_te_"): v for k, v in written.items()}
    assert any(k.startswith("lora_te_") for k in state)
    for given in (arch, None):
        lora = parse_lora_state_dict(state, architecture=given)
        assert lora.family == "sdxl" and not lora.unsupported
        assert _same(lora, components)
    save_file(state, tmp_path / "te.safetensors")
    written, _ = read_as_kohya(tmp_path / "te.safetensors")  # what convert / merge / resize work on
    assert {k.split("_")[1] for k in written} == {"unet", "te1", "te2"}
    # with `lora_te1_` names of its own, the file's `lora_te_` names mean nothing for SDXL
    te1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    extra = {f"{te1}.lora_down.weight": torch.zeros(1, 32), f"{te1}.lora_up.weight": torch.zeros(64, 1)}
    mixed = parse_lora_state_dict(state | extra, architecture=arch)
    assert any("match no layer" in problem for problem in mixed.unsupported)


@pytest.fixture(scope="module")
def tiny_sd1():
    return build_tiny_pipeline("sd1")


def _same(lora, components) -> bool:
    got = {c: w for c, w in lora.components.items() if w}
    return got.keys() == components.keys() and all(
        got[c].keys() == components[c].keys()
        and all(torch.equal(got[c][p].down, w.down) and torch.equal(got[c][p].up, w.up) for p, w in components[c].items())
        for c in components
    )


def test_diffusers_key_styles(tiny_sd1):
    components = _components(tiny_sd1, {"text_encoder": tiny_sd1.text_encoder}, alpha=2.0)  # alpha == rank
    arch = architecture_of_pipeline(tiny_sd1)
    state = to_diffusers_state_dict(components)
    lora = parse_lora_state_dict(state, architecture=arch)
    assert lora.format == "diffusers" and _same(lora, components) and not lora.unsupported
    # PEFT's own prefix, and no component prefix at all (U-Net and nested text-encoder paths)
    peft = {"base_model.model." + k.split(".", 1)[1] if k.startswith("unet.") else k: v for k, v in state.items()}
    lora = parse_lora_state_dict(peft, architecture=arch)
    assert _same(lora, components) and not any(m.prefixed for m in lora.modules if m.component == "unet")
    bare = {k.split(".", 1)[1]: v for k, v in state.items()}
    assert _same(parse_lora_state_dict(bare, architecture=arch), components)


def test_old_diffusers_attention_processor_keys(tiny_sd1):
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    layer = "text_model.encoder.layers.0"
    w = {n: LoraModuleWeights(torch.randn(2, 32), torch.randn(32, 2), 2.0) for n in ("q", "out", "tq", "fc1")}
    state = {
        f"unet.{attn}.processor.to_q_lora.down.weight": w["q"].down, f"unet.{attn}.processor.to_q_lora.up.weight": w["q"].up,
        f"unet.{attn}.processor.to_out_lora.down.weight": w["out"].down,
        f"unet.{attn}.processor.to_out_lora.up.weight": w["out"].up,
        f"text_encoder.{layer}.self_attn.to_q_lora.down.weight": w["tq"].down,
        f"text_encoder.{layer}.self_attn.to_q_lora.up.weight": w["tq"].up,
        f"text_encoder.{layer}.mlp.fc1.lora_linear_layer.down.weight": w["fc1"].down,
        f"text_encoder.{layer}.mlp.fc1.lora_linear_layer.up.weight": w["fc1"].up,
    }  # fmt: skip
    lora = parse_lora_state_dict(state, architecture=architecture_of_pipeline(tiny_sd1))
    assert lora.format == "diffusers-old" and not lora.unsupported
    assert _same(lora, {
        "unet": {f"{attn}.to_q": w["q"], f"{attn}.to_out.0": w["out"]},
        "text_encoder": {"encoder.layers.0.self_attn.q_proj": w["tq"], "encoder.layers.0.mlp.fc1": w["fc1"]},
    })  # fmt: skip


def test_what_is_not_plain_lora_is_reported_not_refused():
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    state = _dummy_kohya([q, "lora_unet_no_such_block", "lora_unet_down_blocks_0_attentions_0_norm"])
    state |= {f"{k}.alpha": torch.tensor(1.0), f"{q}.dora_scale": torch.ones(1, 1), "stray": torch.zeros(1)}
    state |= {"lora_unet_up_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(1, 1)}
    state |= {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1)}
    lora = parse_lora_state_dict(state, {"ss_base_model_version": "sd_v1"})
    problems = "\n".join(lora.unsupported)
    for expected in ("1 modules match no layer of the sd1 model: lora_unet_no_such_block",
                     "are alpha-only modules", "are loha modules", "are incomplete modules", "put LoRA on norm layers",
                     "carry dora_scale", "1 keys belong to no LoRA module: stray"):  # fmt: skip
        assert expected in problems, expected
    assert not any(lora.components.values())
    with pytest.raises(UserError, match="cannot read this file exactly"):
        from sd_lora.formats.readers import require_exact

        require_exact(lora, "read")


def test_rank_0_and_non_finite_modules_are_reported_not_read():
    q, k, v, out = (f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{p}" for p in
                    ("to_q", "to_k", "to_v", "to_out_0"))  # fmt: skip
    state = _dummy_kohya([q, k, v, out])
    state[f"{q}.lora_up.weight"] = torch.tensor([[float("nan")]])  # a diverged run
    state[f"{k}.alpha"] = torch.tensor(float("inf"))
    state |= {f"{v}.lora_down.weight": torch.zeros(0, 1), f"{v}.lora_up.weight": torch.zeros(1, 0)}
    lora = parse_lora_state_dict(state, {"ss_base_model_version": "sd_v1"})
    assert lora.unsupported == [
        f"2 modules hold NaN or infinite values (the training that wrote them diverged; use an earlier save): {q}, {k}",
        f"1 modules have rank 0 (empty factors: they change nothing): {v}",
    ]
    assert list(lora.components["unet"]) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]


def test_family_evidence_and_disagreement():
    cross = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    state = {f"{cross}.lora_down.weight": torch.zeros(2, 1024), f"{cross}.lora_up.weight": torch.zeros(640, 2)}
    lora = parse_lora_state_dict(state, {"ss_base_model_version": "sd_v1", "ss_v2": "False"})
    assert lora.family == "sd2" and "cross-attention input 1024" in lora.family_evidence["keys"]
    assert "ss_base_model_version=sd_v1" in lora.family_evidence["metadata"]
    assert any("metadata says sd1 but the keys and shapes say sd2" in w for w in lora.warnings)
    assert parse_lora_state_dict(state).family == "sd2"


def test_sd1_file_with_sgm_unet_names_is_sd1_and_resolves_to_sd1_layers(tmp_path):
    # A1111 and ComfyUI apply SGM-named modules on an SD1 checkpoint; decisive shapes and the metadata say SD1
    k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # down_blocks.1.attentions.0 in SD1.5
    q = "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_q"  # up_blocks.1.attentions.0
    cross = {f"{k}.lora_down.weight": torch.ones(2, 768), f"{k}.lora_up.weight": torch.ones(640, 2)}
    self_attn = {f"{q}.lora_down.weight": torch.ones(2, 1280), f"{q}.lora_up.weight": torch.ones(1280, 2)}
    sd1 = {"ss_base_model_version": "sd_v1"}
    lora = parse_lora_state_dict(cross | self_attn, sd1)
    assert lora.family == "sd1" and not lora.unsupported and not lora.warnings
    assert set(lora.components["unet"]) == {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                                            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"}  # fmt: skip
    assert parse_lora_state_dict(cross | self_attn).family == "sd1"  # the 768-wide cross-attention decides
    # SGM names alone only hint at SDXL: the file's metadata outranks them
    assert parse_lora_state_dict(self_attn, sd1).family == "sd1"
    assert parse_lora_state_dict(self_attn).family == "sdxl"
    # convert writes SD1 files with diffusers-path names, which every loader applies to SD1
    save_file(cross | self_attn, tmp_path / "sgm.safetensors", metadata=sd1)
    state, _ = read_as_kohya(tmp_path / "sgm.safetensors")
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in state


def test_unreadable_and_non_lora_files_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.safetensors: no such LoRA file"):
        read_any_lora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="junk.safetensors: not a readable .safetensors"):
        read_any_lora(tmp_path / "junk.safetensors")
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "checkpoint.safetensors")
    with pytest.raises(UserError, match="checkpoint.safetensors: no LoRA keys among its 1 tensors"):
        read_any_lora(tmp_path / "checkpoint.safetensors")


def test_read_as_kohya_gives_sgm_names_for_sdxl(tiny_sdxl, tmp_path):
    components = _components(tiny_sdxl, {"text_encoder_1": tiny_sdxl.text_encoder, "text_encoder_2": tiny_sdxl.text_encoder_2})
    save_file(to_diffusers_state_dict(components), tmp_path / "d.safetensors", metadata={"ss_seed": "1"})
    state, metadata = read_as_kohya(tmp_path / "d.safetensors")
    assert metadata == {"ss_seed": "1"}
    assert {k.split("_")[1] for k in state} == {"unet", "te1", "te2"}
    assert not any(b in k for k in state for b in ("down_blocks", "mid_block", "up_blocks"))


def test_alphas_from_diffusers_adapter_metadata(tmp_path):
    """diffusers' own `save_lora_weights` with adapter metadata: the file's alphas are read from it."""
    from diffusers import StableDiffusionPipeline

    path = "down_blocks.0.attentions.0.proj_in"
    layers = {f"{path}.lora_A.weight": torch.randn(4, 320, 1, 1), f"{path}.lora_B.weight": torch.randn(320, 4, 1, 1)}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata={"r": 4, "lora_alpha": 2.0}, safe_serialization=True
    )
    lora = read_any_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.format == "diffusers" and lora.components["unet"][path].alpha == 2.0
    assert lora.family == "sd1"  # the 1x1-conv proj_in


def test_an_alpha_of_one_number_in_any_shape_or_dtype_is_read_and_any_other_is_reported_as_damaged():
    from sd_lora.formats.compatibility import compatibility
    from sd_lora.inspect import format_report

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    state = _dummy_kohya([q, k])
    state[f"{q}.alpha"] = torch.tensor([0.5], dtype=torch.float16)  # 1-d, fp16: one number all the same
    lora = parse_lora_state_dict(state, {"ss_base_model_version": "sd_v1"})
    assert lora.components["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].alpha == 0.5
    assert not lora.unsupported

    for bad in (torch.tensor([1.0, 2.0]), torch.zeros(0)):
        state[f"{k}.alpha"] = bad
        lora = parse_lora_state_dict(state, {"ss_base_model_version": "sd_v1"})
        assert lora.unsupported == [f"1 modules have an alpha that is not one number (damaged): {k} (alpha shape {list(bad.shape)})"]
        assert list(lora.components["unet"]) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
        assert all(v.rejects for v in compatibility(lora).values())
        assert f"{k} (alpha shape {list(bad.shape)})" in format_report(lora)


def test_fp8_factors_and_alphas_are_read_as_float32_values(tmp_path):
    # fp8 (a storage format ComfyUI loads) failed with torch's NotImplementedError ("isfinite" not implemented for
    # 'Float8_e4m3fn') in inspect, convert and the API; fp8 has no multiplication either, so alpha could not be baked in
    from sd_lora.formats.diffusers_format import to_diffusers_state_dict as baked

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.5], [-0.25]])  # exact in float8_e4m3fn
    save_file({f"{q}.lora_down.weight": down.to(torch.float8_e4m3fn), f"{q}.lora_up.weight": up.to(torch.float8_e4m3fn),
               f"{q}.alpha": torch.tensor(0.5).to(torch.float8_e4m3fn)}, tmp_path / "fp8.safetensors")
    lora = read_any_lora(tmp_path / "fp8.safetensors")
    assert not lora.unsupported
    (w,) = lora.components["unet"].values()
    assert w.down.dtype == w.up.dtype == torch.float32 and torch.equal(w.down, down) and torch.equal(w.up, up)
    assert w.alpha == 0.5
    (b,) = [t for key, t in baked(lora.components).items() if key.endswith("lora_B.weight")]
    assert torch.equal(b, up * 0.5)
