"""--log-with tensorboard: tags, run folders and the checks of the logging options."""

from __future__ import annotations

import time

import pytest

from sd_lora import tensorboard_log
from sd_lora.config import load_config
from sd_lora.errors import ConfigError
from sd_lora.options import TrainConfig


def test_scalars_use_kohyas_tags_and_leave_out_what_is_not_a_number():
    record = {"step": 7, "epoch": 2, "loss": 0.25, "loss_average": 0.3, "lr": 1e-4, "lr_text_encoder": 5e-5, "grad_norm": 1.5,
              "elapsed": 12.0, "rss_mb": 900.5}
    assert tensorboard_log.scalars(record) == {
        "loss/current": 0.25, "loss/average": 0.3, "lr/unet": 1e-4, "lr/textencoder": 5e-5, "grad_norm": 1.5, "epoch": 2.0,
        "memory/rss_mb": 900.5,
    }
    assert tensorboard_log.scalars({"step": 3, "val_loss": 0.125, "rss_mb": 1.0}) == {"loss/validation": 0.125, "memory/rss_mb": 1.0}
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
    (["--log-with", "wandb"], "--log-with 'wandb' is not supported"),
])
def test_logging_options_are_checked_with_the_others(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--data", str(tmp_path), "--model", "some/model"] + args)
