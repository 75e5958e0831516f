"""The real CLI end to end on tiny models: files, grids, metadata, config, metrics, exactness, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd_lora import precision
from sd_lora import train as train_module
from sd_lora.inspect import main as inspect_main
from sd_lora.config import load_config
from sd_lora.precision import FULL_SIZE_PARAMETERS, Hardware
from sd_lora.train import main, run

FAST = ["--resolution", "32", "--batch-size", "2", "--sample-steps", "2", "--sample-seeds", "1", "--rank", "4"]


def train_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--model", str(model), "--output-dir", str(out), *FAST, *extra]


def init_args(data: Path, model: Path, out: Path, init: Path, *extra: str) -> list[str]:
    """train_args for a run from --init-weights, without FAST's --rank: the file decides the rank."""
    args = train_args(data, model, out, "--init-weights", str(init), *extra)
    at = args.index("--rank")
    return args[:at] + args[at + 2:]


@pytest.mark.slow
def test_cli_end_to_end(tiny_dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--sample-every", "2", "--save-every", "2",
                      "--output-name", "zk", "--training-comment", "e2e test")
    proc = subprocess.run([sys.executable, "-m", "sd_lora.train", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Summary before training, and the final line.
    assert "images: 6 (12 per epoch with repeats)" in proc.stdout
    assert "total steps: 4" in proc.stdout and "trainable parameters:" in proc.stdout
    assert "latents cached: VAE encoder released" in proc.stdout  # samples still decode (grids below)
    assert "text encoder outputs cached: text encoders released" in proc.stdout  # the grids use prompts encoded before
    assert proc.stdout.count("after step 1, peak memory: ") == 1  # measured with a step's activations, once
    assert "memory check, one step at the largest bucket (32x32, batch 2): peak memory: " in proc.stdout
    assert f"done: {out / 'zk.safetensors'}" in proc.stdout
    # Files: final + intermediate LoRA, grids at 0, every 2 steps and the end, config, metrics.
    assert (out / "zk.safetensors").is_file() and (out / "zk-step00000002.safetensors").is_file()
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["zk-compare-step00000004.png", "zk-step00000000.png", "zk-step00000002.png", "zk-step00000004.png"]
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["resolution"] == 32 and config["output-name"] == "zk" and config["prediction-type"] == "epsilon"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"loss", "lr", "elapsed", "epoch", "grad_norm"} <= m.keys() and m["loss"] > 0 and m["grad_norm"] > 0 for m in metrics)
    # The file: kohya keys only, fp16 by default, metadata.
    with safe_open(str(out / "zk.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert f.get_tensor(next(k for k in keys if k.endswith("lora_up.weight"))).dtype == torch.float16
    assert len(keys) == 48 * 3 and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "zk"
    assert meta["ss_num_batches_per_epoch"] == re.search(r"(\d+) batches/epoch", proc.stdout).group(1)  # as the summary
    assert meta["ss_training_comment"] == "e2e test"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_zkchar": {"n_repeats": 2, "img_count": 6}}
    assert json.loads(meta["ss_tag_frequency"])["2_zkchar"]["zkchar"] == 6
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]  # kohya's; A1111's metadata view lists its resolutions
    assert sum(b["count"] for b in buckets.values()) == 12 and all(len(b["resolution"]) == 2 for b in buckets.values())
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.resolution"] == "32x32"
    # shared files name no local folders (basenames only); config.toml keeps the full paths for resuming
    assert meta["ss_sd_model_name"] == Path(tiny_model_dir).name
    assert "ss_sd_model_hash" not in meta and "ss_new_sd_model_hash" not in meta  # a folder: no file to hash (kohya: "IsADirectory")
    assert not [k for k, v in meta.items() for p in (tiny_dataset, tiny_model_dir, out) if str(p) in v]
    assert json.loads(meta["sd_lora_config"])["data"] == Path(tiny_dataset).name
    assert config["data"] == str(tiny_dataset)


@pytest.mark.slow
def test_final_grid_compares_the_base_and_the_lora_on_the_same_seeds(tiny_dataset, tiny_model_dir, tmp_path):
    import numpy as np

    from diffusers import StableDiffusionPipeline

    from sd_lora.lora.inject import set_lora_enabled
    from sd_lora.sampling.sampler import build_sampling_pipeline, generate_images

    out = tmp_path / "out"
    result = run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "3", "--sample-every", "3",
                                        "--learning-rate", "1e-2", "--output-name", "zk")))
    assert (out / "samples" / "zk-compare-step00000003.png").is_file()
    outputs = result.outputs
    # The frozen text encoder was let go after caching; every grid used the prompts encoded before that.
    assert {p.device.type for p in result.text_encoder.parameters()} == {"meta"}
    pipe, settings = outputs._sampling()
    set_lora_enabled(result.unet, False)
    base_now, _ = generate_images(pipe, outputs.prompts, settings, conditioning=outputs.conditioning)
    set_lora_enabled(result.unet, True)
    lora_now, _ = generate_images(pipe, outputs.prompts, settings, conditioning=outputs.conditioning)
    pixels = lambda rows: np.stack([np.asarray(im) for row in rows for im in row]).astype(int)  # noqa: E731
    # The comparison's base half is step 0's grid, which is exactly the base model; its LoRA half the end's.
    assert np.array_equal(pixels(outputs.step_0_cells), pixels(base_now))
    disk = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    fresh = build_sampling_pipeline(vae=disk.vae, text_encoder=disk.text_encoder, tokenizer=disk.tokenizer, unet=disk.unet,
                                    scheduler_config=outputs.model.scheduler_config, sampler=settings.sampler)
    from_strings, _ = generate_images(fresh, outputs.prompts, settings)  # the base model from disk, its text encoder running
    assert np.array_equal(pixels(outputs.step_0_cells), pixels(from_strings))
    assert np.array_equal(pixels(outputs.last_sampled[1]), pixels(lora_now))
    assert np.abs(pixels(lora_now) - pixels(base_now)).mean() > 0.5  # and the LoRA changed the pictures


