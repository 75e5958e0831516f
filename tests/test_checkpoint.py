"""Full-state checkpoints: exact resume, interrupts, refusals, atomic saves, validation loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sd_lora import checkpoint, fsio, outputs
from sd_lora import train as train_module
from sd_lora.config import load_config
from sd_lora.errors import Interrupted, UserError
from sd_lora.train import main, run

# Everything random is switched on: LoRA dropout, flips, tag shuffling, caption dropout, noise offset,
# a cosine schedule, text-encoder training, gradient accumulation.
EXACT = ["--resolution", "32", "--batch-size", "2", "--rank", "4", "--sample-every", "0", "--save-precision", "fp32",
         "--lora-dropout", "0.1", "--flip", "--shuffle-tags", "--caption-dropout", "0.2", "--noise-offset", "0.05",
         "--lr-scheduler", "cosine", "--train-text-encoder", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-2"]


def args(data, model, out, *extra):
    return ["--data", str(data), "--model", str(model), "--output-dir", str(out), *EXACT, *extra]


def assert_same_lora(path_a, path_b) -> None:
    """Two LoRA files hold the same tensors under the same keys, bit for bit."""
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def small_state(tmp_path, keep: int):
    """(config, `save_state` keyword arguments) for states of a 2x2 linear layer, its AdamW and a constant schedule."""
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    config = load_config(["--data", str(tmp_path)])
    return config, dict(modules={"unet": module}, optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                        rng=[checkpoint.rng_states(torch.Generator())], config=config, data_fingerprint="x", keep=keep)


def stop_at(monkeypatch, step: int):
    """Make the run receive a (simulated) SIGINT during step `step`."""
    original = outputs.RunOutputs.on_step_end

    def on_step_end(self, state):
        original(self, state)
        if state.step == step:
            self.stop.signal = signal.SIGINT

    monkeypatch.setattr(outputs.RunOutputs, "on_step_end", on_step_end)


@pytest.mark.slow
def test_a_run_from_init_weights_resumes_from_its_own_config_toml(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """config.toml records the shape the --init-weights file decided (rank, alpha, text encoder): resuming with
    it, as the interrupt message says, is not refused as contradicting the file, and ends bit-identical."""
    first = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "src", "--max-steps", "1", "--rank", "2", "--alpha", "1")))

    def from_first(out):  # EXACT without its --rank: the file decides the rank
        every = args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--init-weights", str(first.path))
        at = every.index("--rank")
        return every[:at] + every[at + 2:]

    full = run(load_config(from_first(tmp_path / "a")))
    assert (full.config.rank, full.config.alpha, full.config.train_text_encoder) == (2, 1.0, True)
    stop_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run(load_config(from_first(tmp_path / "b")))
    monkeypatch.undo()
    assert main(["--config", str(tmp_path / "b" / "config.toml"), "--resume", "latest"]) == 0
    assert_same_lora(full.path, tmp_path / "b" / "data.safetensors")


@pytest.mark.slow
def test_interrupted_and_resumed_run_is_bit_identical(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    full = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "a", "--max-steps", "7")))
    # 6 images x 2 repeats / batch 2 = 6 batches = 3 steps per epoch (accumulation 2): stopping at step 4
    # resumes in the middle of the second epoch.
    stop_at(monkeypatch, 4)
    with pytest.raises(Interrupted) as e:
        run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "b", "--max-steps", "7")))
    assert e.value.exit_code == 130 and "--resume latest" in str(e.value)
    assert (tmp_path / "b" / "state-00000004").is_dir()
    assert (tmp_path / "b" / "data-step00000004.safetensors").is_file()  # output name: the data folder's
    monkeypatch.undo()
    resumed = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "b", "--max-steps", "7", "--resume", "latest")))
    assert resumed.state.step == 7
    assert_same_lora(full.path, resumed.path)
    # metrics continue where they stopped
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    # ... and so does the moving average (it restarted at the first resumed step's loss: loss/average jumped)
    averages = [[json.loads(line)["loss_average"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in "ab"]
    assert averages[1] == averages[0]
    # ... and the training time (it restarted at 0: elapsed went backwards), from the run's first start
    elapsed = [json.loads(line)["elapsed"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    started = []
    for name in ("data-step00000004.safetensors", "data.safetensors"):
        with safe_open(str(tmp_path / "b" / name), "pt") as f:
            started.append(f.metadata()["ss_training_started_at"])
    assert started[0] == started[1]


def test_a_stop_during_a_sample_grid_skips_the_grid_and_saves(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM while the step-0 grid is drawn: the grid is abandoned at its next denoising step (it used to
    be finished first, minutes with many steps and seeds), then the step, the LoRA and the state are saved."""
    generate_grid = outputs.generate_grid

    def terminated_while_sampling(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # to this process: its StopRequest handler sets the flag
        return generate_grid(*a, **kw)

    monkeypatch.setattr(outputs, "generate_grid", terminated_while_sampling)
    out = tmp_path / "o"
    with pytest.raises(Interrupted) as e:
        run(load_config(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "5", "--sample-every", "2", "--sample-steps", "50")))
    assert e.value.exit_code == 128 + signal.SIGTERM and "stopped by SIGTERM at step 1" in str(e.value)
    assert "samples at step 0 skipped: a stop was requested" in capsys.readouterr().out
    assert not (out / "samples").exists() or not list((out / "samples").iterdir())
    assert (out / "data-step00000001.safetensors").is_file() and (out / "state-00000001").is_dir()


