"""--log-with tensorboard: tags, run folders, the missing-package error, and real runs read back with
TensorBoard's own reader against metrics.jsonl."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from test_train import train_args

from sd_lora import outputs, tensorboard_log
from sd_lora.config import load_config
from sd_lora.errors import ConfigError, Interrupted, UserError
from sd_lora.options import TrainConfig
from sd_lora.train import run


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    events.Reload()
    return events


def scalar_series(events, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_scalars_use_kohyas_tags_and_leave_out_what_is_not_a_number():
    record = {"step": 7, "epoch": 2, "loss": 0.25, "loss_average": 0.3, "lr": 1e-4, "lr_text_encoder": 5e-5, "grad_norm": 1.5,
              "elapsed": 12.0, "rss_mb": 900.5}
    assert tensorboard_log.scalars(record) == {
        "loss/current": 0.25, "loss/average": 0.3, "lr/unet": 1e-4, "lr/textencoder": 5e-5, "grad_norm": 1.5, "epoch": 2.0,
        "memory/rss_mb": 900.5,
    }
    assert tensorboard_log.scalars({"step": 3, "val_loss": 0.125, "rss_mb": 1.0}) == {"loss/validation": 0.125, "memory/rss_mb": 1.0}
    assert tensorboard_log.scalars({"step": 3, "lr": 1.0, "d_lr": 2e-6}) == {"lr/unet": 1.0, "lr/d*lr/unet": 2e-6}  # Prodigy's
    # a skipped step's strings and an fp16 overflow step's missing gradient norm are no points on a curve
    assert tensorboard_log.scalars({"step": 4, "skipped": True, "loss": "nan", "grad_norm": "inf", "rss_mb": 2.0}) == {"memory/rss_mb": 2.0}
    assert "grad_norm" not in tensorboard_log.scalars({"step": 5, "loss": 0.5, "grad_norm": None})


def test_run_folders_are_named_like_kohyas_and_never_shared(tmp_path):
    started = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    config = TrainConfig(output_dir=tmp_path / "out", output_name="zk", log_with="tensorboard")
    assert tensorboard_log.logging_dir(config) == tmp_path / "out" / "logs"
    assert tensorboard_log.new_run(config, started) == "zk-20260304-050607"
    (tmp_path / "out" / "logs" / "zk-20260304-050607").mkdir(parents=True)
    assert tensorboard_log.new_run(config, started) == "zk-20260304-050607-2"  # two runs started in the same second
    mine = TrainConfig(output_dir=tmp_path / "out", output_name="zk", log_with="tensorboard", logging_dir=tmp_path / "tb", log_prefix="exp1_")
    assert tensorboard_log.logging_dir(mine) == tmp_path / "tb"
    assert tensorboard_log.new_run(mine, started) == "exp1_20260304-050607"


@pytest.mark.parametrize("args, message", [
    (["--logging-dir", "logs"], "--logging-dir only applies to TensorBoard logs, which are off; add --log-with tensorboard"),
    (["--log-prefix", "a_"], "--log-prefix only applies to TensorBoard logs"),
    (["--log-with", "tensorboard", "--log-prefix", "a/b"], "--log-prefix 'a/b' must be part of a folder name"),
    # a File name too long traceback from SummaryWriter, once the model was loaded and the latents cached
    (["--log-with", "tensorboard", "--log-prefix", "p" * 238], r"--log-prefix 'p{20}'... is 238 bytes long; .* use at most 237"),
    (["--log-with", "wandb"], "--log-with 'wandb' is not supported"),
])
def test_logging_options_are_checked_with_the_others(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--data", str(tmp_path), "--model", "some/model"] + args)


def test_missing_tensorboard_is_a_user_error_before_the_model_loads(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    import sd_lora.train

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError

    def load_base_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(sd_lora.train, "load_base_model", load_base_model)
    config = load_config(train_args(tiny_dataset, tiny_model_dir, tmp_path / "out", "--max-steps", "1", "--log-with", "tensorboard"))
    with pytest.raises(UserError, match=r"--log-with tensorboard: the tensorboard package is not installed; install it with "
                                        r"pip install 'sd_lora\[tensorboard\]'"):
        run(config)


@pytest.mark.slow
def test_tensorboard_gets_every_number_of_metrics_jsonl_at_the_same_steps(tiny_dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--sample-every", "2",
                                        "--validation-split", "0.2", "--validate-every", "2", "--train-text-encoder",
                                        "--text-encoder-lr", "5e-5", "--output-name", "zk", "--log-with", "tensorboard")))
    (run_dir,) = (out / "logs").iterdir()
    assert run_dir.name.startswith("zk-") and run_dir.name == result.outputs.log_run
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    events = read_events(run_dir)
    steps = [m for m in metrics(out) if "loss" in m]
    validations = [m for m in metrics(out) if "val_loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and [m["step"] for m in validations] == [2, 4]
    for tag, key, records in [("loss/current", "loss", steps), ("loss/average", "loss_average", steps), ("lr/unet", "lr", steps),
                              ("lr/textencoder", "lr_text_encoder", steps), ("grad_norm", "grad_norm", steps),
                              ("epoch", "epoch", steps), ("loss/validation", "val_loss", validations)]:
        expected = {m["step"]: m[key] for m in records}
        assert scalar_series(events, tag) == pytest.approx(expected, rel=1e-6), tag  # TensorBoard keeps float32
    # the constant schedule's rates, the U-Net's and the text encoder's apart
    assert scalar_series(events, "lr/unet") == pytest.approx(dict.fromkeys([1, 2, 3, 4], result.config.learning_rate))
    assert scalar_series(events, "lr/textencoder") == pytest.approx(dict.fromkeys([1, 2, 3, 4], 5e-5))
    # the sample grids, at the steps of the PNGs
    grids = events.Images("samples")
    assert [g.step for g in grids] == [0, 2, 4]
    from PIL import Image

    png = Image.open(out / "samples" / "zk-step00000004.png")
    assert (grids[-1].width, grids[-1].height) == png.size


@pytest.mark.slow
def test_an_interrupted_run_resumes_into_the_same_tensorboard_run_at_the_next_step(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    out, logs = tmp_path / "out", tmp_path / "tb"
    common = ("--sample-every", "0", "--log-with", "tensorboard", "--logging-dir", str(logs), "--log-prefix", "exp_")
    original = outputs.RunOutputs.on_step_end

    def on_step_end(self, state):  # a SIGTERM arrives during step 3
        original(self, state)
        if state.step == 3:
            self.stop.signal = signal.SIGTERM

    monkeypatch.setattr(outputs.RunOutputs, "on_step_end", on_step_end)
    with pytest.raises(Interrupted):
        run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "5", *common)))
    monkeypatch.undo()
    (run_dir,) = logs.iterdir()
    assert run_dir.name.startswith("exp_")
    assert sorted(scalar_series(read_events(run_dir), "loss/current")) == [1, 2, 3]  # written and closed on the stop path

    run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "5", *common, "--resume", "latest")))
    assert list(logs.iterdir()) == [run_dir]  # the same run, a second event file
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    losses = scalar_series(read_events(run_dir), "loss/current")
    assert losses == pytest.approx({m["step"]: m["loss"] for m in metrics(out)}, rel=1e-6)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    # Back to the state at step 3, for a shorter run: like metrics.jsonl's lines, steps 4 and 5 of the earlier files go.
    run(load_config(train_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", *common, "--resume", str(out / "state-00000003"))))
    assert list(logs.iterdir()) == [run_dir] and len(list(run_dir.glob("events.out.tfevents.*"))) == 3
    losses = scalar_series(read_events(run_dir), "loss/current")
    assert sorted(losses) == [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