@pytest.mark.slow
def test_regularisation_images_train_beside_the_data_and_are_recorded(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    from helpers import write_dataset

    reg = write_dataset(tmp_path / "reg", count=4, repeats=7)  # 4 images; folder repeats are ignored
    out = tmp_path / "out"
    config = load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "3", "--sample-every", "0",
                                    "--reg-data", str(reg), "--prior-loss-weight", "0.5"))
    result = run(config)
    stdout = capsys.readouterr().out
    assert "regularisation: 4 of 4 images" in stdout and "12 samples per epoch" in stdout  # 6 images x 2 repeats
    assert "images: 6 (12 per epoch with repeats)" in stdout and "regularisation: 4 (12 per epoch)" in stdout
    assert result.state.step == 3
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "28" and meta["ss_prior_loss_weight"] == "0.5"  # as kohya: 4 images x 7 repeats
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"7_zkchar": {"n_repeats": 7, "img_count": 4}}
    assert meta["ss_num_train_images"] == "12"


def test_a_kohya_dataset_config_trains_and_names_the_output(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """--dataset-config instead of --data: its subsets train (is_reg ones as regularisation), its options are the
    run's (a flag repeating one is fine), and the LoRA is named after the file."""
    from helpers import write_dataset

    reg = write_dataset(tmp_path / "reg", count=2, repeats=1) / "1_zkchar"
    toml = tmp_path / "my-set.toml"
    toml.write_text(f"""
[general]
caption_extension = ".txt"
batch_size = 2
flip_aug = true
[[datasets]]
resolution = 32
  [[datasets.subsets]]
  image_dir = '{tiny_dataset / "2_zkchar"}'
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = '{reg}'
  is_reg = true
""")
    out = tmp_path / "out"
    args = ["--dataset-config", str(toml), "--model", str(tiny_model_dir), "--output-dir", str(out), *FAST,
            "--max-steps", "1", "--sample-every", "0"]
    result = run(load_config(args))
    stdout = capsys.readouterr().out
    assert "images: 6 (18 per epoch with repeats)" in stdout and "regularisation: 2 (18 per epoch)" in stdout
    assert result.path == out / "my-set.safetensors" and result.path.is_file() and result.state.step == 1
    assert result.config.flip is True and result.config.batch_size == 2
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["dataset-config"] == str(toml) and saved["flip"] is True and "data" not in saved
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "18" and meta["ss_num_reg_images"] == "2"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_zkchar": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_zkchar": {"n_repeats": 3, "img_count": 6}}  # no local path
    assert set(json.loads(meta["ss_tag_frequency"])) == {"2_zkchar", "1_zkchar"}  # as kohya's, is_reg folders too
    assert 0 <= int(meta["ss_session_id"]) <= 2**32


def _unet_and_te_outputs(unet, text_encoder, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ids = torch.randint(0, 600, (2, 77), generator=g)
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
        noise_pred = unet(latents, torch.tensor([10, 700]), hidden).sample
    return noise_pred, hidden


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_v_model_dir"])
def test_exported_file_reproduces_trained_model_in_diffusers(request, model_fixture, tiny_dataset, tmp_path):
    """After real training steps (U-Net + text encoder), diffusers' load_lora_weights on the exported fp32
    file gives the trained model's outputs, and so does merging W + (alpha/r) up @ down by hand."""
    from diffusers import StableDiffusionPipeline

    model_dir = request.getfixturevalue(model_fixture)
    config = load_config(train_args(tiny_dataset, model_dir, tmp_path / "out", "--max-steps", "5", "--train-text-encoder",
                                    "--learning-rate", "5e-2", "--alpha", "2", "--save-precision", "fp32", "--sample-every", "0"))
    result = run(config)
    result.unet.eval(), result.text_encoder.eval()
    trained = _unet_and_te_outputs(result.unet, result.text_encoder)

    base = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    untouched = _unet_and_te_outputs(base.unet, base.text_encoder)
    assert (trained[0] - untouched[0]).abs().max() > 1e-3  # training really changed both models
    assert (trained[1] - untouched[1]).abs().max() > 1e-3

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(result.path.parent), weight_name=result.path.name)
    loaded = _unet_and_te_outputs(pipe.unet, pipe.text_encoder)
    assert (loaded[0] - trained[0]).abs().max() < 1e-4
    assert (loaded[1] - trained[1]).abs().max() < 1e-4

    merged = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    _merge_kohya_by_hand(merged, result.path)
    by_hand = _unet_and_te_outputs(merged.unet, merged.text_encoder)
    assert (by_hand[0] - trained[0]).abs().max() < 1e-4
    assert (by_hand[1] - trained[1]).abs().max() < 1e-4


def _merge_kohya_by_hand(pipe, path: Path) -> None:
    """W += (alpha / r) * up @ down for every module in the file, resolved by name against the modules."""
    names = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        module = getattr(pipe, component)
        for module_path, m in module.named_modules():
            full = module_path if component == "unet" or module_path.startswith("text_model.") else "text_model." + module_path
            names[prefix + full.replace(".", "_")] = m
    with safe_open(str(path), "pt") as f:
        bases = {k.split(".")[0] for k in f.keys()}
        assert bases <= names.keys()
        for name in bases:
            down, up = f.get_tensor(f"{name}.lora_down.weight"), f.get_tensor(f"{name}.lora_up.weight")
            alpha, rank = f.get_tensor(f"{name}.alpha").item(), down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)) * (alpha / rank)
            weight = names[name].weight
            with torch.no_grad():
                weight += delta.reshape(weight.shape)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--train-text-encoder", "--clip-skip", "2")], ids=["frozen-te", "trained-te-clip-skip-2"])