def test_a_stop_during_the_final_save_finishes_the_file_and_skips_the_end_grids(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the final file was written aborted that write (the run had left the StopRequest): the steps
    since the last save were lost. The file and the end's state are now written; the end's grids are skipped."""
    export = outputs.export_lora

    def interrupted_during_the_final_save(path, *a, **kw):
        if path.name == "data.safetensors":
            os.kill(os.getpid(), signal.SIGINT)
        return export(path, *a, **kw)

    monkeypatch.setattr(outputs, "export_lora", interrupted_during_the_final_save)
    out = tmp_path / "o"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "3", "--save-state-every", "2", "--sample-every", "2",
                     "--sample-steps", "2")) == 0
    with safe_open(str(out / "data.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "3"
    assert checkpoint.list_states(out)[-1].name == "state-00000003"
    assert "samples at step 3 skipped" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["data-step00000000.png", "data-step00000002.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file or folder left


@pytest.mark.parametrize("damage", ["truncated training state", "cut progress.json", "missing LoRA tensors", "bad config.toml"])
def test_damaged_state_names_an_older_one(tmp_path, damage):
    config, kwargs = small_state(tmp_path, keep=2)
    older = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(1, 0, 1), **kwargs)
    newer = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(2, 0, 2), **kwargs)
    if damage == "truncated training state":
        (newer / "training_state.pt").write_bytes((newer / "training_state.pt").read_bytes()[:100])
    elif damage == "cut progress.json":
        (newer / "progress.json").write_text("{")
    elif damage == "bad config.toml":
        (newer / "config.toml").write_text("rank = ")
    else:
        (newer / "lora_params.safetensors").unlink()
    with pytest.raises(UserError) as caught:
        checkpoint.load_state(newer, config, "x")
    message = str(caught.value)
    assert message.startswith(f"cannot resume from {newer}: the training state is damaged (")
    assert message.endswith(f"resume from an older one (--resume {older}) or delete this one")
    assert checkpoint.load_state(older, config, "x").progress.step == 1
    with pytest.raises(UserError, match="no older state is left in that folder: start the run again"):
        for f in older.iterdir():
            f.write_bytes(b"")
        checkpoint.load_state(older, config, "x")


def test_changed_images_name_every_image_folder_the_run_reads(tmp_path):
    """The data fingerprint covers --reg-data and --validation-data too: a changed regularisation or validation
    image used to be blamed on --data alone."""
    for name in ("data", "reg", "val", "out"):
        (tmp_path / name).mkdir()
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    config = load_config(["--data", str(tmp_path / "data"), "--reg-data", str(tmp_path / "reg"), "--validation-data", str(tmp_path / "val")])
    path = checkpoint.save_state(tmp_path / "out", progress=checkpoint.Progress(1, 0, 1),
                                 modules={"unet": module}, optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                                 rng=[checkpoint.rng_states(torch.Generator())], config=config, data_fingerprint="before", keep=1)
    with pytest.raises(UserError) as caught:
        checkpoint.load_state(path, config, "after")
    assert (f"--data {tmp_path / 'data'} or --reg-data {tmp_path / 'reg'} or --validation-data {tmp_path / 'val'}: "
            "the images or captions changed since the state was saved") in str(caught.value)


def test_state_keeps_the_fp16_loss_scale(tmp_path):
    """Under fp16 a resumed run goes on with the loss scale it had reached, not 65536 again (a few overflow
    steps, and a run no longer identical to an uninterrupted one)."""
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    optimizer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # as accelerate's fp16 optimizer wrapper holds it
    optimizer.scaler.scale(torch.ones(()))  # a step's loss scaled: the scaler's state exists from here
    optimizer.scaler.update(2.0**11)  # the scale a run reached
    config = load_config(["--data", str(tmp_path)])
    path = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3), modules={"unet": module}, optimizer=optimizer,
                                 lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), rng=[checkpoint.rng_states(torch.Generator())],
                                 config=config, data_fingerprint="x", keep=1)
    loaded = checkpoint.load_state(path, config, "x")
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(loaded.training["scaler"])
    assert restored.get_scale() == 2.0**11


@pytest.mark.slow
def test_sigint_to_the_real_cli_saves_and_resume_finishes_identically(tiny_dataset, tiny_model_dir, tmp_path):
    """Ctrl-C in a terminal signals the whole process group, DataLoader workers included: they must neither
    die (the step in progress still needs its batch) nor announce the stop themselves."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "sd_lora.train", *args(tiny_dataset, tiny_model_dir, out, "--max-steps", "60", "--output-name", "cli",
                                                        "--num-workers", "2")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # the training process and its two workers
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.count("SIGINT received") == 1 and "To continue: python -m sd_lora.train --config" in stderr
    assert "Traceback" not in stderr
    states = checkpoint.list_states(out)
    assert len(states) == 1
    stopped_at = int(states[0].name.split("-")[1])
    assert 2 <= stopped_at < 60
    assert (out / f"cli-step{stopped_at:08d}.safetensors").is_file()
    # Resume exactly as the message says, then compare with an uninterrupted run.
    code = main(["--config", str(out / "config.toml"), "--resume", "latest"])
    assert code == 0
    full = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "full", "--max-steps", "60", "--output-name", "cli")))
    assert_same_lora(full.path, out / "cli.safetensors")


