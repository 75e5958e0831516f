"""metadata.jsonl captions (sd_lora/data/metadata.py), read through the scan that uses them."""

from __future__ import annotations

import json
import os

import pytest

from sd_lora.data.scan import scan_dataset
from sd_lora.errors import UserError

from .conftest import write_image, write_text


def test_metadata_in_parent_folder_names_nested_files(tmp_path):
    root = tmp_path / "data"
    write_image(root / "sub" / "deep" / "a.png")
    write_text(root / "metadata.jsonl", json.dumps({"file_name": "sub/deep/a.png", "text": "deep one"}))
    write_text(root / "sub" / "metadata.jsonl", "")
    [record] = scan_dataset(root).records
    assert (record.caption, record.caption_source) == ("deep one", "metadata")


def test_metadata_errors_name_file_and_line(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    jsonl = write_text(root / "metadata.jsonl", "\n".join([
        '{"file_name": "a.png", "text": "ok"}',
        '{"file_name": "a.png", "text": ',
        '{"text": "no name"}',
        '{"file_name": "a.png", "text": 5}',
        '["a.png", "list"]',
        '{"file_name": "a.png", "text": "again"}',
        '{"file_name": "missing.png", "text": "x"}',
    ]))
    with pytest.raises(UserError) as caught:
        scan_dataset(root, skip_bad_images=True)
    lines = str(caught.value).splitlines()
    assert lines[0] == "6 problems in the training data:"
    assert [line.strip().split(": ")[0] for line in lines[1:7]] == [f"{jsonl}:{n}" for n in range(2, 8)]
    assert "invalid JSON" in lines[1] and "missing key 'file_name'" in lines[2]
    assert "'text' must be a string, got 5" in lines[3] and "expected a JSON object" in lines[4]
    assert f"already has a caption from {jsonl}:1" in lines[5] and "does not exist" in lines[6]
    assert "--skip-bad-images does not skip them" in lines[-1]


def test_metadata_paths_cannot_leave_the_root(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    outside = write_image(tmp_path / "outside" / "x.png")
    os.symlink(outside.parent, root / ".escape")
    write_text(root / "metadata.jsonl", "\n".join(json.dumps({"file_name": name, "text": "t"}) for name in [
        "../outside/x.png", str(outside), ".escape/x.png", "sub/../../outside/x.png"]))
    with pytest.raises(UserError) as caught:
        scan_dataset(root)
    message = str(caught.value)
    assert message.count("points outside the data folder") == 2
    assert "metadata.jsonl:2: file_name" in message and "is absolute" in message
    assert ("metadata.jsonl:3: file_name '.escape/x.png' resolves outside the data folder through a symlink"
            in message)