def test_bf16_mixed_precision_keeps_lora_in_fp32_and_samples(tiny_dataset, tiny_model_dir, tmp_path, extra):
    # Sample grids included: under accelerate's bf16 the U-Net's outputs come back in fp32, and a bf16 VAE was
    # handed fp32 latents ("Input type (float) and bias type (c10::BFloat16) should be the same") at step 0.
    # A trained text encoder's hidden states come back in fp32 the same way, and with --clip-skip 2 its bf16
    # final layer norm met them outside any autocast that casts on the CPU ("mixed dtype (CPU)").
    config = load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "out", "--max-steps", "2",
                                    "--mixed-precision", "bf16", "--sample-every", "2", "--gradient-checkpointing",
                                    "--output-name", "zk", *extra))
    result = run(config)
    lora = [p for n, p in result.unet.named_parameters() if "lora_" in n]
    base = [p for n, p in result.unet.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in base)
    assert result.outputs.model.vae.dtype == torch.bfloat16
    assert result.unet.is_gradient_checkpointing
    if "--train-text-encoder" in extra:
        assert all(getattr(encoder, "is_activation_checkpointing", None) or encoder.is_gradient_checkpointing  # new name in transformers 5
                   for encoder in result.text_encoders)
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]  # sample grids log lines of their own
    assert len(losses) == 2 and torch.isfinite(torch.tensor(losses)).all()
    for step in (0, 2):
        grid = Image.open(tmp_path / "out" / "samples" / f"zk-step{step:08d}.png")
        assert np.asarray(grid.convert("L")).std() > 0


@pytest.mark.slow
def test_gradient_accumulation_counts_optimizer_steps(tiny_dataset, tiny_model_dir, tmp_path):
    # 6 images x 2 repeats, batch 2 -> 6 batches per epoch (one bucket each); accumulation 4 -> 2 steps/epoch.
    config = load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "out", "--epochs", "2",
                                    "--gradient-accumulation-steps", "4", "--sample-every", "0", "--no-buckets"))
    result = run(config)
    assert result.state.step == 4 and result.state.epoch == 2
    with safe_open(str(result.path), "pt") as f:  # the run's length as trained, as kohya records it, not the options
        meta = f.metadata()
    assert (meta["ss_num_epochs"], meta["ss_max_train_steps"]) == ("2", "4")