@pytest.mark.slow
def test_resume_refuses_incompatible_config_and_allows_extension(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "2", "--save-state-every", "1", "--keep-states", "2")) == 0
    assert [p.name for p in checkpoint.list_states(out)] == ["state-00000001", "state-00000002"]
    code = main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--rank", "8", "--targets", "attn", "--resume", "latest"))
    err = capsys.readouterr().err
    assert code == 2
    assert "--rank: 4 in the saved run, 8 now" in err and "--targets: 'attn-mlp' in the saved run, 'attn' now" in err
    # The restored optimizer and schedule would keep the saved learning rates: a new one is refused, not recorded.
    code = main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--learning-rate", "5e-4", "--text-encoder-lr", "2e-5",
                     "--weight-decay", "0.5", "--resume", "latest"))
    err = capsys.readouterr().err
    assert code == 2
    assert "--learning-rate: 0.01 in the saved run, 0.0005 now" in err and "--text-encoder-lr: None in the saved run, 2e-05 now" in err
    assert "--weight-decay: 0.01 in the saved run, 0.5 now" in err  # the restored optimizer would keep 0.01
    # Same run, longer: allowed, continues from step 2.
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--save-state-every", "1", "--keep-states", "2", "--resume", "latest")) == 0
    assert [p.name for p in checkpoint.list_states(out)] == ["state-00000003", "state-00000004"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # Changed data is noticed.
    (tiny_dataset / "2_zkchar" / "img0.txt").write_text("a different caption")
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "6", "--resume", "latest")) == 2
    assert f"--data {tiny_dataset}: the images or captions changed" in capsys.readouterr().err


def test_a_finished_run_saves_its_last_state_so_extending_it_trains_no_step_twice(tiny_dataset, tiny_model_dir, tmp_path):
    # As kohya's --save_state: the end of the run is a state too. Before, a run of 3 steps saving every 2 kept
    # only state 2, and extending it quietly trained step 3 again from there.
    out = tmp_path / "e"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "3", "--save-state-every", "2", "--keep-states", "2")) == 0
    assert [p.name for p in checkpoint.list_states(out)] == ["state-00000002", "state-00000003"]
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "5", "--save-state-every", "2", "--keep-states", "2",
                     "--resume", "latest")) == 0
    assert [p.name for p in checkpoint.list_states(out)] == ["state-00000004", "state-00000005"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def session_id(path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["ss_session_id"]


def test_extending_a_finished_run_writes_the_epoch_file_its_end_left_to_the_final_file(tiny_dataset, tiny_model_dir, tmp_path):
    # As kohya, the last epoch is the final <name>.safetensors, not also <name>-000002. Extended to 3 epochs, the run
    # overwrote that final file at its new end: epoch 2's weights were lost.
    out = tmp_path / "x"
    common = ["--save-every-epochs", "1", "--save-state-every", "100", "--output-name", "x"]
    assert main(args(tiny_dataset, tiny_model_dir, out, "--epochs", "2", *common)) == 0
    epoch_2 = load_file(str(out / "x.safetensors"))
    first_session = session_id(out / "x.safetensors")
    assert sorted(p.name for p in out.glob("x*.safetensors")) == ["x-000001.safetensors", "x.safetensors"]
    assert main(args(tiny_dataset, tiny_model_dir, out, "--epochs", "3", *common, "--resume", "latest")) == 0
    assert sorted(p.name for p in out.glob("x*.safetensors")) == ["x-000001.safetensors", "x-000002.safetensors", "x.safetensors"]
    kept = load_file(str(out / "x-000002.safetensors"))
    assert kept.keys() == epoch_2.keys() and all(torch.equal(kept[k], epoch_2[k]) for k in kept)
    up = next(k for k in kept if k.endswith(".lora_up.weight"))
    assert not torch.equal(load_file(str(out / "x.safetensors"))[up], kept[up])  # the final file trained on
    # ss_session_id says which session trained a file's weights: epoch 2's are the first run's, as its final file said
    # (they were written with the resumed run's id), and the resumed run's own end has an id of its own.
    sessions = {name: session_id(out / name) for name in ("x-000001.safetensors", "x-000002.safetensors", "x.safetensors")}
    assert sessions["x-000001.safetensors"] == sessions["x-000002.safetensors"] == first_session != sessions["x.safetensors"]


def test_a_resume_with_another_lr_schedule_trains_its_first_step_at_the_new_schedules_rate(tiny_dataset, tiny_model_dir, tmp_path):
    # A new --lr-scheduler (or a longer run) takes effect on resume, but the restored optimizer kept the saved
    # schedule's rate: step 3 trained (and logged) constant's 1e-2 instead of linear's 5e-3.
    out, fresh = tmp_path / "o", tmp_path / "fresh"
    common = ["--max-steps", "4", "--lr-scheduler", "linear"]
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "2", "--save-state-every", "2", "--lr-scheduler", "constant")) == 0
    assert main(args(tiny_dataset, tiny_model_dir, out, *common, "--resume", "latest")) == 0
    assert main(args(tiny_dataset, tiny_model_dir, fresh, *common)) == 0

    def rates(folder):
        return {r["step"]: r["lr"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "lr" in r}

    assert rates(fresh) == {1: 1e-2, 2: 7.5e-3, 3: 5e-3, 4: 2.5e-3}
    assert rates(out) == {1: 1e-2, 2: 1e-2, 3: 5e-3, 4: 2.5e-3}


def test_resume_latest_without_states_is_explained(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    assert main(args(tiny_dataset, tiny_model_dir, tmp_path / "empty", "--max-steps", "2", "--resume", "latest")) == 2
    assert "no state folder in" in capsys.readouterr().err


def test_a_state_sets_aside_the_later_states_of_a_run_that_went_further(tmp_path):
    """Resumed from state 6 of a run that had reached state 8, then stopped at 7: --keep-states 2 used to keep 7
    and 8 and delete 6, and --resume latest (what the stop message says) then continued the abandoned run's
    state 8 (or called the run finished). A new run in the folder had its own first state deleted at once."""
    config, kwargs = small_state(tmp_path, keep=2)
    for step in (6, 8):
        checkpoint.save_state(tmp_path, progress=checkpoint.Progress(step, 0, step), **kwargs)
    seven = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(7, 0, 7), **kwargs)
    assert [p.name for p in checkpoint.list_states(tmp_path)] == ["state-00000006", "state-00000007"]
    assert checkpoint.resolve_resume("latest", tmp_path) == seven
    first = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(1, 0, 1), **kwargs)  # a new run in the folder
    assert checkpoint.list_states(tmp_path) == [first]
    # set aside, not deleted: the abandoned run's states still resume when named
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state-00000001", "state-00000006.abandoned", "state-00000007.abandoned", "state-00000008.abandoned"]
    assert checkpoint.load_state(tmp_path / "state-00000008.abandoned", config, "x").progress.step == 8
    checkpoint.save_state(tmp_path, progress=checkpoint.Progress(8, 0, 8), **kwargs)
    checkpoint.save_state(tmp_path, progress=checkpoint.Progress(2, 0, 2), **kwargs)
    assert (tmp_path / "state-00000008.abandoned-2").is_dir()


