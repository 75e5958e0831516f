"""metadata.jsonl and metadata.csv captions (sd_lora/data/metadata.py), read through the scan that uses them."""

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


def test_empty_metadata_captions_are_warned_about_as_empty_caption_files_are(tmp_path):
    """An empty or comma-only "text" trained silently (",": on the caption ","), where an empty caption file is
    warned about."""
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        write_image(root / f"{name}.png")
    lines = [{"file_name": "a.png", "text": ""}, {"file_name": "b.png", "text": " , "}, {"file_name": "c.png", "text": "zk, red"}]
    write_text(root / "metadata.jsonl", "\n".join(json.dumps(line) for line in lines))
    result = scan_dataset(root)
    assert [r.caption for r in result.records] == ["", "", "zk, red"]
    assert result.warnings == [f"2 metadata captions are empty or only commas (e.g. the text of {root / 'a.png'}); those images "
                               "train with an empty caption"]


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


def captions(result):
    return {r.path.name: (r.caption, r.caption_source) for r in result.records}


def scan_error(root) -> str:
    with pytest.raises(UserError) as caught:
        scan_dataset(root, skip_bad_images=True)
    return str(caught.value)


def test_csv_captions_in_nested_folders(tmp_path):
    root = tmp_path / "data"
    for name in ["a.png", "sub/b.png", "sub/deep/c.png", "sub/deep/d.png"]:
        write_image(root / name)
    # Column order is free and other columns are ignored; file_name is relative to the csv's folder.
    write_text(root / "metadata.csv", "text,file_name,score\nfrom the root,sub/b.png,7\n")
    write_text(root / "sub" / "deep" / "metadata.csv", "file_name,text\r\nc.png,  deep one \r\n\r\n,,\r\n")
    assert captions(scan_dataset(root)) == {
        "a.png": ("data", "folder"), "b.png": ("from the root", "metadata"),
        "c.png": ("deep one", "metadata"), "d.png": ("deep", "folder"),
    }


def test_csv_quoted_fields_hold_commas_quotes_and_line_breaks(tmp_path):
    root = tmp_path / "data"
    for name in "abc":
        write_image(root / f"{name}.png")
    write_text(root / "metadata.csv", 'file_name,text\na.png,"zk, red hair, smile"\n'
                                      'b.png,"line one\nline two"\nc.png,"a ""quoted"" word"\n')
    assert captions(scan_dataset(root)) == {
        "a.png": ("zk, red hair, smile", "metadata"), "b.png": ("line one\nline two", "metadata"),
        "c.png": ('a "quoted" word', "metadata"),
    }


