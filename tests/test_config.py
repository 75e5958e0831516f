"""Options: CLI and TOML parsing from one declaration, validation reporting every problem at once."""

import dataclasses
import os

import pytest

from sd_lora.config import FIELDS, build_parser, load_config, read_toml
from sd_lora.errors import ConfigError, UserError

REQUIRED_FLAGS = """data model output-dir output-name config resolution batch-size max-steps epochs learning-rate
text-encoder-lr lr-scheduler lr-warmup-steps rank alpha lora-dropout targets train-text-encoder seed mixed-precision
gradient-checkpointing gradient-accumulation-steps max-grad-norm optimizer min-snr-gamma noise-offset prediction-type
caption-extension shuffle-tags keep-tokens caption-dropout flip no-buckets cache-latents sample-every sample-prompts
save-every save-precision xformers random-crop no-upscale skip-bad-images""".split()


def test_every_issue_flag_exists():
    help_text = build_parser().format_help()
    for flag in REQUIRED_FLAGS:
        assert f"--{flag}" in help_text, flag


def test_cli_values_are_typed(tmp_path):
    c = load_config(["--data", str(tmp_path), "--rank", "8", "--learning-rate", "3e-4", "--flip", "--no-buckets"])
    assert c.rank == 8 and isinstance(c.rank, int)
    assert c.learning_rate == pytest.approx(3e-4)
    assert c.flip is True and c.buckets is False
    assert c.effective_alpha == 8.0  # alpha defaults to rank (scale 1)


def test_lora_shape_options_default_to_unset_until_the_model_or_file_decides(tmp_path):
    """None means "not set": the run fills the default rank and no text encoder, or takes them from an
    --init-weights file, which an option the user set may not contradict."""
    c = load_config(["--data", str(tmp_path), "--model", str(tmp_path)])
    assert (c.rank, c.alpha, c.train_text_encoder) == (None, None, None)
    with pytest.raises(ConfigError, match="--text-encoder-lr is set but the text encoder is not trained"):
        load_config(["--data", str(tmp_path), "--model", str(tmp_path), "--text-encoder-lr", "1e-5"])
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")  # its modules are read at run time; the option only has to name a file
    c = load_config(["--data", str(tmp_path), "--model", str(tmp_path), "--text-encoder-lr", "1e-5", "--init-weights", str(lora)])
    assert c.train_text_encoder is None  # the file may have text-encoder modules
    demo = load_config(["--data", str(tmp_path), "--init-weights", str(lora)])
    assert (demo.rank, demo.train_text_encoder) == (None, None)  # the demo's rank 16 and text encoder yield to the file
    assert load_config(["--data", str(tmp_path)]).rank == 16