def test_a_new_run_sets_aside_every_state_an_earlier_run_left_in_its_folder(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """Only the states after a run's first state were set aside: a new run in a folder with an earlier run's states
    2 and 4, saving its first state at step 4, replaced that run's state 4 and its --keep-states 1 deleted state 2,
    both without a word, though --output-name differed."""
    out = tmp_path / "o"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--save-state-every", "2", "--output-name", "first")) == 0
    earlier = {p.name: (p / "progress.json").read_text() for p in checkpoint.list_states(out)}
    assert sorted(earlier) == ["state-00000002", "state-00000004"]
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--save-state-every", "4", "--keep-states", "1",
                     "--output-name", "second")) == 0
    assert "moved state-00000002, state-00000004 aside to state-00000002.abandoned, state-00000004.abandoned" in capsys.readouterr().out
    for name, progress in earlier.items():
        assert (out / f"{name}.abandoned" / "progress.json").read_text() == progress
    assert [p.name for p in checkpoint.list_states(out)] == ["state-00000004"]
    assert json.loads((out / "state-00000004" / "progress.json").read_text()) != json.loads(earlier["state-00000004"])


def test_failed_state_save_keeps_the_previous_state(tmp_path, monkeypatch):
    config, kwargs = small_state(tmp_path, keep=1)
    first = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(1, 0, 1), **kwargs)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError):
        checkpoint.save_state(tmp_path, progress=checkpoint.Progress(2, 0, 2), **kwargs)
    assert checkpoint.list_states(tmp_path) == [first]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-00000001"]  # no temporary folder left


def test_a_failed_resave_of_the_same_step_keeps_the_state_there(tmp_path, monkeypatch):
    config, kwargs = small_state(tmp_path, keep=2)
    saved = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3, nan_steps=1), **kwargs)
    checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3, nan_steps=2), **kwargs)  # an interrupt at step 3
    assert checkpoint.load_state(saved, config, "x").progress.nan_steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-00000003"]
    replace = os.replace

    def fails_into_place(src, dst):
        if Path(dst) == saved:
            raise OSError(5, "Input/output error")
        return replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", fails_into_place)
    with pytest.raises(OSError):
        checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3, nan_steps=3), **kwargs)
    assert checkpoint.load_state(saved, config, "x").progress.nan_steps == 2  # the earlier save, in its place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-00000003"]


def killed_mid_swap(folder: Path, step: int) -> Path:
    """Leave `folder` as a run killed between `_swap_in`'s two renames while re-saving state `step` does: the saved
    state only as `.state-N.replaced`, the new one a hidden temporary. Returns the temporary."""
    state = folder / checkpoint.state_dir_name(step)
    state.rename(folder / f".{state.name}.replaced")
    temporary = folder / f".{state.name}.k2j4h6g8.tmp"
    temporary.mkdir()
    (temporary / "lora_params.safetensors").write_bytes(b"half")
    return temporary


def test_a_state_a_killed_resave_left_aside_is_put_back(tmp_path):
    """kill -9 between _swap_in's renames left state 3 only as .state-00000003.replaced, which list_states and
    --resume latest pass over (and the new copy as a temporary the next run deletes): the run's last state was lost."""
    config, kwargs = small_state(tmp_path, keep=2)
    checkpoint.save_state(tmp_path, progress=checkpoint.Progress(1, 0, 1), **kwargs)
    saved = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3, nan_steps=1), **kwargs)
    temporary = killed_mid_swap(tmp_path, 3)
    line = checkpoint.finish_swaps(tmp_path)
    assert line == (f"finished what a run killed while re-saving a training state left in {tmp_path}: put back state-00000003 "
                    "from .state-00000003.replaced (the newer save never finished)")
    assert checkpoint.resolve_resume("latest", tmp_path) == saved
    assert checkpoint.load_state(saved, config, "x").progress.nan_steps == 1  # the earlier save's content
    assert temporary.is_dir()  # remove_abandoned_saves' to delete
    assert checkpoint.finish_swaps(tmp_path) is None