def test_refusals_exit_2_with_clear_messages(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path)], "not a diffusers model folder"),
        (["--model", str(tiny_model_dir), "--mixed-precision", "fp16"], "fp16 needs a CUDA GPU"),
        (["--model", str(tiny_model_dir), "--resolution", "30"], "--resolution 30 must be a multiple of 4"),
        (["--model", str(tiny_model_dir), "--optimizer", "adamw8bit", "--max-steps", "1"], "adamw8bit"),
        (["--model", str(tiny_model_dir), "--xformers", "--max-steps", "1"], "--xformers needs the xformers package"),
        # Bucket sides against the model's native resolution when --resolution is not set (a traceback before).
        (["--model", str(tiny_model_dir), "--max-bucket-side", "16"],
         "--max-bucket-side 16 is smaller than this model's resolution 32 (its native size; --resolution was not set)"),
        (["--model", str(tiny_model_dir), "--min-bucket-side", "64"], "--min-bucket-side 64 is larger than this model's resolution 32"),
        # Found before the model loads: a cache folder that cannot be written (a traceback at the first entry before).
        (["--model", str(tiny_model_dir), "--latent-cache-dir", str(tiny_dataset / "2_zkchar" / "img0.txt")],
         f"--latent-cache-dir {tiny_dataset / '2_zkchar' / 'img0.txt'}: cannot write there"),
        # ... and a TensorBoard folder that cannot be (a NotADirectoryError traceback from SummaryWriter, once latents were cached).
        (["--model", str(tiny_model_dir), "--log-with", "tensorboard", "--logging-dir", str(tiny_dataset / "2_zkchar" / "img0.txt")],
         f"--logging-dir {tiny_dataset / '2_zkchar' / 'img0.txt'}: cannot write there"),
    ]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "samples").write_text("not a folder")  # "could not save s/samples/...png: File exists; free some space"
    cases.append((["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "s"), "--sample-every", "5"],
                  f"{tmp_path / 's' / 'samples'} is a file, but the sample grids are saved in a folder of that name; rename or remove it"))
    for extra, message in cases:
        code = main(["--data", str(tiny_dataset), "--output-dir", str(tmp_path / "o"), "--sample-every", "0", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (extra, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("module, name", [("bitsandbytes", "adamw8bit"), ("prodigyopt", "prodigy")])
def test_a_missing_optimizer_package_is_refused_before_the_model_loads(tiny_dataset, tmp_path, monkeypatch, capsys, module, name):
    """It needs no model: it was found only once the optimizer was built, after the model loaded (a Hub download)
    and every latent was cached."""
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    monkeypatch.setattr(train_module, "load_base_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    code = main(["--data", str(tiny_dataset), "--model", "some/model", "--output-dir", str(tmp_path / "o"), "--optimizer", name])
    err = capsys.readouterr().err
    assert code == 2 and f"--optimizer {name} needs" in err and f"pip install 'sd_lora[{name.replace('adamw8bit', 'bitsandbytes')}]'" in err, err


@pytest.mark.parametrize("installed, message", [
    (False, "--xformers needs the xformers package: pip install 'sd_lora[xformers]'"),
    (True, "--xformers runs on CUDA GPUs only; on this device drop --xformers to use PyTorch SDPA"),
])
def test_xformers_without_the_package_or_a_cuda_gpu_is_refused_before_the_model_loads(tiny_dataset, tmp_path, monkeypatch, capsys,
                                                                                      installed, message):
    """It was checked once the model had loaded (a Hub download); with xformers installed on a machine without a CUDA
    GPU, diffusers' ValueError then ended the run in a traceback."""
    import types

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers") if installed else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_module, "load_base_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    code = main(["--data", str(tiny_dataset), "--model", "some/model", "--output-dir", str(tmp_path / "o"), "--xformers"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_runs_cuda_peak_counts_from_its_start(tiny_dataset, tmp_path, monkeypatch):
    """A second run in one process (a notebook) reported the first run's CUDA peak as its own: the count now starts
    again before the model loads. Simulated: the run's device is a GPU."""
    from types import SimpleNamespace

    events = []
    monkeypatch.setattr(train_module, "process_state", lambda: SimpleNamespace(device=torch.device("cuda", 0), is_main_process=True))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append(("reset", device)))
    monkeypatch.setattr(train_module, "load_base_model", lambda *args, **kwargs: events.append("load") or pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        run(load_config(["--data", str(tiny_dataset), "--model", "some/model", "--output-dir", str(tmp_path / "o")]))
    assert events == [("reset", torch.device("cuda", 0)), "load"]


def test_a_warm_up_longer_than_an_epoch_run_says_how_long_the_run_is_and_the_fix(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    # With --epochs the run's length is known only once the images are bucketed: 12 images at batch 2 = 6 steps.
    code = main(train_args(tiny_dataset, tiny_model_dir, tmp_path / "o", "--epochs", "1", "--lr-scheduler", "linear", "--lr-warmup-steps", "20"))
    err = capsys.readouterr().err
    assert code == 2 and ("--lr-warmup-steps 20 is longer than the run (6 steps: 6 per epoch x 1 epochs); use at most 6, or train "
                          "longer with more --epochs or a --max-steps") in err, err


def test_samplers_that_ignore_a_zero_terminal_snr_schedule_are_refused(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """heun, dpm_2, dpm_2_a, dpmsingle and pndm drew a zero-terminal-SNR model's grids on the plain schedule."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkchar --ss k_dpm_2\nzkchar, red --ss euler\nzkchar, blue\n", encoding="utf-8")
    run = ["--data", str(tiny_dataset), "--model", str(tiny_model_dir), *FAST, "--prediction-type", "v_prediction",
           "--max-steps", "1", "--sample-every", "1"]
    ztsnr = [*run, "--zero-terminal-snr"]
    assert main([*ztsnr, "--output-dir", str(tmp_path / "o"), "--sample-sampler", "heun", "--sample-prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "--sample-sampler heun: sampler 'heun' ignores the zero-terminal-SNR noise schedule" in err
    assert f"{prompts}: --ss k_dpm_2 (prompt 'zkchar'): sampler 'k_dpm_2' ignores" in err
    assert "use one of ddim, euler, euler_a, dpmsolver++, unipc" in err and "euler (prompt" not in err
    # the plain schedule takes every sampler; with zero terminal SNR the five others draw
    assert main([*run, "--output-dir", str(tmp_path / "plain"), "--sample-sampler", "heun"]) == 0
    assert main([*ztsnr, "--output-dir", str(tmp_path / "z"), "--sample-sampler", "euler_a"]) == 0


def test_a_validation_split_of_one_image_is_refused(tmp_path, tiny_model_dir, capsys):
    """It silently trained without validation: one image cannot be both trained on and held out."""
    from tests.helpers import write_dataset

    one = write_dataset(tmp_path / "one", count=1)
    code = main(train_args(one, tiny_model_dir, tmp_path / "o", "--validation-split", "0.5", "--sample-every", "0"))
    err = capsys.readouterr().err
    assert code == 2 and "--validation-split 0.5 holds images out of the training set, which has 1" in err
    assert "--validation-data DIR" in err


def test_init_weights_named_as_the_runs_own_save_is_refused(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """Training from <output-dir>/<name>.safetensors overwrote the starting file with the result (lost work)."""
    out = tmp_path / "o"
    out.mkdir()
    for name in (f"{tiny_dataset.name}.safetensors", f"{tiny_dataset.name}-step00000002.safetensors", f"{tiny_dataset.name}-000001-diffusers.safetensors"):
        (out / name).write_bytes(b"a LoRA the user trained")
        code = main(init_args(tiny_dataset, tiny_model_dir, out, out / name, "--max-steps", "2", "--sample-every", "0"))
        err = capsys.readouterr().err
        assert code == 2 and f"--init-weights {out / name} is named as this run's own saves in {out}" in err, err
        assert (out / name).read_bytes() == b"a LoRA the user trained"
    assert not train_module.may_write(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--output-name", "x")), out / "xy.safetensors")


def test_an_output_name_too_long_for_a_file_name_is_refused_before_training(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """A 245-byte --output-name trained, then crashed saving NAME.safetensors (File name too long) with a traceback; the
    default name, the data folder's, can be as long."""
    long_folder = tmp_path / ("d" * 200)
    tiny_dataset.rename(long_folder)
    code = main(train_args(long_folder, tiny_model_dir, tmp_path / "o", "--sample-every", "0"))
    err = capsys.readouterr().err
    assert code == 2 and "the output name 'dddddddddddddddddddd'... (the data folder's name; --output-name was not set) is 200 bytes" in err, err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # nothing trained
    assert main(train_args(long_folder, tiny_model_dir, tmp_path / "o", "--sample-every", "0", "--max-steps", "1", "--save-every", "1",
                           "--format", "both", "--output-name", "n" * 196)) == 0


def test_bad_images_are_listed_before_training(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    folder = tiny_dataset / "2_zkchar"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (folder / "empty.jpg").write_bytes(b"")
    code = main(train_args(tiny_dataset, tiny_model_dir, tmp_path / "o", "--sample-every", "0"))
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and "empty.jpg" in err and "--skip-bad-images" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.slow
def test_trains_from_a_single_file_checkpoint(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """A tiny checkpoint in the original A1111/ComfyUI layout (written by our own writer) loads offline and trains."""
    from diffusers import StableDiffusionPipeline

    from sd_lora.models.single_file import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    checkpoint = save_single_file(pipe.components, tmp_path / "tiny.safetensors", family="sd1")
    code = main(["--data", str(tiny_dataset), "--model", str(checkpoint), "--model-config", str(tiny_model_dir),
                 "--output-dir", str(tmp_path / "o"), *FAST, "--max-steps", "2", "--sample-every", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sd1" in out and "epsilon" in out  # what was detected is printed
    with safe_open(str(tmp_path / "o" / "data.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1"
    data = checkpoint.read_bytes()  # the WebUIs' hashes of the base model file, as kohya records them
    assert len(data) > 0x110000 and meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert inspect_main([str(tmp_path / "o" / "data.safetensors")]) == 0
    assert re.search(rf"base model SHA-256 +{meta['ss_new_sd_model_hash']}\n", capsys.readouterr().out)


@pytest.mark.slow
def test_warm_start_from_init_weights_and_both_formats(tiny_dataset, tiny_model_dir, tmp_path):
    """--init-weights continues from an existing file (rank and modules from the file, even from a run
    with other settings); --format both writes the kohya and the diffusers profile of the same weights."""
    from safetensors.torch import load_file

    first = run(load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "a", "--max-steps", "2", "--rank", "2",
                                       "--alpha", "1", "--targets", "attn", "--train-text-encoder", "--sample-every", "0",
                                       "--save-precision", "fp32", "--learning-rate", "1e-2")))
    second = run(load_config(init_args(tiny_dataset, tiny_model_dir, tmp_path / "b", first.path, "--max-steps", "1", "--sample-every", "0",
                                       "--learning-rate", "1e-12",
                                        "--save-precision", "fp32", "--format", "both")))
    assert (second.config.rank, second.config.alpha, second.config.train_text_encoder) == (2, 1.0, True)
    assert second.config.targets == "attn"  # the file's modules, not the default --targets attn-mlp
    with safe_open(str(second.path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_network_args"])["targets"] == "attn"
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"]) == ("1", "1")  # --max-steps 1: one epoch begun
    a, b = load_file(str(first.path)), load_file(str(second.path))
    assert a.keys() == b.keys()  # the file's modules (attn preset + text encoder), not the default attn-mlp
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # lr 1e-12: the weights carried over
    diffusers_file = tmp_path / "b" / "data-diffusers.safetensors"
    d = load_file(str(diffusers_file))
    assert d and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in d) and not any("alpha" in k for k in d)
    assert len(d) == len([k for k in b if not k.endswith(".alpha")])


def test_init_weights_without_the_unet_starts_a_fresh_unet_lora(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """A text-encoder-only file used to crash (inject_lora: target_modules is empty): components the file has
    nothing for start a fresh LoRA on the preset's targets, the file's own modules carry over."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from sd_lora.formats.kohya import save_lora_file, to_kohya_state_dict
    from tests.helpers import random_lora_components

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    components = random_lora_components(pipe, rank=4, alpha=4, seed=0)
    del components["unet"]
    source = save_lora_file(tmp_path / "te-only.safetensors", to_kohya_state_dict(components), {"ss_network_dim": "4"})
    result = run(load_config(init_args(tiny_dataset, tiny_model_dir, tmp_path / "o", source, "--max-steps", "1", "--sample-every", "0",
                                       "--learning-rate", "1e-12", "--save-precision", "fp32")))
    assert "nothing for unet, which starts a fresh LoRA" in capsys.readouterr().out
    a, b = load_file(str(source)), load_file(str(result.path))
    assert a.keys() < b.keys() and any(k.startswith("lora_unet_") for k in b)  # the U-Net's preset modules, fresh
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # lr 1e-12: the file's modules carried over


def test_a_second_run_in_the_folder_says_it_replaces_the_first_runs_files(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """kohya replaces a file of the same name silently; a user who reran by mistake should learn it before the end."""
    args = train_args(tiny_dataset, tiny_model_dir, tmp_path / "o", "--max-steps", "1", "--sample-every", "0", "--output-name", "zk")
    assert main(args) == 0
    assert "earlier run" not in capsys.readouterr().err
    assert main(args) == 0
    assert (f"warning: {tmp_path / 'o' / 'zk.safetensors'} is an earlier run's; this run replaces it when it ends"
            in capsys.readouterr().err)
    # A run of another name in the folder keeps the earlier LoRA, but not its config.toml and metrics.jsonl.
    assert main(args[:-1] + ["other"]) == 0
    assert (f"warning: {tmp_path / 'o'} holds an earlier run's config.toml and metrics.jsonl (one per folder); this run "
            "replaces them" in capsys.readouterr().err)


def test_a_run_removes_what_a_killed_run_left_half_written(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """kill -9 (or the OOM killer) mid-save leaves hidden .<name>.XXXXXXXX.tmp temporaries behind, a LoRA file's or a
    state's hundreds of MB; the next run in the folders deletes them and says so. Nothing else is touched."""
    out, cache = tmp_path / "o", tmp_path / "cache"
    state = out / ".state-00000004.k2j4h6g8.tmp"
    leftovers = {out / ".zk.safetensors.abcd1234.tmp": 1024, state / "training_state.pt": 512,
                 out / "samples" / ".zk-step00000001.png.x_y_z_12.tmp": 512, cache / "ab" / f".{'ab' * 32}.safetensors.qwertyui.tmp": 1024}
    kept = {out / "notes.txt": 10, out / ".notes.txt.abcd1234.tmp": 10, cache / "ab" / ".other.safetensors.abcd1234.tmp": 10}
    for path, size in {**leftovers, **kept}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    for path in [*leftovers, *kept, state]:
        os.utime(path, (1_000_000_000, 1_000_000_000))  # (2001: older than this process)
    args = train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "1", "--sample-every", "0", "--output-name", "zk",
                      "--latent-cache-dir", str(cache))
    assert main(args) == 0
    assert (f"removed 4 half-written saves that a killed run left behind, freeing 3.0 KiB: {state}, {out / '.zk.safetensors.abcd1234.tmp'}, "
            f"{out / 'samples' / '.zk-step00000001.png.x_y_z_12.tmp'} and 1 more\n") in capsys.readouterr().out
    assert not any(path.exists() for path in [*leftovers, state]) and all(path.exists() for path in kept)
    assert main(args) == 0
    assert "half-written" not in capsys.readouterr().out


@pytest.mark.parametrize("extra", [(), ("--no-cache-latents",), ("--no-cache-latents", "--num-workers", "1")],
                         ids=["cached", "uncached-thread", "uncached-worker"])
def test_photos_with_a_broken_exif_block_train_with_one_warning(tmp_path, tiny_model_dir, capfd, extra):
    """The scan sums Pillow's per-image EXIF warnings up in one line; decoding the photos again (the latent cache, the
    batches in this process or in a worker) says nothing more. The photos train, turned upright."""
    from helpers import odd_exif_photo

    for i in range(4):
        odd_exif_photo(tmp_path / "data" / "1_zk" / f"{i}.jpg", entries=3 + i)
    out = tmp_path / "o"
    with warnings.catch_warnings():  # every warning printed, each time (pytest would record them): as Pillow's were
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, *_: print(f"{filename}: {message}", file=sys.stderr)
        assert main(train_args(tmp_path / "data", tiny_model_dir, out, "--max-steps", "2", "--sample-every", "0", *extra)) == 0
    err = capfd.readouterr().err  # (also a worker process's)
    [line] = [line for line in err.splitlines() if "Metadata Warning" in line or "Pillow" in line or "PIL" in line]
    assert line.startswith("warning: 4 images have EXIF or other metadata that Pillow could not fully read")
    with safe_open(str(out / "data.safetensors"), "pt") as f:
        [bucket] = json.loads(f.metadata()["ss_bucket_info"])["buckets"].values()
    assert bucket["resolution"][0] < bucket["resolution"][1]  # upright: the 64x48 pictures turned to portrait


def test_init_weights_of_no_preset_train_and_are_summarised_as_custom(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """Every other attn-mlp module is no --targets preset: the run's summary said "targets attn-mlp" (the default
    it did not use) where the note before it and ss_network_args say 'custom'."""
    from diffusers import StableDiffusionPipeline

    from tests.helpers import write_random_lora

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    source = write_random_lora(tmp_path / "every-other.safetensors", pipe, rank=4, alpha=4, seed=0, unet_every=2)
    result = run(load_config(init_args(tiny_dataset, tiny_model_dir, tmp_path / "o", source, "--max-steps", "1", "--sample-every", "0")))
    out = capsys.readouterr().out
    assert "LoRA: rank 4, alpha 4, targets custom + text encoder" in out
    with safe_open(str(result.path), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"])["targets"] == "custom"


def _kohya_file(tiny_model_dir, path, *, rank, alpha, components=("unet", "text_encoder")):
    from diffusers import StableDiffusionPipeline

    from sd_lora.formats.kohya import save_lora_file, to_kohya_state_dict
    from tests.helpers import random_lora_components

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    kept = {c: w for c, w in random_lora_components(pipe, rank=rank, alpha=alpha, seed=0).items() if c in components}
    return save_lora_file(path, to_kohya_state_dict(kept), {"ss_network_dim": str(rank)})


@pytest.mark.parametrize("flags, refused", [
    (["--no-train-text-encoder"], "--no-train-text-encoder: the file has text-encoder modules"),
    (["--rank", "8"], "--rank 8: the file's rank is 4; drop --rank, or resize the file first"),
    (["--alpha", "2"], "--alpha 2: the file's alpha is 4"),
])
def test_init_weights_refuses_options_set_against_the_file(tiny_dataset, tiny_model_dir, tmp_path, flags, refused):
    """The file decides the LoRA's shape; an option the user set that contradicts it used to be replaced
    silently (--no-train-text-encoder still trained the text encoder). Refused before training."""
    from sd_lora.errors import UserError

    source = _kohya_file(tiny_model_dir, tmp_path / "full.safetensors", rank=4, alpha=4)
    with pytest.raises(UserError, match=f"--init-weights {source} decides the LoRA's shape") as caught:
        run(load_config(init_args(tiny_dataset, tiny_model_dir, tmp_path / "o", source, "--max-steps", "1", "--sample-every", "0", *flags)))
    assert refused in str(caught.value)
    assert not (tmp_path / "o" / "data.safetensors").exists()


def test_init_weights_with_train_text_encoder_adds_a_fresh_text_encoder_lora(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """--train-text-encoder beside a U-Net-only file trains the text encoder from a fresh LoRA (it used to be
    switched off silently, because the file has none); the same rank and alpha as the file, which equal
    options are accepted."""
    from safetensors.torch import load_file

    source = _kohya_file(tiny_model_dir, tmp_path / "unet.safetensors", rank=4, alpha=4, components=("unet",))
    result = run(load_config(init_args(tiny_dataset, tiny_model_dir, tmp_path / "o", source, "--max-steps", "1", "--sample-every", "0",
                                       "--train-text-encoder", "--rank", "4", "--learning-rate", "1e-12", "--save-precision", "fp32")))
    assert "nothing for text_encoder, which starts a fresh LoRA" in capsys.readouterr().out
    assert (result.config.rank, result.config.alpha, result.config.train_text_encoder) == (4, 4.0, True)
    a, b = load_file(str(source)), load_file(str(result.path))
    te = {k for k in b if k.startswith("lora_te_")}
    assert te and a.keys() == b.keys() - te
    assert all(b[k].shape[0] == 4 for k in te if k.endswith("lora_down.weight"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # the file's U-Net modules carried over


@pytest.mark.slow
def test_latent_cache_dir_is_reused_by_a_second_run(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "latents"
    common = ["--max-steps", "1", "--sample-every", "0", "--latent-cache-dir", str(cache), "--flip"]
    run(load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "a", *common)))
    import hashlib

    entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    distinct = {hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_dataset.rglob("*.png")}
    assert len(entries) == 2 * len(distinct)  # identical images share entries; plain and mirrored each
    records = len(list(tiny_dataset.rglob("*.png")))
    assert f"latent cache {cache}: 0 latents read from it, {2 * records} encoded" in capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    run(load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "b", *common)))
    assert f"latent cache {cache}: {2 * records} latents read from it, 0 encoded" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == stamps  # nothing re-encoded or rewritten


def _saved_precision(out) -> tuple[str, str]:
    [lora] = out.glob("*.safetensors")
    with safe_open(str(lora), "pt") as f:
        metadata = f.metadata()
    return metadata["ss_mixed_precision"], (out / "config.toml").read_text()


def test_a_run_records_the_resolved_precision(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model is far below full size: auto trains in fp32 here, and the file and config say so."""
    monkeypatch.setattr(train_module, "probe_hardware", lambda: Hardware(cuda=False, cuda_bf16=False, cpu_bf16=True))
    config = load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "out", "--max-steps", "1", "--sample-every", "0"))
    assert config.mixed_precision == "auto"
    result = train_module.run(config)
    assert all(p.dtype == torch.float32 for p in result.unet.parameters())
    saved, toml = _saved_precision(tmp_path / "out")
    assert saved == "no" and 'mixed-precision = "no"' in toml


def test_auto_on_a_bf16_cpu_with_a_full_size_model_trains_in_bf16(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """Pretend the tiny U-Net is full size: auto then stores the base in bf16 and keeps the LoRA in fp32."""
    monkeypatch.setattr(train_module, "probe_hardware", lambda: Hardware(cuda=False, cuda_bf16=False, cpu_bf16=True))
    monkeypatch.setattr(precision, "FULL_SIZE_PARAMETERS", 1)
    monkeypatch.setattr(train_module, "choose_mixed_precision",
                        lambda requested, hardware, n: precision.choose_mixed_precision(requested, hardware, n * FULL_SIZE_PARAMETERS))
    config = load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "out", "--max-steps", "2", "--sample-every", "0"))
    result = train_module.run(config)
    lora = [p for n, p in result.unet.named_parameters() if "lora_" in n]
    base = [p for n, p in result.unet.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in base)
    saved, _ = _saved_precision(tmp_path / "out")
    assert saved == "bf16"
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


@pytest.mark.slow
def test_compiled_blocks_train_the_same_lora_as_eager(tiny_dataset, tiny_model_dir, tmp_path):
    """--compile blocks: the same LoRA as eager after two steps (to float rounding), same names; samples still render."""
    results = {}
    for mode in ("off", "blocks"):
        config = load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / mode, "--max-steps", "2", "--no-buckets",
                                        "--sample-every", "2", "--compile", mode))
        results[mode] = {n: p.detach().clone() for n, p in run(config).unet.named_parameters() if "lora_" in n}
        assert list((tmp_path / mode / "samples").glob("*-step00000002.png"))
    assert results["blocks"].keys() == results["off"].keys() and results["off"]
    for name, eager in results["off"].items():
        torch.testing.assert_close(results["blocks"][name], eager, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_without_a_cpp_compiler_is_refused_before_the_model_loads(tiny_dataset, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["--data", str(tiny_dataset), "--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out"),
                 "--compile", "unet"]) == 2
    assert "--compile on the CPU needs a C++ compiler" in capsys.readouterr().err


def test_threads_apply_to_the_run_and_the_previous_count_comes_back(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever the test process runs with, the run must change it
    try:
        assert main(train_args(tiny_dataset, tiny_model_dir, tmp_path / "out", "--max-steps", "1", "--sample-every", "0", "--threads", "1")) == 0
        assert "CPU threads: 1" in capsys.readouterr().out  # the summary reports what the run used
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "threads = 1" in (tmp_path / "out" / "config.toml").read_text()


def test_more_threads_than_cores_is_warned_about(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setattr(train_module.os, "cpu_count", lambda: 2)
    with train_module.cpu_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    assert "--threads 3 is more than the 2 CPU cores here" in capsys.readouterr().err


def test_out_of_memory_keeps_the_last_step_and_says_what_would_fit(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """Step 3 runs out of memory: the LoRA of step 2 is saved and the error names the flags that use less."""
    from sd_lora import loop
    from sd_lora.errors import UserError

    calls, compute_loss = [], loop.compute_loss

    def failing_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the memory check's trial step, then steps 1, 2 and 3
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return compute_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", failing_third_step)
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "5", "--sample-every", "0",
                                   "--output-name", "zk")))
    message = str(caught.value)
    saved = out / "zk-step00000002.safetensors"
    assert message.startswith("out of cpu memory in step 3 (OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB)")
    assert f"saved to {saved}; --init-weights {saved} starts a new run from it" in message
    assert "--batch-size 1 --gradient-accumulation-steps 2" in message and "--gradient-checkpointing" in message
    assert "peak memory:" in message
    with safe_open(str(saved), "pt") as f:
        assert f.metadata()["ss_steps"] == "2" and len(list(f.keys())) == 48 * 3
    assert not (out / "zk.safetensors").exists()


def test_a_crash_in_a_hook_keeps_the_lora_of_the_last_completed_step(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A sample grid that fails at step 3 (here a bug in drawing) ended the run with its traceback and none of the
    three trained steps saved: the LoRA of step 3 is now written before the error goes on."""
    from sd_lora import outputs

    generate_grid = outputs.generate_grid

    def failing_at_step_3(*args, title, **kwargs):
        if title.endswith("step 3"):
            raise RuntimeError("a bug in sampling")
        return generate_grid(*args, title=title, **kwargs)

    monkeypatch.setattr(outputs, "generate_grid", failing_at_step_3)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="a bug in sampling"):
        run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "5", "--sample-every", "3", "--output-name", "zk")))
    saved = out / "zk-step00000003.safetensors"
    with safe_open(str(saved), "pt") as f:
        assert f.metadata()["ss_steps"] == "3" and len(list(f.keys())) == 48 * 3
    assert f"the LoRA of step 3, the last one completed, was saved to {saved}" in capsys.readouterr().err


def test_a_failed_state_save_keeps_the_lora_of_its_step_once(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A training state that cannot be written (a full disk) ends the run with its message; the LoRA of that step
    is kept (it was not), and a step whose --save-every file is already written is not written again."""
    from sd_lora import checkpoint, outputs

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    written, write = [], outputs.RunOutputs._write_lora
    monkeypatch.setattr(outputs.RunOutputs, "_write_lora", lambda self, path, state: (written.append(path.name), write(self, path, state))[1])
    out = tmp_path / "out"
    assert main(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "5", "--sample-every", "0", "--save-state-every", "2",
                           "--output-name", "zk")) == 2
    assert f"could not save the training state in {out}: No space left on device. Earlier states are intact; free some space" in capsys.readouterr().err
    assert written == ["zk-step00000002.safetensors"]
    written.clear()
    assert main(train_args(tiny_dataset, tiny_model_dir, tmp_path / "every", "--max-steps", "5", "--sample-every", "0",
                           "--save-state-every", "2", "--save-every", "2", "--output-name", "zk")) == 2
    assert written == ["zk-step00000002.safetensors"]


def test_text_encoder_runs_once_up_front_not_during_training(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Frozen text encoder, fixed captions: every caption is encoded in one batch before step 1 (the lazy cache
    used to call the encoder from inside training steps as captions first appeared)."""
    from sd_lora.models import load as load_module

    calls, load_base_model = [], load_module.load_base_model

    def counting(*args, **kwargs):
        model = load_base_model(*args, **kwargs)
        model.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
        return model

    monkeypatch.setattr(train_module, "load_base_model", counting)
    run(load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "out", "--max-steps", "6", "--sample-every", "0")))
    captions = {p.read_text() for p in tiny_dataset.rglob("*.txt")}
    assert len(captions) == 3 and calls == [3]  # the distinct captions of the six images, in one call
    assert "caching text" in capsys.readouterr().err


def test_a_new_run_in_the_same_folder_starts_a_new_metrics_log(tiny_dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    for steps in ("3", "2"):
        run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", steps, "--sample-every", "0")))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the second run's log only (a resumed run appends: tests/test_checkpoint.py)


def test_steps_skipped_on_the_device_log_every_step_and_train_the_same_lora(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """The GPU path (fused AdamW, skip on the device, numbers read one step late) forced on the CPU: the same
    LoRA and metrics.jsonl as the host check, each step logged once and in order, validation included."""
    from sd_lora import loop

    def fused_adamw(name, groups, *, weight_decay, device):
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay, fused=True)

    monkeypatch.setattr(train_module, "build_optimizer", fused_adamw)
    runs, decided = {}, []
    for on_device in (False, True):
        def decide(device, optimizer, on=on_device):
            decided.append(on and loop.supports_skip_on_device(optimizer))  # accelerate's wrapper around fused AdamW
            return decided[-1]

        monkeypatch.setattr(train_module, "skip_steps_on_device", decide)
        out = tmp_path / str(on_device)
        result = run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "5", "--sample-every", "0",
                                            "--validation-split", "0.2", "--validate-every", "2")))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[on_device] = ({n: p.detach().clone() for n, p in result.unet.named_parameters() if "lora_" in n},
                           [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r],
                           [(r["step"], r["val_loss"]) for r in records if "val_loss" in r])
    assert decided == [False, True]
    (host_w, host_steps, host_val), (dev_w, dev_steps, dev_val) = runs[False], runs[True]
    assert [s for s, _, _ in dev_steps] == [1, 2, 3, 4, 5]
    assert dev_steps == host_steps and dev_val == host_val and [s for s, _ in dev_val] == [2, 4, 5]
    assert all(torch.equal(host_w[n], dev_w[n]) for n in host_w)


def test_captions_longer_than_the_text_encoder_reads_are_named_before_training(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    folder = tiny_dataset / "2_zkchar"
    long = "zkchar, " + ", ".join(f"detail {i}" for i in range(60))
    for name in ("img0.txt", "img1.txt"):
        (folder / name).write_text(long)
    distinct = len({p.read_text() for p in folder.glob("*.txt")})
    run(load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "o", "--max-steps", "2", "--sample-every", "0")))
    err = capsys.readouterr().err
    assert err.count("lose their end") == 1  # once, before training, not counted again per step
    assert f"warning: 1 of {distinct} captions are longer than the 77 tokens the text encoder reads, and lose their end (the longest, " in err
    assert f"{long[:77]}..." in err


def test_max_token_length_150_trains_and_samples_long_captions_in_two_windows(tiny_dataset, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Captions of ~125 tokens condition the U-Net on 152 positions in training and in the sample grids;
    only the caption longer than 150 tokens is warned about."""
    from sd_lora.models.conditioning import Conditioner
    from sd_lora.sampling import sampler

    folder = tiny_dataset / "2_zkchar"
    for path in folder.glob("*.txt"):
        path.write_text(path.read_text() + ", " + ", ".join(f"tag {j}" for j in range(18)))  # 107 tokens
    (folder / "img0.txt").write_text("zkchar, " + ", ".join(f"detail {j}" for j in range(40)))  # over 150 tokens
    trained, sampled = [], []
    encode, condition = Conditioner.__call__, sampler._text_conditioning

    def spy_encode(self, *args):
        kwargs = encode(self, *args)
        trained.append(tuple(kwargs["encoder_hidden_states"].shape))
        return kwargs

    def spy_condition(*args):
        kwargs = condition(*args)
        sampled.append(tuple(kwargs["prompt_embeds"].shape))
        return kwargs

    monkeypatch.setattr(Conditioner, "__call__", spy_encode)
    monkeypatch.setattr(sampler, "_text_conditioning", spy_condition)
    out = tmp_path / "o"
    run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "1", "--sample-every", "1", "--max-token-length", "150")))
    assert trained and all(shape == (2, 152, 32) for shape in trained)
    assert sampled and all(shape == (1, 152, 32) for shape in sampled)  # the dataset's captions as sample prompts
    err = capsys.readouterr().err
    assert "warning: 1 of 4 captions are longer than --max-token-length 150 (152 tokens with the start and end tokens), and lose their end" in err
    assert "or pass --max-token-length 225" in err
    with safe_open(str(out / f"{tiny_dataset.name}.safetensors"), "pt") as f:
        assert f.metadata()["ss_max_token_length"] == "150"
    assert tomllib.loads((out / "config.toml").read_text())["max-token-length"] == 150


def test_a_hidden_data_folder_does_not_give_a_hidden_lora_file(tiny_model_dir, tmp_path):
    from tests.helpers import write_dataset

    data = write_dataset(tmp_path / ".chars")
    result = run(load_config(train_args(data, tiny_model_dir, tmp_path / "o", "--max-steps", "1", "--sample-every", "0")))
    assert result.path == tmp_path / "o" / "chars.safetensors" and result.path.is_file()


def test_sample_prompts_longer_than_the_text_encoder_reads_are_named_before_training(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """With --clip-skip 2 the grids encode prompts as training does (no diffusers warning): the cut is said once."""
    long = "zkchar, " + ", ".join(f"detail {i}" for i in range(60))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"zkchar --n {long}\n{long}\n", encoding="utf-8")
    run(load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "o", "--max-steps", "1", "--sample-every", "0",
                               "--sample-every-epochs", "0", "--clip-skip", "2", "--sample-prompts", str(prompts))))
    assert str(prompts) not in capsys.readouterr().err  # no grids: nothing to warn about
    run(load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "o2", "--max-steps", "1", "--sample-every", "1",
                               "--sample-steps", "1", "--clip-skip", "2", "--sample-prompts", str(prompts))))
    err = capsys.readouterr().err
    assert err.count(str(prompts)) == 1
    assert (f"warning: 1 of 2 prompts and negative prompts in {prompts} are longer than the 77 tokens the text encoder reads, "
            "and lose their end (the longest, ") in err