def test_toml_then_cli_override(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{tmp_path}"\nrank = 4\nlearning_rate = 5e-4\nshuffle-tags = true\nmax-steps = 50\n')
    c = load_config(["--config", str(cfg), "--rank", "32"])
    assert (c.rank, c.learning_rate, c.shuffle_tags, c.max_steps) == (32, 5e-4, True, 50)
    # --epochs on the command line replaces the file's --max-steps instead of conflicting with it
    c = load_config(["--config", str(cfg), "--epochs", "3"])
    assert (c.epochs, c.max_steps) == (3, None)


def test_run_length_help_says_what_the_code_does(tmp_path):
    for name, other in [("max_steps", "--epochs"), ("epochs", "--max-steps")]:
        assert f"Set this or {other}, not both; on the command line it replaces the --config file's {other}." in (
            FIELDS[name].metadata["help"]
        )
    cfg = tmp_path / "both.toml"
    cfg.write_text(f'data = "{tmp_path}"\nmodel = "some/model"\nmax-steps = 5\nepochs = 2\n')
    for args in (["--config", str(cfg)], ["--data", str(tmp_path), "--max-steps", "5", "--epochs", "2"]):
        with pytest.raises(ConfigError, match="--max-steps 5 and --epochs 2 are both set; set only one of them"):
            load_config(args)
    cfg.write_text(f'data = "{tmp_path}"\nmodel = "some/model"\nepochs = 2\n')
    c = load_config(["--config", str(cfg), "--max-steps", "7"])
    assert (c.max_steps, c.epochs) == (7, None)


def test_unknown_toml_key_is_an_error_with_suggestion(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("learning-rat = 1e-4\nfoo = 1\n")
    with pytest.raises(ConfigError) as e:
        read_toml(cfg)
    text = str(e.value)
    assert "unknown key 'learning-rat'" in text and "did you mean 'learning-rate'" in text
    assert "unknown key 'foo'" in text and len(e.value.problems) == 2


def test_a_negative_flag_as_a_toml_key_is_told_to_set_the_option_false(tmp_path):
    """`no-buckets = true` was answered "did you mean 'buckets'?", which written as it stood turned buckets on."""
    cfg = tmp_path / "neg.toml"
    cfg.write_text("no-buckets = true\nno_cache_latents = true\nno-flip = false\nno-upscale = true\n")
    with pytest.raises(ConfigError) as e:
        read_toml(cfg)
    assert e.value.problems == [
        f"{cfg}: unknown key 'no-buckets': --no-buckets is the flag's negative form; in a config file write buckets = false",
        f"{cfg}: unknown key 'no_cache_latents': --no-cache-latents is the flag's negative form; in a config file write cache-latents = false",
        f"{cfg}: unknown key 'no-flip': --no-flip is the flag's negative form; in a config file write flip = true",
    ]  # (no-upscale is an option of its own)


def test_a_config_key_in_a_config_file_is_refused_without_suggesting_model_config(tmp_path):
    cfg = tmp_path / "outer.toml"
    cfg.write_text('config = "base.toml"\n')
    with pytest.raises(ConfigError) as e:
        read_toml(cfg)
    assert e.value.problems == [f"{cfg}: config = 'base.toml': a config file cannot read another one; pass one --config file, "
                                "with the other's options copied into it"]


def test_kohyas_option_names_suggest_ours_not_difflibs_guess(tmp_path):
    """difflib's guesses changed what the option does: save_every_n_steps -> --save-every-epochs, max_train_epochs
    -> --max-steps, save_last_n_steps -> --sample-steps, train_data_dir -> 'train-text-encoder'."""
    with pytest.raises(ConfigError) as e:
        load_config(["--save_every_n_steps", "500", "--max_train_epochs=3", "--save_last_n_steps", "2", "--mixed_precision", "no"])
    assert e.value.problems == [f"unknown option {flag} ({why}did you mean {ours}?); see python -m sd_lora.train --help" for flag, why, ours in [
        ("--save_every_n_steps", "kohya's name; ", "--save-every"), ("--max_train_epochs", "kohya's name; ", "--epochs"),
        ("--save_last_n_steps", "kohya's name; ", "--keep-saves"), ("--mixed_precision", "", "--mixed-precision")]]
    cfg = tmp_path / "kohya.toml"
    cfg.write_text('train_data_dir = "x"\nnetwork_dim = 8\n')
    with pytest.raises(ConfigError) as e:
        read_toml(cfg)
    assert e.value.problems == [f"{cfg}: unknown key 'train_data_dir' (kohya's name; did you mean 'data'?)",
                                f"{cfg}: unknown key 'network_dim' (kohya's name; did you mean 'rank'?)"]


def test_diffusers_examples_option_names_suggest_ours(tmp_path):
    """The diffusers training examples' flags got difflib's guesses, which do something else (random_flip ->
    --random-crop, checkpointing_steps -> --gradient-checkpointing, validation_prompt -> --validation-split) or
    none (resume_from_checkpoint, instance_data_dir); kohya's network_train_unet_only and v_parameterization got none."""
    with pytest.raises(ConfigError) as e:
        load_config(["--random_flip", "--checkpointing_steps", "500", "--validation_prompt", "a dog", "--resume_from_checkpoint",
                     "latest", "--instance_data_dir", "d", "--network_train_unet_only", "--v_parameterization"])
    assert e.value.problems == [f"unknown option {flag} ({why}; did you mean {ours}?); see python -m sd_lora.train --help" for flag, why, ours in [
        ("--random_flip", "the diffusers examples' name", "--flip"),
        ("--checkpointing_steps", "the diffusers examples' name", "--save-state-every"),
        ("--validation_prompt", "the diffusers examples' name", "--sample-prompts"),
        ("--resume_from_checkpoint", "the diffusers examples' name", "--resume"),
        ("--instance_data_dir", "the diffusers examples' name", "--data"),
        ("--network_train_unet_only", "kohya's name", "--no-train-text-encoder"),
        ("--v_parameterization", "kohya's name", "--prediction-type")]]
    cfg = tmp_path / "kohya.toml"
    cfg.write_text("network_train_unet_only = true\ncenter_crop = true\nbucket_no_upscale = true\n")
    with pytest.raises(ConfigError) as e:
        read_toml(cfg)
    assert e.value.problems == [f"{cfg}: unknown key 'network_train_unet_only' (kohya's name; did you mean 'train-text-encoder = false'?)",
                                f"{cfg}: unknown key 'center_crop' (the diffusers examples' name; did you mean 'buckets = false'?)",
                                f"{cfg}: unknown key 'bucket_no_upscale' (kohya's name; did you mean 'no-upscale'?)"]


def test_their_options_without_an_equivalent_get_no_misleading_guess():
    """difflib named other things: ip_noise_gamma -> --min-snr-gamma, network_args -> --num-workers, dataset_name
    (a Hub dataset) -> --dataset-config, revision -> --resolution."""
    with pytest.raises(ConfigError) as e:
        load_config(["--ip_noise_gamma", "0.1", "--network_args", "conv_dim=4", "--dataset_name", "x", "--revision", "main"])
    assert e.value.problems == [f"unknown option {flag} ({whose} option; sd_lora has no equivalent); see python -m sd_lora.train --help"
                                for flag, whose in [("--ip_noise_gamma", "kohya's"), ("--network_args", "kohya's"),
                                                    ("--dataset_name", "the diffusers examples'"), ("--revision", "the diffusers examples'")]]


def test_kohyas_warmup_ratio_is_refused_saying_what_kohya_meant(tmp_path):
    """kohya reads lr_warmup_steps below 1 as a share of the run's steps; "must be a whole number" did not say why."""
    cfg = tmp_path / "kohya.toml"
    cfg.write_text("lr_warmup_steps = 0.05\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--data", str(tmp_path), "--lr-warmup-steps", "0.1", "--lr-scheduler", "cosine"])
    assert "lr-warmup-steps = '0.1' must be a whole number (kohya reads a value below 1 as a share of the run's steps" in e.value.problems[0]
    assert "give 0.1 times the run's total steps" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        load_config(["--data", str(tmp_path), "--config", str(cfg)])
    assert "lr-warmup-steps = 0.05 must be a whole number (kohya reads" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        load_config(["--data", str(tmp_path), "--lr-warmup-steps", "1.5"])
    assert e.value.problems == ["command line: lr-warmup-steps = '1.5' must be a whole number"]


def test_two_spellings_of_one_key_are_an_error_naming_both(tmp_path):
    cfg = tmp_path / "twice.toml"
    cfg.write_text("max_steps = 2\nrank = 4\nmax-steps = 3\n")
    with pytest.raises(ConfigError) as e:
        read_toml(cfg)
    assert e.value.problems == [f"{cfg}: 'max_steps' and 'max-steps' are the same option, set twice; keep one of them"]


def test_a_relative_path_from_the_config_file_says_where_it_was_set_and_looked_for(tmp_path, monkeypatch):
    """Paths in a --config file are read from the folder the command runs in (as kohya's); a user running
    from elsewhere got "file not found" for a file that is there, beside the config."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "prompts.txt").write_text("a cat\n")
    toml = tmp_path / "configs" / "run.toml"
    toml.write_text('sample-prompts = "configs/prompts.txt"\nreg-data = "/nonexistent/reg"\n')
    monkeypatch.chdir(tmp_path / "configs")
    with pytest.raises(ConfigError) as caught:
        load_config(["--config", str(toml), "--data", str(tmp_path)])
    message = str(caught.value)
    assert (f"--sample-prompts configs/prompts.txt: file not found (set in {toml}; relative paths are read from the "
            f"folder you run in, {tmp_path / 'configs'})") in message
    # An absolute path: where it was set, nothing about where relative paths are read from.
    assert f"--reg-data /nonexistent/reg: folder not found (set in {toml})" in message and message.count("relative paths") == 1
    monkeypatch.chdir(tmp_path)
    assert load_config(["--config", str(toml), "--data", str(tmp_path), "--reg-data", str(tmp_path / "configs")]).sample_prompts.is_file()


def test_invalid_toml_names_the_file(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text("rank = = 3\n")
    with pytest.raises(UserError, match="broken.toml: invalid TOML"):
        read_toml(cfg)


def test_a_config_saved_with_a_bom_is_read(tmp_path):
    """Windows editors often write a UTF-8 BOM; it was "invalid TOML (Invalid statement (at line 1, column 1))"."""
    cfg = tmp_path / "notepad.toml"
    cfg.write_bytes("\ufeffrank = 4\n".encode())
    assert read_toml(cfg) == {"rank": 4}


def test_unreadable_config_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=f"^{tmp_path}: is a folder; --config takes a TOML file"):
        load_config(["--config", str(tmp_path)])
    self_link = tmp_path / "loop.toml"
    self_link.symlink_to(self_link)  # a symlink to itself: reading it fails with ELOOP, an OSError
    with pytest.raises(UserError, match=r"loop\.toml: cannot read the config file \(Too many levels of symbolic links\)"):
        read_toml(self_link)


def test_all_problems_reported_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config([
            "--data", str(tmp_path / "missing"), "--rank", "0", "--lr-scheduler", "cosin",
            "--learning-rate", "fast", "--caption-dropout", "1.5", "--mixed-precision", "fp8",
            "--max-steps", "10", "--epochs", "2",
        ])
    problems = e.value.problems
    assert len(problems) == 7, problems
    joined = "\n".join(problems)
    assert "folder not found" in joined
    assert "--rank 0 is out of range: it must be >= 1" in joined
    assert "did you mean 'cosine'" in joined
    assert "'fast' must be a number" in joined
    assert "--caption-dropout 1.5 is out of range: it must be <= 1" in joined
    assert "fp8" in joined and "no, fp16, bf16" in joined
    assert "set only one of them" in joined


def test_toml_type_errors(tmp_path):
    cfg = tmp_path / "types.toml"
    cfg.write_text(f'data = "{tmp_path}"\nrank = "eight"\nflip = "yes"\nalpha = 0\n')
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(cfg)])
    joined = "\n".join(e.value.problems)
    assert "rank = 'eight' must be a whole number" in joined
    assert "flip = 'yes' must be true or false" in joined
    assert "--alpha 0.0 is out of range: it must be > 0" in joined


def test_a_toml_integer_too_large_for_a_float_option_is_refused_not_a_traceback(tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_text(f"noise-offset = 1{'0' * 400}\n")  # float() of it raised OverflowError
    with pytest.raises(ConfigError, match=r"big.toml: noise-offset = 10+ must be a finite number"):
        load_config(["--data", str(tmp_path), "--model", "m", "--config", str(cfg)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--keep-tokens", "1"], "only has an effect with --shuffle-tags"),
        (["--random-crop", "--cache-latents"], "cannot be combined with --random-crop"),
        (["--no-buckets", "--no-upscale"], "--no-upscale only changes how images are fitted to aspect-ratio buckets, which --no-buckets"),
        (["--text-encoder-lr", "1e-5"], "add --train-text-encoder"),
        (["--caption-extension", "txt"], "must start with a dot"),
        (["--output-name", "a/b"], "plain file name"),
        (["--output-name", "zk.safetensors"], r"--output-name 'zk.safetensors' is the name without its extension: use --output-name 'zk'"),
        (["--output-name", "zk.v2.SafeTensors"], r"use --output-name 'zk.v2' \(the LoRA becomes zk.v2.safetensors\)"),
        (["--output-name", ".."], r"--output-name '\.\.' must not start with a dot \(the LoRA file would be hidden\)"),
        (["--output-name", "."], r"--output-name '\.' must not start with a dot"),
        (["--output-name", ".zk"], r"--output-name '\.zk' must not start with a dot"),
        (["--output-name", "z" * 197], r"--output-name 'z{20}'... is 197 bytes long; .* use a name of at most 196 bytes"),
        (["--output-name", "é" * 99], r"is 198 bytes long"),  # bytes, not characters
        (["--resolution", "512", "--min-bucket-side", "768"], "larger than --resolution"),
        (["--max-steps", "5", "--lr-warmup-steps", "10"], r"--lr-warmup-steps 10 is longer than the run \(--max-steps 5\); use at most 5, or raise --max-steps"),
        (["--lr-scheduler", "constant", "--lr-warmup-steps", "2"],
         "--lr-warmup-steps 2 has no effect with --lr-scheduler constant; use constant_with_warmup"),
        (["--lr-scheduler", "cosine", "--lr-scheduler-num-cycles", "3"],
         "--lr-scheduler-num-cycles 3 only applies to --lr-scheduler cosine_with_restarts \\(got cosine\\)"),
        (["--lr-scheduler", "linear", "--lr-scheduler-power", "2"], "--lr-scheduler-power 2 only applies to --lr-scheduler polynomial"),
        (["--prior-loss-weight", "0.5"], "add --reg-data DIR"),
        (["--reg-data", "/nonexistent/reg"], "--reg-data /nonexistent/reg: folder not found"),
        (["--validate-every", "10"], "--validate-every 10 has no effect without validation images; add --validation-split 0.1 or "
                                     "--validation-data DIR, or drop --validate-every"),
    ],
)
def test_combination_checks(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):  # with a --model: no demo defaults fill the gaps
        load_config(["--data", str(tmp_path), "--model", "some/model"] + args)


def test_threads_come_from_flags_and_files_and_are_range_checked(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("threads = 3\n")
    assert load_config(["--data", str(tmp_path), "--model", "m", "--config", str(cfg)]).threads == 3
    assert load_config(["--data", str(tmp_path), "--model", "m", "--threads", "2"]).threads == 2
    assert load_config(["--data", str(tmp_path), "--model", "m"]).threads is None  # PyTorch's own choice
    with pytest.raises(ConfigError, match="--threads 0 is out of range: it must be >= 1"):
        load_config(["--data", str(tmp_path), "--model", "m", "--threads", "0"])


def test_paths_that_are_not_utf8_are_refused(tmp_path):
    data = tmp_path / os.fsdecode(b"d\xe9s")  # config.toml and the LoRA's metadata can only hold UTF-8
    data.mkdir()
    with pytest.raises(ConfigError) as caught:
        load_config(["--data", str(data), "--output-dir", str(tmp_path / os.fsdecode(b"o\xe9ut"))])
    message = str(caught.value)
    assert f"--data '{tmp_path}/d\ufffds': not valid UTF-8" in message and "rename it" in message
    assert f"--output-dir '{tmp_path}/o\ufffdut': not valid UTF-8" in message


def test_missing_data_is_reported():
    with pytest.raises(ConfigError, match="--data is required"):
        load_config([])


def test_resolved_config_round_trips_through_toml(tmp_path):
    c = load_config(["--data", str(tmp_path), "--rank", "4", "--alpha", "2", "--sample-every", "0", "--flip"])
    path = tmp_path / "config.toml"
    path.write_text(c.to_toml())
    again = load_config(["--config", str(path)])
    assert dataclasses.replace(again, config=None) == c


@pytest.mark.parametrize("name", ["sd15-character.toml", "sd15-style.toml"])
def test_shipped_example_configs_validate(tmp_path, monkeypatch, name):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # their relative paths (sample prompts) are relative to the repo root
    c = load_config(["--config", f"configs/{name}", "--data", str(tmp_path)])
    assert c.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert c.lr_scheduler.startswith("cosine") and c.min_snr_gamma == 5.0


def test_example_configs_name_prompt_files_that_exist_and_parse(tmp_path, monkeypatch):
    """Every `sample-prompts` line in configs/*.toml, commented out or not, names a prompt file in the repository
    that parses: uncommenting the line must give a run that starts, not "file not found"."""
    import re
    from pathlib import Path

    from sd_lora.sampling.prompts import read_prompt_file

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    named = []
    for toml in sorted((repo / "configs").glob("*.toml")):
        for line in toml.read_text(encoding="utf-8").splitlines():
            match = re.match(r'#?\s*sample-prompts\s*=\s*"([^"]+)"', line)
            if match:
                named.append(match.group(1))
                uncommented = tmp_path / toml.name
                uncommented.write_text(toml.read_text(encoding="utf-8").replace(line, line.lstrip("# ")), encoding="utf-8")
                assert load_config(["--config", str(uncommented), "--data", str(tmp_path)]).sample_prompts == Path(match.group(1))
    assert len(named) == 2
    for path in sorted({*named, *(str(p.relative_to(repo)) for p in (repo / "configs").glob("*.txt"))}):
        assert len(read_prompt_file(path)) >= 3, path


def test_example_configs_lr_schedules_do_what_their_names_say(tmp_path, monkeypatch):
    """cosine_with_restarts restarts only with --lr-scheduler-num-cycles above 1 (one cycle is the cosine
    curve): an example that names it without cycles would promise what it does not do."""
    from pathlib import Path

    import torch

    from sd_lora.optim import build_lr_scheduler

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    for toml in sorted((repo / "configs").glob("*.toml")):
        c = load_config(["--config", str(toml), "--data", str(tmp_path), "--max-steps", "300"])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = build_lr_scheduler(c.lr_scheduler, optimizer, warmup_steps=c.lr_warmup_steps, total_steps=300,
                                      num_cycles=c.lr_scheduler_num_cycles, power=c.lr_scheduler_power)
        lrs = []
        for _ in range(300):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        after_warmup = lrs[c.lr_warmup_steps:]
        rises = any(b > a for a, b in zip(after_warmup, after_warmup[1:]))
        assert rises == ("restarts" in c.lr_scheduler and c.lr_scheduler_num_cycles > 1), (toml.name, c.lr_scheduler)


def test_cache_and_optimizer_combinations(tmp_path):
    with pytest.raises(ConfigError, match="--latent-cache-dir needs cached latents"):
        load_config(["--data", str(tmp_path), "--latent-cache-dir", str(tmp_path), "--random-crop"])
    with pytest.raises(ConfigError, match=r"prodigy learns its own step size: --learning-rate is a multiplier, use about 1.0 \(got 0.0001\)"):
        load_config(["--data", str(tmp_path), "--optimizer", "prodigy", "--learning-rate", "1e-4"])
    assert load_config(["--data", str(tmp_path), "--optimizer", "prodigy", "--learning-rate", "0.5"]).learning_rate == 0.5
    # Unset, Prodigy's learning rate is 1.0, in the demo run and with a --model (it was refused over 1e-4, a default).
    for model in ([], ["--model", "some/model"]):
        assert load_config(["--data", str(tmp_path), "--optimizer", "prodigy", *model]).learning_rate == 1.0


def test_prodigy_refuses_a_text_encoder_lr_of_its_own_by_that_name_before_the_model_loads(tmp_path):
    """Prodigy takes one rate for every group: a --text-encoder-lr that differs was refused only after the model
    loaded and the latents were cached, and a low one was blamed on --learning-rate (1.0, as asked)."""
    prodigy = ["--data", str(tmp_path), "--model", "some/model", "--optimizer", "prodigy", "--train-text-encoder"]
    for rate in ("1e-4", "0.5"):
        with pytest.raises(ConfigError, match=rf"--text-encoder-lr {float(rate):g}: --optimizer prodigy uses one learning rate for the "
                                              r"U-Net and the text encoder \(--learning-rate 1\); drop --text-encoder-lr"):
            load_config(prodigy + ["--text-encoder-lr", rate])
    assert load_config(prodigy + ["--text-encoder-lr", "1.0"]).effective_text_encoder_lr == 1.0


def test_the_demo_run_with_epochs_has_no_warm_up_it_cannot_fit(tmp_path):
    """The demo's 20 warm-up steps fit its 1000; with --epochs the run's length is known only after the scan, and a
    short one failed there, over a warm-up the user never set."""
    assert load_config(["--data", str(tmp_path), "--epochs", "1"]).lr_warmup_steps == 0
    assert load_config(["--data", str(tmp_path), "--epochs", "1", "--lr-warmup-steps", "5"]).lr_warmup_steps == 5
    assert load_config(["--data", str(tmp_path)]).lr_warmup_steps == 20


def test_a_problem_with_a_value_from_a_config_file_names_the_file(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("resolution = 0\nmax-steps = 5\n")
    with pytest.raises(ConfigError, match=f"--resolution 0 is out of range.*\\(set in {cfg}\\)"):
        load_config(["--config", str(cfg), "--data", str(tmp_path)])


def test_max_token_length_takes_kohyas_values_from_flags_and_files(tmp_path):
    base = ["--data", str(tmp_path), "--model", "m"]
    assert load_config(base).max_token_length is None  # CLIP's 75 tokens, as before
    assert load_config([*base, "--max-token-length", "225"]).max_token_length == 225
    cfg = tmp_path / "run.toml"
    cfg.write_text("max-token-length = 150\n")
    c = load_config([*base, "--config", str(cfg)])
    assert c.max_token_length == 150 and c.ss_metadata()["ss_max_token_length"] == "150"
    assert "max-token-length = 150" in c.to_toml()
    assert load_config(base).ss_metadata()["ss_max_token_length"] == "None"  # as kohya writes an unset value
    with pytest.raises(ConfigError, match=r"--max-token-length 100 is not supported; choose one of: 75, 150, 225"):
        load_config([*base, "--max-token-length", "100"])
    cfg.write_text("max-token-length = 300\n")
    with pytest.raises(ConfigError, match=r"--max-token-length 300 is not supported; choose one of: 75, 150, 225"):
        load_config([*base, "--config", str(cfg)])
    with pytest.raises(ConfigError, match="max-token-length = 'long' must be a whole number"):
        load_config([*base, "--max-token-length", "long"])
    assert "--max-token-length {75,150,225}" in build_parser().format_help()


def test_a_folder_given_for_a_file_option_is_named_a_folder_not_missing(tmp_path):
    """--sample-prompts or --init-weights naming an existing folder said "file not found" for a path that exists."""
    (tmp_path / "prompts").mkdir()
    with pytest.raises(ConfigError) as caught:
        load_config(["--data", str(tmp_path), "--sample-prompts", str(tmp_path / "prompts"), "--init-weights", str(tmp_path)])
    assert caught.value.problems == [
        f"--sample-prompts {tmp_path / 'prompts'}: is a folder; pass the .txt file in it with one prompt per line",
        f"--init-weights {tmp_path}: is a folder; pass the LoRA .safetensors file in it",
    ]


def test_validate_every_with_validation_images(tmp_path):
    base = ["--data", str(tmp_path), "--model", "some/model", "--validate-every", "10"]
    assert load_config(base + ["--validation-split", "0.1"]).validate_every == 10
    (tmp_path / "val").mkdir()
    assert load_config(base + ["--validation-data", str(tmp_path / "val")]).validate_every == 10


def test_validation_or_reg_data_that_is_the_data_folder_or_holds_it_is_refused(tmp_path):
    """--validation-data DATA trained on its held-out images (the validation loss measured training images), and
    --reg-data DATA trained every image twice, silently; a folder inside --data is left out of its scan instead."""
    data = tmp_path / "data"
    (data / "reg").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data)
    base = ["--data", str(data), "--model", "some/model"]
    for folder in (data, tmp_path, tmp_path / "link"):
        with pytest.raises(ConfigError) as e:
            load_config(base + ["--validation-data", str(folder)])
        assert (f"--validation-data {folder} is the --data folder {data} or holds it: its images would be held out and trained on "
                "(the validation loss would measure training images); use --validation-split 0.1 or pass a folder of other images") in str(e.value)
        with pytest.raises(ConfigError, match=f"--reg-data {folder} is the --data folder {data} or holds it: its images would train "
                                              "twice, once as regularisation images; pass a folder of other images"):
            load_config(base + ["--reg-data", str(folder)])
    assert load_config(base + ["--reg-data", str(data / "reg")]).reg_data == data / "reg"


def test_a_path_starting_with_a_tilde_is_under_the_home_folder(tmp_path, monkeypatch):
    """The shell expands ~ only at the start of a word: --model-config=~/x and TOML strings reached us as a
    literal "~" folder that does not exist, although --model ~/x.safetensors worked."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "model_index.json").write_text("{}")
    (tmp_path / "run.toml").write_text('data = "~/data"\n')
    c = load_config(["--config=~/run.toml", "--model-config=~/cfg", "--output-dir=~/out"])
    assert (c.data, c.model_config, c.output_dir) == (tmp_path / "data", tmp_path / "cfg", tmp_path / "out")


def test_sample_settings_of_a_run_without_grids_are_warned_about(tmp_path):
    """--sample-every 0 with sample settings from the command line or a --config file: the run draws no grid,
    so the settings are named in a warning (not an error: it is how a config file's run is made quick)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    (tmp_path / "run.toml").write_text(f"sample-prompts = {str(prompts)!r}\nsample-steps = 5\n")
    warnings: list[str] = []
    load_config(["--data", str(tmp_path), "--model", "m", "--config", str(tmp_path / "run.toml"), "--sample-cfg", "4",
                 "--sample-every", "0"], warnings)
    assert len(warnings) == 1
    assert warnings[0].startswith("--sample-prompts, --sample-steps, --sample-cfg unused: this run draws no sample grids")
    for drawn in (["--sample-every", "10"], ["--sample-every", "0", "--sample-every-epochs", "1"]):
        warnings.clear()
        load_config(["--data", str(tmp_path), "--model", "m", "--sample-cfg", "4", *drawn], warnings)
        assert warnings == []
    # The demo base's own sample settings are not the user's.
    load_config(["--data", str(tmp_path), "--sample-every", "0"], warnings)
    assert warnings == []


def test_the_cli_prints_the_warnings_of_its_options(tmp_path, monkeypatch, capsys):
    from sd_lora import train

    ran = []
    monkeypatch.setattr(train, "run", ran.append)
    assert train.main(["--data", str(tmp_path), "--sample-every", "0", "--sample-seeds", "3"]) == 0
    assert ran[0].sample_seeds == 3
    assert "warning: --sample-seeds unused: this run draws no sample grids" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["model", "vae", "resume"])
def test_an_empty_path_string_is_refused_not_read_as_unset_or_the_current_folder(tmp_path, flag):
    """--vae "" trained with the model's own VAE and recorded ss_vae_name as the current folder's name; --model ""
    loaded the current folder; --resume "" did not resume."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'{flag} = ""\n')
    with pytest.raises(ConfigError, match=f"command line: {flag} = '' is empty; name the {flag} .* or leave the option out"):
        load_config(["--data", str(tmp_path), "--model", "m", f"--{flag}", ""])
    with pytest.raises(ConfigError, match=f"run.toml: {flag} = '' is empty"):
        load_config(["--data", str(tmp_path), "--config", str(cfg)] + ([] if flag == "model" else ["--model", "m"]))