def test_the_old_copy_a_killed_resave_left_is_deleted(tmp_path):
    """Killed after the swap but before the old copy's delete: the new state is in place, the old one only wastes space."""
    config, kwargs = small_state(tmp_path, keep=2)
    saved = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3, nan_steps=1), **kwargs)
    (tmp_path / ".state-00000003.replaced").mkdir()
    (tmp_path / ".state-00000003.replaced" / "progress.json").write_text("{}")
    (tmp_path / ".state-00000007.replaced.bak").mkdir()  # not our name: left alone
    assert checkpoint.finish_swaps(tmp_path) == (f"finished what a run killed while re-saving a training state left in {tmp_path}: "
                                                 "deleted .state-00000003.replaced, the older copy of a state saved again")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state-00000007.replaced.bak", "state-00000003"]
    assert checkpoint.load_state(saved, config, "x").progress.nan_steps == 1


def test_a_state_another_live_run_is_saving_is_left_alone(tmp_path):
    """Another run saving into the same folder, between its two renames, holds its temporary's lock."""
    config, kwargs = small_state(tmp_path, keep=2)
    checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3), **kwargs)
    (tmp_path / "state-00000003").rename(tmp_path / ".state-00000003.replaced")
    with fsio.temporary_beside(tmp_path / "state-00000003", folder=True):
        assert checkpoint.finish_swaps(tmp_path) is None
        assert not (tmp_path / "state-00000003").exists()
    assert checkpoint.finish_swaps(tmp_path) is not None and (tmp_path / "state-00000003").is_dir()


@pytest.mark.slow
def test_resume_latest_finds_the_state_a_killed_resave_left_aside(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    """The real CLI puts the state back before it deletes the half-written temporary and resumes from it."""
    out = tmp_path / "o"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "2", "--save-state-every", "2")) == 0
    temporary = killed_mid_swap(out, 2)
    os.utime(temporary, (1_000_000_000, 1_000_000_000))
    os.utime(temporary / "lora_params.safetensors", (1_000_000_000, 1_000_000_000))
    capsys.readouterr()
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "3", "--resume", "latest")) == 0
    printed = capsys.readouterr().out
    assert "put back state-00000002 from .state-00000002.replaced" in printed
    assert "resuming from" in printed and "at step 2 " in printed
    assert not temporary.exists() and not (out / ".state-00000002.replaced").exists()


@pytest.mark.slow
def test_failed_lora_save_says_why_and_keeps_earlier_files(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "1", "--output-name", "x")) == 0
    before = (out / "x.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "export_lora", disk_full)
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "1", "--output-name", "x")) == 2
    err = capsys.readouterr().err
    assert "could not save" in err and "No space left on device" in err and "Traceback" not in err
    assert (out / "x.safetensors").read_bytes() == before


