"""`sd_lora.export`: the metadata written into a trained LoRA file."""

import json

from sd_lora.config import load_config
from sd_lora.export import training_metadata


def test_training_metadata_holds_no_local_paths(tmp_path):
    # users share LoRA files: their metadata must not name the user's folders (config.toml keeps them)
    model = tmp_path / "home" / "user" / "models" / "base"
    model.mkdir(parents=True)
    (tmp_path / "chars").mkdir()
    (tmp_path / "prompts.txt").write_text("zkchar\n")
    config = load_config(["--data", str(tmp_path / "chars"), "--model", str(model), "--output-dir", str(tmp_path / "o"),
                          "--output-name", "zk", "--resolution", "512",
                          "--sample-prompts", str(tmp_path / "prompts.txt")])  # fmt: skip
    meta = training_metadata(config, family="sd1", prediction_type="epsilon", run_metadata={}, started_at=0.0,
                             step=1, epoch=1)  # fmt: skip
    assert meta["ss_sd_model_name"] == "base"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"  # as kohya writes it
    saved = json.loads(meta["sd_lora_config"])
    paths = (saved["model"], saved["data"], saved["output-dir"], saved["sample-prompts"])
    assert paths == ("base", "chars", "o", "prompts.txt")
    assert not [k for k, v in meta.items() if str(tmp_path) in v]


def test_the_diffusers_profile_says_the_alpha_its_baked_factors_hold(tmp_path):
    """lora_B of the diffusers profile has alpha / r baked in (alpha = r); its ss_network_alpha used to keep the
    training alpha (2 for rank 4), which `convert` then reported as wrong and a WebUI showed as scale 0.5."""
    from helpers import random_lora_components

    from sd_lora.convert import convert_lora
    from sd_lora.export import export_lora
    from sd_lora.formats.kohya import read_lora_file
    from sd_lora.formats.readers import read_any_lora
    from sd_lora.models.tiny import build_tiny_pipeline

    components = random_lora_components(build_tiny_pipeline(), rank=4, alpha=2.0, seed=0)
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v1"}
    kohya, diffusers = export_lora(tmp_path / "a.safetensors", components, metadata, "fp32", file_format="both")
    assert read_lora_file(kohya)[1]["ss_network_alpha"] == "2.0"
    assert read_lora_file(diffusers)[1]["ss_network_alpha"] == "4.0"
    assert {w.alpha for ws in read_any_lora(diffusers).components.values() for w in ws.values()} == {4.0}
    assert convert_lora(diffusers, tmp_path / "k.safetensors", "kohya").corrected_metadata == {}


def test_the_total_batch_size_counts_accumulation_and_processes(tmp_path):
    """kohya's ss_total_batch_size: images per optimizer step over every GPU (it was not written)."""
    config = load_config(["--data", str(tmp_path), "--batch-size", "3", "--gradient-accumulation-steps", "2", "--output-name", "zk",
                          "--resolution", "64"])
    one = training_metadata(config, family="sd1", prediction_type="epsilon", run_metadata={}, started_at=0.0, step=1, epoch=1)
    two = training_metadata(config, family="sd1", prediction_type="epsilon", run_metadata={}, started_at=0.0, step=1, epoch=1,
                            processes=2)
    assert (one["ss_total_batch_size"], two["ss_total_batch_size"]) == ("6", "12")
    assert one["ss_batch_size_per_device"] == "3" and one["ss_gradient_accumulation_steps"] == "2"


def test_each_training_process_writes_its_own_session_id(tmp_path):
    """kohya's ss_session_id (a random integer per training session) was not written; it must not follow --seed,
    which seeds the random module, or every run of one seed would share it."""
    import random

    from sd_lora.export import new_session_id

    config = load_config(["--data", str(tmp_path), "--output-name", "zk", "--resolution", "64"])
    meta = training_metadata(config, family="sd1", prediction_type="epsilon", run_metadata={}, started_at=0.0, step=1, epoch=1,
                             session_id=4294967296)
    assert meta["ss_session_id"] == "4294967296"
    ids = []
    for _ in range(2):
        random.seed(42)
        ids.append(new_session_id())
    assert ids[0] != ids[1] and all(0 <= i <= 2**32 for i in ids)


def test_the_validation_options_are_written_as_kohya_writes_them(tmp_path):
    """kohya's ss_validation_split and ss_validate_every_n_steps were not written; without validation images kohya's
    ss_validate_every_n_steps is None (its default), not our unused default of 50."""
    base = ["--data", str(tmp_path), "--output-name", "zk", "--resolution", "64"]
    plain = load_config(base).ss_metadata()
    assert (plain["ss_validation_split"], plain["ss_validate_every_n_steps"]) == ("0.0", "None")
    split = load_config([*base, "--validation-split", "0.2", "--validate-every", "10"]).ss_metadata()
    assert (split["ss_validation_split"], split["ss_validate_every_n_steps"]) == ("0.2", "10")
    (tmp_path / "val").mkdir()
    held = load_config([*base, "--validation-data", str(tmp_path / "val")]).ss_metadata()
    assert (held["ss_validation_split"], held["ss_validate_every_n_steps"]) == ("0.0", "50")
