"""The default run: no --model means the demo base and the demo's options, and the user's flags still win."""

from pathlib import Path

import pytest

from sd_lora.config import load_config
from sd_lora.demo import BASE_MODEL_DIR
from sd_lora.demo.defaults import DEFAULT_OPTIONS, default_arguments, demo_options
from sd_lora.errors import UserError
from sd_lora.demo.defaults import announce_demo, is_demo_base


def test_without_model_the_demo_base_and_its_options_apply(tmp_path):
    config = load_config(["--data", str(tmp_path)])
    assert Path(config.model) == BASE_MODEL_DIR
    for name, value in DEFAULT_OPTIONS.items():
        assert getattr(config, name) == value, name
    assert is_demo_base(config.model)


def test_user_flags_and_config_files_win_over_the_demo_options(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("rank = 2\n", encoding="utf-8")
    config = load_config(["--data", str(tmp_path), "--config", str(toml), "--resolution", "32", "--epochs", "3"])
    assert Path(config.model) == BASE_MODEL_DIR
    assert (config.rank, config.resolution, config.epochs, config.max_steps) == (2, 32, 3, None)
    assert config.learning_rate == DEFAULT_OPTIONS["learning_rate"]


def test_a_shorter_run_gets_a_shorter_warm_up(tmp_path):
    config = load_config(["--data", str(tmp_path), "--max-steps", "50"])
    assert (config.max_steps, config.lr_warmup_steps) == (50, 5)
    assert demo_options({"max_steps": 50, "lr_warmup_steps": 7}).get("lr_warmup_steps") is None


def test_problems_are_about_what_the_user_set_not_the_demo(tmp_path):
    """Found by an audit: turning tag dropout off was refused over the demo's own --keep-tokens 1, Prodigy over
    the demo's learning rate, and --max-steps -3 also over the warm-up the demo derived from it."""
    config = load_config(["--data", str(tmp_path), "--tag-dropout", "0"])
    assert (config.tag_dropout, config.keep_tokens) == (0.0, 0)
    assert load_config(["--data", str(tmp_path), "--tag-dropout", "0", "--shuffle-tags"]).keep_tokens == 1
    config = load_config(["--data", str(tmp_path), "--optimizer", "prodigy", "--learning-rate", "1"])
    assert config.learning_rate == 1.0
    assert load_config(["--data", str(tmp_path), "--optimizer", "prodigy"]).learning_rate == 1.0  # Prodigy's own default
    assert demo_options({"optimizer": "adamw8bit"})["learning_rate"] == DEFAULT_OPTIONS["learning_rate"]
    with pytest.raises(UserError) as caught:
        load_config(["--data", str(tmp_path), "--max-steps", "-3"])
    assert "--max-steps -3" in str(caught.value) and "--lr-warmup-steps" not in str(caught.value)


def test_a_constant_schedule_gets_no_warm_up(tmp_path):
    config = load_config(["--data", str(tmp_path), "--lr-scheduler", "constant"])  # not refused for the demo's warm-up
    assert (config.lr_scheduler, config.lr_warmup_steps) == ("constant", 0)
    config = load_config(["--data", str(tmp_path), "--lr-scheduler", "constant_with_warmup", "--max-steps", "50"])
    assert config.lr_warmup_steps == 5


def test_with_a_model_nothing_of_the_demo_applies(tmp_path):
    config = load_config(["--data", str(tmp_path), "--model", "some/model"])
    assert config.model == "some/model" and config.resolution is None and config.max_steps is None
    assert not is_demo_base(config.model)


def test_default_arguments_spell_out_the_same_run(tmp_path):
    implicit = load_config(["--data", str(tmp_path)])
    explicit = load_config(default_arguments() + ["--data", str(tmp_path)])
    assert implicit == explicit


def test_the_demo_base_model_ships_with_the_package():
    assert (BASE_MODEL_DIR / "model_index.json").is_file()
    size = sum(p.stat().st_size for p in BASE_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB: the issue allows 25 MB"


def test_a_missing_demo_base_is_a_clear_error(tmp_path, monkeypatch):
    import sd_lora.demo.defaults as defaults

    monkeypatch.setattr(defaults, "BASE_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(UserError, match="demo base model is missing"):
        announce_demo(load_config(["--data", str(tmp_path)]))