@pytest.mark.slow
def test_failed_final_save_keeps_the_weights_and_resume_writes_the_file(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A run that trained to the end but could not write its file (disk full, permissions) used to lose the
    weights; they now go to a training state, from which --resume latest writes the very same file."""
    assert main(args(tiny_dataset, tiny_model_dir, tmp_path / "a", "--max-steps", "2", "--output-name", "x")) == 0
    out, export = tmp_path / "b", outputs.export_lora

    def final_file_fails(path, *a, **k):
        if path.name == "x.safetensors":
            raise OSError(13, "Permission denied")
        return export(path, *a, **k)

    monkeypatch.setattr(outputs, "export_lora", final_file_fails)
    closed, close = [], outputs.RunOutputs.close
    monkeypatch.setattr(outputs.RunOutputs, "close", lambda self: (closed.append(True), close(self)))
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "2", "--output-name", "x")) == 2
    assert closed  # metrics.jsonl and the TensorBoard writer are closed on this path too
    err = capsys.readouterr().err
    state = out / "state-00000002"
    assert f"could not save {out / 'x.safetensors'}: Permission denied. The weights are kept in the training state {state}" in err
    assert not (out / "x.safetensors").exists() and (state / "lora_params.safetensors").is_file()
    monkeypatch.setattr(outputs, "export_lora", export)
    assert main(["--config", str(out / "config.toml"), "--resume", "latest"]) == 0
    assert_same_lora(tmp_path / "a" / "x.safetensors", out / "x.safetensors")
    # Finished and written: resuming again has nothing to do and says so.
    assert main(["--config", str(out / "config.toml"), "--resume", "latest"]) == 2
    assert "the run already has 2 steps" in capsys.readouterr().err


def test_a_folder_named_like_the_lora_file_is_refused_before_training(tiny_dataset, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "o" / "x.safetensors").mkdir(parents=True)
    assert main(args(tiny_dataset, tiny_model_dir, tmp_path / "o", "--max-steps", "1", "--output-name", "x")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'o' / 'x.safetensors'} is a folder, but the trained LoRA is saved under that name" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.slow
def test_validation_loss_is_deterministic_and_best_step_recorded(tiny_dataset, tiny_model_dir, tmp_path):
    result = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "v", "--max-steps", "4",
                                  "--validation-split", "0.3", "--validate-every", "2")))
    records = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [s for s, _ in val] == [2, 4]
    # Same weights, same noise and timesteps: the same number again.
    from sd_lora.validation import validation_loss

    o = result.outputs
    assert validation_loss(o.trainee, o.objective, o.validation_items, batch_size=2) == val[-1][1]
    best_step, best = min(val, key=lambda sv: sv[1])[0], min(v for _, v in val)
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_validation_best_step"] == str(best_step) and float(meta["ss_validation_loss_best"]) == best
    # kohya's validation keys (they were not written): the held-out images, the split and the steps between losses
    held = len(result.outputs.validation_items)
    assert (meta["ss_num_validation_images"], meta["ss_validation_split"], meta["ss_validate_every_n_steps"]) == (str(held), "0.3", "2")
    assert held and int(meta["ss_num_train_images"]) // 2 + held == 6  # tiny_dataset: 6 images, 2 repeats


def test_validation_split_is_seeded_and_never_empty():
    from sd_lora.validation import split_records

    records = list(range(10))
    train, held = split_records(records, 0.25, seed=1)
    assert len(held) == 3 and sorted(train + held) == records
    assert split_records(records, 0.25, seed=1) == (train, held)
    assert split_records(records, 0.25, seed=2) != (train, held)
    with pytest.raises(UserError, match="--validation-split 0.5 holds images out of the training set, which has 1"):
        split_records([1], 0.5, seed=0)  # (it trained without validation, silently)


def test_too_little_disk_space_is_refused_before_training(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))  # 1 MiB free
    assert main(args(tiny_dataset, tiny_model_dir, tmp_path / "o", "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "only 1 MiB free" in err and "free some space" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_the_free_space_check_counts_the_states_the_optimizer_writes(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, optimizer):
    """The check reserved 12 bytes a LoRA value per kept state (fp32 weights and AdamW's two moments); Prodigy's
    states hold four tensors a value, and a disk the check passed could fill up at the second state."""
    needed = []
    monkeypatch.setattr(train_module, "check_free_space", lambda path, n: needed.append(n))
    lr = ["--learning-rate", "1.0"] if optimizer == "prodigy" else []
    result = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "o", "--max-steps", "2", "--optimizer", optimizer,
                                  "--save-state-every", "1", *lr)))
    state = tmp_path / "o" / "state-00000002"
    training = torch.load(state / "training_state.pt", weights_only=True)
    written = sum(t.numel() * t.element_size() for t in load_file(str(state / "lora_params.safetensors")).values())
    written += sum(t.numel() * t.element_size() for s in training["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t))
    n_params = sum(t.numel() for t in load_file(str(result.path)).values() if t.dim() > 0)  # (without the alpha scalars)
    states_allowance = needed[0] - 64 * 2**20 - 4 * 4 * n_params  # less the margin and four fp32 LoRA files
    assert states_allowance >= result.config.keep_states * written, (states_allowance, written)


@pytest.mark.slow
def test_nan_loss_stops_with_last_good_weights_and_causes(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from sd_lora import diffusion

    real_loss, calls = diffusion.diffusion_loss, {"n": 0, "last_bad": None}

    def poisoned(prediction, target, weights=None):
        calls["n"] += 1
        loss = real_loss(prediction, target, weights)
        # Call 1 is the memory check's trial step; micro-batches 5+ (calls 6+, steps 3+) diverge, up to last_bad.
        bad = calls["n"] > 5 and (calls["last_bad"] is None or calls["n"] <= calls["last_bad"])
        return loss * float("nan") if bad else loss

    monkeypatch.setattr(diffusion, "diffusion_loss", poisoned)
    out = tmp_path / "o"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "training stopped at step 3" in err and "learning rate" in err and "--nan-skip" in err
    assert (out / "data-step00000002-last-good.safetensors").is_file()
    calls["n"] = 0
    assert main(args(tiny_dataset, tiny_model_dir, tmp_path / "skip", "--max-steps", "6", "--nan-skip", "1")) == 2
    assert "training stopped at step 3" in capsys.readouterr().err  # one skipped, the second bad step stops
    calls.update(n=0, last_bad=7)  # only step 3 is bad: skipped, the run finishes and says so
    assert main(args(tiny_dataset, tiny_model_dir, tmp_path / "once", "--max-steps", "6", "--nan-skip", "1")) == 0
    printed, err = capsys.readouterr()
    assert "warning: step 3 skipped" in printed and "warning: 1 step was skipped for a non-finite loss or gradient (--nan-skip 1)" in err


@pytest.mark.slow
def test_resuming_an_earlier_state_drops_the_later_metrics(tiny_dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "m"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--save-state-every", "2", "--keep-states", "2")) == 0
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "lo')  # a line a crash cut short
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--resume", str(out / "state-00000002"))) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # not 1, 2, 3, 4, 3, 4


@pytest.mark.slow
def test_worker_processes_load_the_same_batches_and_start_once(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """--num-workers 2 trains bit-identically to loading in the training process (flips, tag shuffling and
    caption dropout are drawn from the sampler's seeds, not the worker's), and its workers start once, not
    once per epoch: 7 steps are three epochs here."""
    in_process = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "a", "--max-steps", "7")))
    starts = []
    multiprocess_iter = torch.utils.data.dataloader._MultiProcessingDataLoaderIter
    original_init = multiprocess_iter.__init__

    def counting_init(self, loader):
        starts.append(loader)
        original_init(self, loader)

    monkeypatch.setattr(multiprocess_iter, "__init__", counting_init)
    workers = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "b", "--max-steps", "7", "--num-workers", "2")))
    assert workers.state.epoch == 2 and len(starts) == 1
    assert psutil.Process().children() == []  # ended with the run, although the result keeps the loader
    assert_same_lora(in_process.path, workers.path)


@pytest.mark.slow
def test_the_memory_check_leaves_the_run_as_it_was(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """The trial step at the largest bucket draws dropout masks, noise and timesteps and fills gradients; the
    run that follows must not see any of it (dropout, flips, tag shuffling and text-encoder LoRA are on)."""
    from sd_lora import train as train_module

    checked = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "a", "--max-steps", "3")))
    monkeypatch.setattr(train_module, "check_step_memory", lambda *a, **kw: "no check")
    unchecked = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "b", "--max-steps", "3")))
    assert_same_lora(checked.path, unchecked.path)


@pytest.mark.slow
def test_a_run_that_cannot_fit_fails_at_the_memory_check_before_sampling(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from sd_lora import loop

    def out_of_memory(*a, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 21474836480 bytes")

    monkeypatch.setattr(loop, "compute_loss", out_of_memory)
    out = tmp_path / "o"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--sample-every", "2")) == 2
    err = capsys.readouterr().err
    assert "out of cpu memory in step 1" in err and "Nothing had been trained yet" in err and "To fit, change" in err
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())  # failed before the base grid


@pytest.mark.slow
def test_loading_a_batch_ahead_trains_the_same_lora(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """Without the latent cache the next batch is loaded in a thread while a step runs; the run must be
    the one the training thread alone would give (five steps of two micro-batches cross an epoch boundary)."""
    from sd_lora import train as train_module

    no_cache = ("--no-cache-latents", "--max-steps", "5")
    ahead = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "a", *no_cache)))
    monkeypatch.setattr(train_module, "Prefetch", lambda loader: loader)
    inline = run(load_config(args(tiny_dataset, tiny_model_dir, tmp_path / "b", *no_cache)))
    assert_same_lora(ahead.path, inline.path)


def rank_states(seed: int, generator_seed: int = 7) -> dict:
    """One process's `rng_states` after its global RNGs were seeded with `seed` (the training generator alike)."""
    checkpoint.seed_process(seed, rank=1)
    return checkpoint.rng_states(torch.Generator().manual_seed(generator_seed))


def test_seed_process_leaves_rank_0_alone_and_gives_every_other_rank_its_own_stream():
    """Rank 0 keeps the stream one process has (a single-process run is unchanged); ranks 1 and 2 get streams
    of their own, the same ones in every run, and a resumed rank's reseeding (another step) differs again."""
    torch.manual_seed(42)
    before = torch.get_rng_state()
    checkpoint.seed_process(42, rank=0)
    assert torch.equal(torch.get_rng_state(), before)

    def draw(rank, step=0):
        torch.manual_seed(42)
        checkpoint.seed_process(42, rank, step)
        return torch.rand(64)

    rank_0, rank_1, rank_2 = draw(0), draw(1), draw(2)
    assert not torch.equal(rank_0, rank_1) and not torch.equal(rank_1, rank_2) and not torch.equal(rank_0, rank_2)
    assert torch.equal(draw(1), rank_1)
    assert not torch.equal(draw(1, step=5), rank_1)
    assert checkpoint.process_seed(42, 1, 0) != checkpoint.process_seed(43, 0, 0)  # seed + rank would collide


def test_every_rank_resumes_its_own_random_states(tmp_path):
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    config = load_config(["--data", str(tmp_path)])
    sets = [rank_states(100), rank_states(200)]  # two ranks: different global streams, the same generator
    path = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3), modules={"unet": module}, optimizer=optimizer,
                                 lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), rng=sets,
                                 config=config, data_fingerprint="x", keep=1)
    loaded = checkpoint.load_state(path, config, "x")
    assert checkpoint.saved_processes(loaded.training) == 2 and checkpoint.rng_note(loaded, 2) is None
    for rank in (0, 1):
        torch.manual_seed(0)
        generator = torch.Generator()
        assert checkpoint.restore_rng_states(loaded.training["rng"], generator, rank=rank, seed=42, step=3)
        assert torch.equal(torch.get_rng_state(), sets[rank]["torch"])
        assert torch.equal(generator.get_state(), sets[rank]["generator"])


