"""Option declarations: help, kohya metadata keys and public values come from one declaration per option."""

import dataclasses
import json
import re

from sd_lora.config import load_config
from sd_lora.options import FIELDS, TrainConfig


def test_metadata_keys_come_from_declarations(tmp_path):
    c = load_config(["--data", str(tmp_path), "--model", "m", "--rank", "4", "--alpha", "2", "--min-snr-gamma", "5", "--seed", "7"])
    meta = c.ss_metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_seed"] == "7"
    assert meta["ss_text_encoder_lr"] == "None"  # text encoder not trained
    assert all(isinstance(v, str) for v in meta.values())
    declared = {f.metadata["ss"] for f in FIELDS.values() if f.metadata["ss"]}
    assert declared <= set(meta)


def test_metadata_names_local_paths_by_basename_and_hub_ids_whole(tmp_path):
    model = tmp_path / "home" / "user" / "models" / "base"
    model.mkdir(parents=True)
    (tmp_path / "chars").mkdir()
    c = load_config(["--data", str(tmp_path / "chars"), "--model", str(model), "--output-dir", str(tmp_path / "out"),
                     "--vae", "madebyollin/sdxl-vae-fp16-fix", "--resume", "latest"])  # fmt: skip
    assert c.ss_metadata()["ss_sd_model_name"] == "base"
    assert c.ss_metadata()["ss_vae_name"] == "madebyollin/sdxl-vae-fp16-fix"  # kohya records the replaced VAE too
    public = c.to_dict(public=True)
    assert (public["model"], public["data"], public["output-dir"]) == ("base", "chars", "out")
    assert (public["vae"], public["resume"]) == ("madebyollin/sdxl-vae-fp16-fix", "latest")
    assert str(tmp_path) not in json.dumps(public)
    assert c.to_dict()["model"] == str(model) and c.to_dict()["data"] == str(tmp_path / "chars")  # config.toml
    hub = load_config(["--data", str(tmp_path), "--model", "runwayml/stable-diffusion-v1-5"])
    assert hub.ss_metadata()["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5"
    assert hub.ss_metadata()["ss_vae_name"] == "None"
    local_vae = load_config(["--data", str(tmp_path), "--vae", str(tmp_path / "vae" / "sdxl_vae.safetensors")])
    assert local_vae.ss_metadata()["ss_vae_name"] == "sdxl_vae.safetensors"


def test_sample_prompts_help_lists_every_prompt_line_option():
    from sd_lora.sampling.prompts import OPTIONS

    listed = set(re.findall(r"--(\w+)", FIELDS["sample_prompts"].metadata["help"]))
    assert set(OPTIONS) <= listed, sorted(set(OPTIONS) - listed)  # --ss (the row's sampler) too


def test_every_option_has_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"].strip(), f.name


def test_options_offer_exactly_the_optimizers_optim_builds():
    from sd_lora import optim, options

    assert set(options.OPTIMIZERS) == set(optim.OPTIMIZERS)


def test_config_toml_round_trips_text_outside_the_bmp_and_control_characters(tmp_path):
    """config.toml is what `--resume` reads back (beside the outputs and in every state folder): an emoji in a
    comment or a folder name used to be written as JSON's surrogate pair escapes, which TOML refuses, so the
    run could not be resumed."""
    data = tmp_path / "robot 🤖 set"
    data.mkdir()
    c = load_config(["--data", str(data), "--model", "m", "--training-comment", 'v2 🤖 "quoted" back\\slash\x7f end'])
    path = tmp_path / "config.toml"
    path.write_text(c.to_toml(), encoding="utf-8")
    again = load_config(["--config", str(path)])
    assert dataclasses.replace(again, config=None) == c
    assert again.data == data and again.training_comment == 'v2 🤖 "quoted" back\\slash\x7f end'


def test_config_toml_reruns_a_resumed_run_instead_of_resuming_it(tmp_path):
    """A resumed run's config.toml recorded resume = "latest": `--config out/config.toml --output-dir elsewhere`
    (a rerun, as the README promises) then failed with "--resume latest: no state folder"."""
    c = load_config(["--data", str(tmp_path), "--model", "m", "--resume", "latest"])
    assert "resume" not in c.to_toml()
    path = tmp_path / "config.toml"
    path.write_text(c.to_toml(), encoding="utf-8")
    assert load_config(["--config", str(path)]).resume is None
    assert load_config(["--config", str(path), "--resume", "latest"]).resume == "latest"  # the printed resume command