def test_csv_with_a_byte_order_mark(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_text(root / "metadata.csv", b"\xef\xbb\xbffile_name,text\r\na.png,caf\xc3\xa9\r\n")  # Excel's "CSV UTF-8"
    assert captions(scan_dataset(root)) == {"a.png": ("café", "metadata")}


def test_csv_header_without_the_columns_says_what_it_has(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    csv_file = write_text(root / "metadata.csv", "\nimage,caption\na.png,zk\n")
    assert (f"{csv_file}:2: the header row has no 'file_name' column (it has 'image', 'caption'); "
            "the first row must name the columns, e.g. file_name,text") in scan_error(root)
    write_text(csv_file, "file_name,text,text\na.png,zk,zk\n")
    assert f"{csv_file}:1: the header row has 2 'text' columns; keep one" in scan_error(root)


def test_csv_bad_rows_reported_together_with_their_lines(tmp_path):
    root = tmp_path / "data"
    for name in ["a.png", "b.png", "sub/c.png"]:
        write_image(root / name)
    csv_file = write_text(root / "metadata.csv", "\n".join([
        "file_name,text",
        'a.png,"two\nlines"',  # lines 2-3: fine
        "b.png",  # 4: no text
        ",no name",  # 5
        "b.png,zk, red hair",  # 6: unquoted commas
        "a.png,again",  # 7: a.png has its caption from line 2
        "missing.png,x",  # 8
        'b.png,"unclosed',  # 9: the rest of the file is unreadable
        "b.png,never read",
    ]))
    latin1 = write_text(root / "sub" / "metadata.csv", "file_name,text\nc.png,caf\xe9\n".encode("latin-1"))
    lines = scan_error(root).splitlines()
    assert lines[0] == "7 problems in the training data:"
    assert [line.strip().split(": ")[0] for line in lines[1:8]] == [f"{csv_file}:{n}" for n in range(4, 10)] + [
        str(latin1)]
    assert "no 'text' value; every row needs a file_name and a text" in lines[1]
    assert "no 'file_name' value" in lines[2]
    assert "3 fields, but the header names 2 columns; quote a caption that holds commas" in lines[3]
    assert f"'a.png' already has a caption from {csv_file}:2; keep one entry" in lines[4]
    assert "'missing.png' does not exist" in lines[5]
    assert "invalid CSV (unexpected end of data)" in lines[6]
    assert "not valid UTF-8" in lines[7]
    assert lines[-1] == ("Fix the metadata.jsonl/metadata.csv lines and folder names above "
                         "(--skip-bad-images does not skip them).")


def test_duplicates_between_jsonl_and_csv_in_different_folders(tmp_path):
    root = tmp_path / "data"
    write_image(root / "sub" / "a.png")
    jsonl = write_text(root / "metadata.jsonl", json.dumps({"file_name": "sub/a.png", "text": "from jsonl"}))
    csv_file = write_text(root / "sub" / "metadata.csv", "file_name,text\na.png,from csv\n")
    assert (f"{csv_file}:2: 'a.png' already has a caption from {jsonl}:1; keep one entry"
            in scan_error(root))


def test_jsonl_and_csv_in_one_folder_are_refused(tmp_path):
    root = tmp_path / "data"
    write_image(root / "sub" / "a.png")
    write_text(root / "sub" / "metadata.jsonl", json.dumps({"file_name": "a.png", "text": "from jsonl"}))
    write_text(root / "sub" / "metadata.csv", "file_name,text\na.png,from csv\n")
    lines = scan_error(root).splitlines()
    assert lines[:2] == [
        "1 problem in the training data:",
        f"  {root / 'sub' / 'metadata.jsonl'} and {root / 'sub' / 'metadata.csv'}: both give captions for the "
        "same folder, so which one applies is ambiguous; keep one, moving any entries it lacks into it, and "
        "remove the other",
    ]


def test_sidecar_caption_wins_over_csv(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_image(root / "b.png")
    write_text(root / "a.txt", "from sidecar")
    write_text(root / "metadata.csv", "file_name,text\na.png,from csv a\nb.png,from csv b\n")
    assert captions(scan_dataset(root)) == {"a.png": ("from sidecar", "sidecar"), "b.png": ("from csv b", "metadata")}


def test_a_line_for_an_image_in_an_unread_sub_folder_says_so(tmp_path):
    # Read as an image_dir (no sub-folders), the message was "not an image the scan uses (supported: .png, ...)".
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "sub" / "b.png")
    lines = [{"file_name": "a.png", "text": "zk, a"}, {"file_name": "sub/b.png", "text": "zk, b"}]
    write_text(tmp_path / "metadata.jsonl", "\n".join(json.dumps(line) for line in lines))
    with pytest.raises(UserError) as caught:
        scan_dataset(tmp_path, recursive=False)
    assert (f"{tmp_path / 'metadata.jsonl'}:2: file_name 'sub/b.png' is in a sub-folder, which is not read (only the "
            "images directly in the folder are, as kohya reads an image_dir); move the image up and fix its file_name, "
            "or remove this line") in str(caught.value)
    assert {r.path.name: r.caption for r in scan_dataset(tmp_path).records} == {"a.png": "zk, a", "b.png": "zk, b"}
