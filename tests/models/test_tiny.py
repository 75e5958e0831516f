"""The tiny test pipelines: built from config in code, with tokenizers that leave nothing behind."""

import tempfile

from transformers import CLIPTokenizer

from sd_lora.models.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline


def test_building_leaves_no_temporary_tokenizer_folders(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    sd1 = build_tiny_pipeline("sd1")
    sdxl = build_tiny_sdxl_pipeline()
    leftovers = [p.name for p in scratch.iterdir() if p.name.startswith("sd_lora_")]  # (torch keeps its own caches here)
    assert leftovers == []  # the tokenizers were written, loaded into memory and removed

    # What they loaded survives the folder: they tokenize, and save as ordinary tokenizer folders.
    ids = sd1.tokenizer("zkchar, a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == sd1.tokenizer.bos_token_id
    sdxl.save_pretrained(str(tmp_path / "sdxl"), safe_serialization=True)
    reloaded = CLIPTokenizer.from_pretrained(str(tmp_path / "sdxl" / "tokenizer_2"))
    assert reloaded.pad_token == "!" and reloaded.get_vocab() == sdxl.tokenizer_2.get_vocab()
