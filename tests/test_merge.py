"""`python -m sd_lora.merge` (LoRA + LoRA): concatenation is exact - in the file's numbers and in what diffusers
does with it - SVD merges report honest errors, families are never mixed, mistakes are one-line errors.

LoRA A (rank 4, alpha 2) covers every module; B (rank 3, alpha 6) every second one, so merged ranks vary per
module (7 and 4) and the scales differ - a merge that ignored alpha, weights or missing modules would fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from sd_lora.formats.kohya import read_lora_file
from sd_lora.lora.maths import delta
from sd_lora.lora.targets import text_encoder_target_modules
from sd_lora.errors import UserError
from sd_lora.merge import main, parse_lora_arg, read_lora_modules
from sd_lora.models.tiny import build_tiny_sdxl_pipeline
from helpers import write_random_lora

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    a = write_random_lora(folder / "a.safetensors", pipe, rank=4, alpha=2.0, seed=1)
    b = write_random_lora(folder / "b.safetensors", pipe, rank=3, alpha=6.0, seed=2, unet_every=2, te_every=2)
    return folder, a, b


def _expected_deltas(a, b, wa=0.7, wb=0.3) -> dict[str, torch.Tensor]:
    ma, mb = read_lora_modules(a).modules, read_lora_modules(b).modules
    expected = {name: wa * delta(w, torch.float64) for name, w in ma.items()}
    for name, w in mb.items():
        expected[name] = expected.get(name, 0) + wb * delta(w, torch.float64)
    return expected


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_concat_merge_is_exact(loras, capsys):
    folder, a, b = loras
    out = folder / "merged.safetensors"
    assert main(["--lora", f"{a}:0.7", "--lora", f"{b}:0.3", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    merged = read_lora_modules(out).modules
    expected = _expected_deltas(a, b)
    assert merged.keys() == expected.keys() and len(merged) == 66  # 48 U-Net + 18 text encoder
    worst = max(_rel(delta(merged[n], torch.float64), expected[n]) for n in expected)
    print(f"concat merge: max relative error of a module's delta {worst:.2e}")
    assert worst < 1e-6
    assert {w.rank for w in merged.values()} == {4, 7}
    assert len({w.alpha for w in merged.values()}) == 1  # one alpha for all modules (the reference's advice)

    _, meta = read_lora_file(out)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_v2"] == "False" and meta["ss_network_dim"] == "Dynamic"
    record = json.loads(meta["sd_lora_merge"])
    assert record["method"] == "concat" and [i["weight"] for i in record["inputs"]] == [0.7, 0.3]
    assert "exact rank concatenation" in printed and "relative error: max" in printed


def _unet_out(pipe, g_seed=0):
    g = torch.Generator().manual_seed(g_seed)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), states).sample


def _te_out(text_encoder):
    ids = torch.randint(0, 300, (1, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def test_merged_file_in_diffusers_equals_two_adapters(loras, tiny_model_dir):
    folder, a, b = loras
    out = folder / "merged_for_diffusers.safetensors"
    assert main(["--lora", f"{a}:0.7", "--lora", f"{b}:0.3", "--output", str(out)]) == 0

    two = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base_out = _unet_out(two)
    two.load_lora_weights(folder, weight_name=a.name, adapter_name="a")
    two.load_lora_weights(folder, weight_name=b.name, adapter_name="b")
    two.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    one = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    one.load_lora_weights(folder, weight_name=out.name)
    diff = (_unet_out(one) - _unet_out(two)).abs().max().item()
    print(f"U-Net: merged file vs two adapters 0.7/0.3, max abs diff {diff:.2e}")
    assert diff < TOLERANCE
    assert (_unet_out(two) - base_out).abs().max() > 100 * TOLERANCE  # the LoRAs do change the output

    # Text encoder: diffusers 0.42 + transformers 5 cannot hold a second text-encoder adapter (it keeps only "a"),
    # so compare the merged file, loaded by diffusers, with both LoRAs merged into the weights by hand.
    from transformers import CLIPTextModel

    by_hand = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder")
    layers = dict(by_hand.named_modules())
    expected = _expected_deltas(a, b)
    with torch.no_grad():
        for path in text_encoder_target_modules(by_hand):
            name = "lora_te_text_model_" + path.replace(".", "_")
            if name in expected:
                layers[path].weight += expected[name].float()
    te_diff = (_te_out(one.text_encoder) - _te_out(by_hand)).abs().max().item()
    print(f"text encoder: merged file in diffusers vs hand-merged weights, max abs diff {te_diff:.2e}")
    assert te_diff < TOLERANCE


def test_diffusers_format_input_merges_the_same(loras, tmp_path):
    """Inputs are read by `formats.readers`: B as a diffusers/PEFT file merges exactly like B as kohya."""
    from sd_lora.convert import main as convert_main

    folder, a, b = loras
    b_diffusers = tmp_path / "b_diffusers.safetensors"
    assert convert_main([str(b), str(b_diffusers), "--to", "diffusers"]) == 0
    assert not any(k.startswith("lora_") for k in read_lora_file(b_diffusers)[0])  # really another key style
    out = tmp_path / "merged.safetensors"
    assert main(["--lora", f"{a}:0.7", "--lora", f"{b_diffusers}:0.3", "--output", str(out)]) == 0
    merged, expected = read_lora_modules(out).modules, _expected_deltas(a, b)
    assert merged.keys() == expected.keys()
    assert max(_rel(delta(merged[n], torch.float64), expected[n]) for n in expected) < 1e-6


@pytest.mark.parametrize("rank", [2, 7])
def test_svd_merge_error_within_report(loras, capsys, rank):
    folder, a, b = loras
    out = folder / f"svd{rank}.safetensors"
    assert main(["--lora", f"{a}:0.7", "--lora", f"{b}:0.3", "--output", str(out), "--rank", str(rank), "-v"]) == 0
    printed = capsys.readouterr().out
    reported = {m.group(1): float(m.group(2)) for m in re.finditer(r"^  (lora_\w+): (\S+)$", printed, re.M)}
    merged = read_lora_modules(out).modules
    expected = _expected_deltas(a, b)
    assert reported.keys() == expected.keys()
    actual = {n: _rel(delta(merged[n], torch.float64), expected[n]) for n in expected}
    for name, err in actual.items():
        assert merged[name].rank <= rank
        assert err <= reported[name] * (1 + 5e-3) + 1e-9, (name, err, reported[name])  # printed with 3 digits
    summary = re.search(r"relative error: max (\S+) .*, mean (\S+) over 66 modules", printed)
    assert max(actual.values()) <= float(summary.group(1)) * (1 + 5e-3) + 1e-9
    assert float(summary.group(2)) == pytest.approx(sum(actual.values()) / len(actual), rel=1e-2, abs=1e-8)
    if rank == 7:  # the largest input rank sum: every module is represented exactly
        assert max(actual.values()) < 1e-6
    else:
        assert min(actual.values()) > 1e-3
    assert json.loads(read_lora_file(out)[1]["sd_lora_merge"])["method"] == "svd"


def test_svd_merge_to_a_rank_above_the_inputs_reports_the_real_rank(loras, capsys):
    folder, a, b = loras
    out = folder / "svd_big.safetensors"
    assert main(["--lora", f"{a}:0.7", "--lora", f"{b}:0.3", "--output", str(out), "--rank", "10000"]) == 0
    printed = capsys.readouterr().out
    assert "by SVD to rank 7 (--rank 10000 is more than any module's change has): 66 modules, rank 4-7" in printed
    assert max(w.rank for w in read_lora_modules(out).modules.values()) == 7


def test_mixing_families_is_refused(loras, tiny_model_dir, tmp_path, capsys):
    folder, a, _ = loras
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    xl = write_random_lora(tmp_path / "xl.safetensors", pipe, rank=2, alpha=2.0, seed=3,
                           metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"})
    capsys.readouterr()  # diffusers' loading chatter
    assert main(["--lora", str(a), "--lora", f"{xl}:0.5", "--output", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd_lora: error:") and "different model families" in err
    assert f"{a} is sd1" in err and f"{xl} is sdxl" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_shape_mismatch_is_refused(loras, tmp_path, capsys):
    from sd_lora.models.tiny import build_tiny_pipeline

    folder, a, _ = loras
    # SD2 layout (linear proj_in/out) but no family metadata: caught by the shapes
    sd2 = write_random_lora(tmp_path / "sd2.safetensors", build_tiny_pipeline("sd2"), rank=2, alpha=2.0, seed=4,
                            metadata={})
    assert main(["--lora", str(a), "--lora", str(sd2), "--output", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "different shapes in different files" in err and "proj_in" in err


def test_a_file_holding_nan_is_refused_not_merged(loras, tmp_path, capsys):
    folder, a, b = loras
    state, metadata = read_lora_file(b)
    name = sorted(k for k in state if k.endswith(".lora_down.weight"))[0]
    state[name] = torch.full_like(state[name], float("inf"))
    save_file(state, tmp_path / "inf.safetensors", metadata=metadata)
    assert main(["--lora", str(a), "--lora", str(tmp_path / "inf.safetensors"), "--output", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "inf.safetensors: cannot read this file exactly" in err and "hold NaN or infinite values" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_parse_lora_arg():
    assert parse_lora_arg("A.safetensors:0.7") == (Path("A.safetensors"), 0.7)
    assert parse_lora_arg("B:-0.3")[1] == -0.3
    assert parse_lora_arg("A.safetensors")[1] == 1.0
    assert parse_lora_arg(r"C:\loras\a.safetensors")[1] == 1.0  # a Windows drive is not a weight
    for bad, message in [("A.safetensors:abc", "not a weight"), ("A:nan", "finite"), ("A:0", "non-zero")]:
        with pytest.raises(UserError, match=message):
            parse_lora_arg(bad)


def test_an_output_suffix_in_capitals_is_a_safetensors_file(tmp_path):
    from sd_lora.merge import require_safetensors

    require_safetensors(tmp_path / "LORA.SAFETENSORS", "--output", "a merged LoRA")  # was refused
    with pytest.raises(UserError, match=r"LORA.SAFE: a merged LoRA is a .safetensors file; name it e.g. .*LORA.safetensors"):
        require_safetensors(tmp_path / "LORA.SAFE", "--output", "a merged LoRA")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "0"], "positive integer"),
        (["--lora", "X.safetensors:zz"], "'zz' is not a weight"),
        (["--lora", "missing.safetensors:0.5"], "missing.safetensors: no such LoRA file"),
        (["--output", "merged.txt"], "a merged LoRA is a .safetensors file"),
        (["--model", "base", "--rank", "4"], "--rank .* no meaning with --model"),
        (["--model", "base", "--verbose"], "--verbose .* baking into --model is exact"),
        (["--allow-unsafe-pickle"], "--allow-unsafe-pickle .* without --model it has no meaning"),
        (["--model-config", "."], "--model-config . describes a single-file --model checkpoint; without --model"),
    ],
)
def test_user_errors(loras, tmp_path, capsys, monkeypatch, extra, message):
    folder, a, _ = loras
    monkeypatch.chdir(tmp_path)
    args = ["--lora", f"{a}:0.5", "--output", "m.safetensors"]
    if "--output" in extra:
        args = args[:2]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd_lora: error:") and re.search(message, err) and "Traceback" not in err


def test_output_that_is_an_input_or_a_folder_is_refused(loras, tmp_path, capsys, monkeypatch):
    folder, a, b = loras
    monkeypatch.chdir(folder)
    before = a.read_bytes()
    for output in [a.name, f"./{a.name}", str(a)]:
        assert main(["--lora", f"{a.name}:0.5", "--lora", str(b), "--output", output]) == 2
        err = capsys.readouterr().err
        assert f"--output {Path(output)}: the output would overwrite the input {a.name}; choose another output file" in err
    assert a.read_bytes() == before
    (tmp_path / "d.safetensors").mkdir()
    assert main(["--lora", str(a), "--output", str(tmp_path / "d.safetensors")]) == 2
    assert "d.safetensors: is a folder; name the file to write" in capsys.readouterr().err


def test_an_output_name_that_is_not_utf8_is_written_with_readable_metadata(loras, tmp_path):
    """A Latin-1 file name (a Windows zip unpacked on Linux) is a valid path, but safetensors metadata is UTF-8."""
    import os

    _, a, _ = loras
    out = tmp_path / os.fsdecode(b"caf\xe9.safetensors")
    assert main(["--lora", str(a), "--output", str(out)]) == 0
    _, meta = read_lora_file(out)
    assert meta["ss_output_name"] == meta["modelspec.title"] == "caf\ufffd"


def test_bad_file_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    assert main(["--lora", str(bad), "--output", str(tmp_path / "m.safetensors")]) == 2
    assert "not a readable .safetensors file" in capsys.readouterr().err


def test_sdxl_inputs_without_family_metadata_give_a_merged_file_that_says_sdxl(tmp_path, capsys):
    # A1111 takes a LoRA without ss_base_model_version for SD1 and hides it on SDXL checkpoints
    a = write_random_lora(tmp_path / "a.safetensors", build_tiny_sdxl_pipeline(), rank=2, alpha=2.0, seed=1,
                          metadata={})  # fmt: skip
    out = tmp_path / "merged.safetensors"
    assert main(["--lora", f"{a}:0.5", "--lora", f"{a}:0.5", "--output", str(out)]) == 0
    assert "added metadata: ss_base_model_version=sdxl_base_v1-0, ss_v2=False" in capsys.readouterr().out
    metadata = read_lora_file(out)[1]
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sdxl_base_v1-0", "False")


def test_unet_only_sdxl_input_without_family_metadata_is_merged_as_sdxl(tmp_path, capsys):
    # no lora_te1_ / lora_te2_ names either: the family comes from the U-Net keys (formats.readers)
    full = write_random_lora(tmp_path / "full.safetensors", build_tiny_sdxl_pipeline(), rank=2, alpha=2.0, seed=1,
                             metadata={})  # fmt: skip
    state, _ = read_lora_file(full)
    save_file({k: v for k, v in state.items() if k.startswith("lora_unet_")}, tmp_path / "unet.safetensors")
    out = tmp_path / "merged.safetensors"
    assert main(["--lora", str(tmp_path / "unet.safetensors"), "--output", str(out)]) == 0
    assert "merged 1 LoRAs (sdxl)" in capsys.readouterr().out
    assert read_lora_file(out)[1]["ss_base_model_version"] == "sdxl_base_v1-0"


def test_baking_into_a_single_file_model_of_another_size_takes_model_config(loras, tiny_model_dir, tmp_path, capsys):
    """The loader asks for --model-config for a non-standard single file: merge has that flag, as train does."""
    from sd_lora.models.single_file import load_single_file, save_single_file

    _, a, _ = loras
    base_file = save_single_file(StableDiffusionPipeline.from_pretrained(tiny_model_dir).components,
                                 tmp_path / "base.safetensors", "sd1")  # fmt: skip
    out = tmp_path / "baked.safetensors"
    assert main(["--model", str(base_file), "--lora", str(a), "--output", str(out)]) == 2
    assert "pass --model-config with a diffusers folder" in capsys.readouterr().err
    assert main(["--model", str(base_file), "--model-config", str(tiny_model_dir), "--lora", str(a),
                 "--output", str(out)]) == 0  # fmt: skip
    assert "wrote " + str(out) in capsys.readouterr().out
    baked = load_single_file(out, config_dir=tiny_model_dir)["unet"]
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet
    changed = [n for n, p in baked.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == 48  # every attn-mlp U-Net layer of the LoRA (its 18 text-encoder modules: not the U-Net)
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(base_file), "--model-config", str(tmp_path / "empty"), "--lora", str(a),
                 "--output", str(tmp_path / "b2.safetensors")]) == 2  # fmt: skip
    assert f"--model-config {tmp_path / 'empty'}: not a diffusers folder (no model_index.json)" in capsys.readouterr().err