def test_a_state_saved_on_another_device_resumes_with_a_reseeded_generator(monkeypatch):
    """A GPU run's state holds a CUDA training generator (16 bytes) and one CUDA state per visible GPU: resumed on the
    CPU, set_state ended the run in a RuntimeError; resumed with fewer GPUs visible, set_rng_state_all did."""
    saved = rank_states(100)
    saved["generator"] = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)  # CUDA: seed, offset
    saved["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # two GPUs were visible
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((device, state)))
    generator = torch.Generator()
    assert not checkpoint.restore_rng_states([saved], generator, rank=0, seed=42, step=3)  # no longer exact
    assert torch.equal(torch.get_rng_state(), saved["torch"])  # what this machine can take is restored
    assert [(device, state.sum().item()) for device, state in restored] == [(0, 0)]
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(checkpoint.process_seed(42, 0, 3)).get_state())


def test_a_state_with_one_set_of_random_states_still_resumes_on_several_ranks(tmp_path):
    """A state folder from before per-rank states ("rng" one dict), or saved by one process: every rank takes
    its training generator (the same on all ranks) and rank 0 its global RNGs; the others reseed their global
    RNGs from (seed, rank, step), so their dropout masks still differ from rank 0's."""
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    config = load_config(["--data", str(tmp_path)])
    saved = rank_states(100)
    path = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3), modules={"unet": module}, optimizer=optimizer,
                                 lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), rng=[saved],
                                 config=config, data_fingerprint="x", keep=1)
    old = torch.load(path / "training_state.pt", weights_only=True)
    old["rng"] = old["rng"][0]  # the layout written before states were kept per rank
    torch.save(old, path / "training_state.pt")
    loaded = checkpoint.load_state(path, config, "x")
    assert checkpoint.saved_processes(loaded.training) == 1 and checkpoint.rng_note(loaded, 1) is None
    assert checkpoint.rng_note(loaded, 2) == (f"{path} holds the random states of 1 process and this run has 2: the other ranks "
                                              "draw new dropout masks from here, so the run will not match an uninterrupted one exactly")

    generator = torch.Generator()
    assert checkpoint.restore_rng_states(loaded.training["rng"], generator, rank=0, seed=42, step=3)
    assert torch.equal(torch.get_rng_state(), saved["torch"]) and torch.equal(generator.get_state(), saved["generator"])
    rank_0_draw = torch.rand(64)

    generator = torch.Generator()
    assert not checkpoint.restore_rng_states(loaded.training["rng"], generator, rank=1, seed=42, step=3)
    assert torch.equal(generator.get_state(), saved["generator"])  # noise and timesteps stay in step with rank 0
    rank_1_draw = torch.rand(64)
    torch.manual_seed(checkpoint.process_seed(42, 1, 3))
    assert torch.equal(rank_1_draw, torch.rand(64)) and not torch.equal(rank_1_draw, rank_0_draw)


