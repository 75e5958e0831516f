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
    meta = training_metadata(config, family="sd1", prediction_type="epsilon", dataset_metadata={}, started_at=0.0,
                             step=1, epoch=1)  # fmt: skip
    assert meta["ss_sd_model_name"] == "base"
    saved = json.loads(meta["sd_lora_config"])
    paths = (saved["model"], saved["data"], saved["output-dir"], saved["sample-prompts"])
    assert paths == ("base", "chars", "o", "prompts.txt")
    assert not [k for k, v in meta.items() if str(tmp_path) in v]