def test_the_resume_command_quotes_a_folder_with_spaces(tmp_path):
    """Printed after Ctrl-C to be pasted into a shell: unquoted, 'my runs/out' split into two arguments."""
    import shlex

    out = tmp_path / "my runs" / "zk's out"
    command = checkpoint.resume_command(out)
    assert shlex.split(command) == ["python", "-m", "sd_lora.train", "--config", str(out / "config.toml"), "--resume", "latest"]
    assert checkpoint.resume_command(tmp_path / "plain") == f"python -m sd_lora.train --config {tmp_path / 'plain' / 'config.toml'} --resume latest"


def test_a_state_resumes_only_with_the_number_of_processes_that_trained_it(tmp_path):
    """The saved position in the epoch counts global batches (--batch-size x processes): a 2-process state resumed
    by one process (the printed resume command used to start one) went on at the wrong place in the data."""
    import shlex

    config, kwargs = small_state(tmp_path, keep=3)
    two = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(3, 0, 3, processes=2), **kwargs)
    assert checkpoint.load_state(two, config, "x", processes=2).progress.processes == 2
    with pytest.raises(UserError) as refused:
        checkpoint.load_state(two, config, "x", processes=1)
    message = str(refused.value)
    assert "processes: 2 in the saved run, 1 now" in message
    assert shlex.split(message.split("resume with 2: ")[1].splitlines()[0]) == [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "sd_lora.train", "--config",
        str(tmp_path / "config.toml"), "--resume", "latest"]
    older = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(4, 0, 4), **kwargs)  # from before the count was kept
    assert checkpoint.load_state(older, config, "x", processes=2).progress.processes is None


def test_a_run_records_its_number_of_processes_in_its_states(tiny_dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    assert main(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "2", "--save-state-every", "2")) == 0
    state = checkpoint.resolve_resume("latest", out)
    assert json.loads((state / "progress.json").read_text())["progress"]["processes"] == 1
    with pytest.raises(UserError, match="processes: 1 in the saved run, 2 now"):
        checkpoint.load_state(state, load_config(args(tiny_dataset, tiny_model_dir, out, "--max-steps", "2")),
                              json.loads((state / "progress.json").read_text())["data_fingerprint"], processes=2)


def test_extending_a_finished_run_draws_the_epoch_grid_its_end_left_to_the_final_grid(tiny_dataset, tiny_model_dir, tmp_path):
    # As the epoch file above: the last epoch's grid is the end's <name>-stepN.png. Extended to 3 epochs, the run
    # wrote x-000002.safetensors but never x-000002.png, so that epoch's file had no grid.
    out = tmp_path / "x"
    common = ["--sample-every", "0", "--sample-every-epochs", "1", "--sample-steps", "1", "--sample-seeds", "1",
              "--save-state-every", "100", "--output-name", "x"]
    assert main(args(tiny_dataset, tiny_model_dir, out, "--epochs", "2", *common)) == 0
    epochs = lambda: sorted(p.name for p in (out / "samples").glob("x-0*.png"))  # noqa: E731
    assert epochs() == ["x-000001.png"]
    end_of_2 = next(p for p in (out / "samples").glob("x-step*.png") if p.name != "x-step00000000.png")
    assert main(args(tiny_dataset, tiny_model_dir, out, "--epochs", "3", *common, "--resume", "latest")) == 0
    assert epochs() == ["x-000001.png", "x-000002.png"]
    with Image.open(out / "samples" / "x-000002.png") as grid, Image.open(end_of_2) as end:
        assert json.loads(grid.text["sd_lora"])["epoch"] == 2
        assert json.loads(grid.text["sd_lora"])["step"] == json.loads(end.text["sd_lora"])["step"]


def test_resume_expands_a_home_folder_the_shell_left_alone(tmp_path, monkeypatch):
    """`--resume=~/run/state-N` and a TOML `resume = "~/..."` reach the trainer with the ~ unexpanded: the option
    check called the folder missing and the state was never found."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    config, kwargs = small_state(tmp_path / "run", keep=0)
    state = checkpoint.save_state(tmp_path / "run", progress=checkpoint.Progress(3, 0, 3), **kwargs)
    given = "~/run/" + state.name
    assert load_config(["--data", str(tmp_path), f"--resume={given}"]).resume == given
    assert checkpoint.resolve_resume(given, tmp_path / "run") == state


def test_a_state_folder_has_the_umask_permissions_not_mkdtemps_0700(tmp_path):
    """Other users of a shared machine could read the LoRA files (umask) but not the state folders beside them."""
    import stat

    config, kwargs = small_state(tmp_path, keep=0)
    old = os.umask(0o022)
    try:
        state = checkpoint.save_state(tmp_path, progress=checkpoint.Progress(2, 0, 2), **kwargs)
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in state.iterdir()} == {0o644}
