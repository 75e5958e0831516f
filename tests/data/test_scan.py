from __future__ import annotations

import json
import os
import warnings

import pytest

from sd_lora.data.scan import MAX_LISTED_PROBLEMS, fingerprint, scan_dataset
from sd_lora.data.ss_metadata import dataset_metadata
from sd_lora.errors import UserError

from .conftest import write_image, write_text


def rel(result, root):
    return [r.path.relative_to(root.resolve()).as_posix() for r in result.records]


def test_recursive_sorted_hidden_skipped(tmp_path):
    root = tmp_path / "data"
    for name in ["b/z.png", "b/a.JPG", "a.webp", "c/d/e.bmp", ".hidden/x.png", "b/.x.png", "b/readme.md",
                 "b/y.psd"]:  # Photoshop: not an image the scan reads
        write_image(root / name, fmt="PNG")
    result = scan_dataset(root)
    assert rel(result, root) == ["a.webp", "b/a.JPG", "b/z.png", "c/d/e.bmp"]
    record = result.records[1]
    assert record.path.is_absolute() and (record.width, record.height) == (32, 32)


def test_kohya_repeat_folders_and_folder_captions(tmp_path):
    root = tmp_path / "data"
    write_image(root / "10_zk char" / "a.png")
    write_image(root / "10_zk char" / "outdoor" / "b.png")
    write_image(root / "chars" / "3_me" / "c.png")
    write_image(root / "10_zk char" / "2_closeup" / "f.png")  # the nearest repeat folder wins
    write_image(root / "my_pets" / "d.png")
    write_image(root / "e.png")
    result = scan_dataset(root)
    got = {r.path.name: (r.repeats, r.folder, r.caption, r.caption_source) for r in result.records}
    assert got == {
        "a.png": (10, "10_zk char", "zk char", "folder"),
        "b.png": (10, "10_zk char", "zk char", "folder"),
        "c.png": (3, "chars/3_me", "me", "folder"),
        "d.png": (1, "my_pets", "my pets", "folder"),
        "e.png": (1, "data", "data", "folder"),  # the images directly in it: the folder's name, as kohya's image_dir
        "f.png": (2, "10_zk char/2_closeup", "closeup", "folder"),
    }
    assert result.warnings == [
        "6 images have no .txt caption file or metadata entry; using the folder name as caption "
        f"(e.g. {root / '10_zk char' / '2_closeup' / 'f.png'} -> 'closeup')"
    ]


def test_names_that_are_not_utf8_train_with_readable_captions(tmp_path):
    # A Windows zip unpacked on Linux: Latin-1 bytes in file and folder names (Python holds them as surrogates).
    root = tmp_path / "data"
    folder = os.fsdecode(b"3_caf\xe9")
    write_image(root / folder / os.fsdecode(b"\xe9t\xe9.png"))
    write_image(root / "2_zk" / os.fsdecode(b"caf\xe9.png"))
    write_text(root / "2_zk" / os.fsdecode(b"caf\xe9.txt"), "zk, a thing")
    result = scan_dataset(root)
    got = {os.fsencode(r.path.name): (r.repeats, r.folder, r.caption) for r in result.records}
    assert got == {b"\xe9t\xe9.png": (3, "3_caf\ufffd", "caf\ufffd"), b"caf\xe9.png": (2, "2_zk", "zk, a thing")}
    assert all(r.path.is_file() for r in result.records)  # the files themselves are opened by their real names
    meta = dataset_metadata(result.records)
    assert json.loads(meta["ss_tag_frequency"])["3_caf\ufffd"] == {"caf\ufffd": 1}
    assert all(value.encode("utf-8") for value in meta.values())  # writable into a .safetensors header
    assert len(fingerprint(result.records)) == 16
    write_image(root / folder / os.fsdecode(b"\xe9t\xe9.png"), size=(40, 32))  # a changed image is noticed
    assert fingerprint(scan_dataset(root).records) != fingerprint(result.records)


def test_repeat_folder_without_a_name(tmp_path):
    root = tmp_path / "data"
    write_image(root / "10_" / "a.png")  # kohya: 10 repeats, no class token
    write_image(root / "10_" / "b.png")
    write_text(root / "10_" / "b.txt", "zk")
    result = scan_dataset(root)
    assert [(r.repeats, r.folder, r.caption) for r in result.records] == [(10, "10_", ""), (10, "10_", "zk")]
    assert result.warnings[-1] == ("1 image trains with an empty caption: no caption file, and its N_ folder has no "
                                   f"name after the repeat count (e.g. {root / '10_' / 'a.png'})")


def test_zero_repeats_is_an_error_naming_the_folder(tmp_path):
    root = tmp_path / "data"
    write_image(root / "0_x" / "a.png")
    write_image(root / "0_x" / "b.png")
    with pytest.raises(UserError) as caught:
        scan_dataset(root, skip_bad_images=True)
    message = str(caught.value)
    assert f"{root / '0_x'}: folder gives 0 repeats" in message
    assert message.count("0 repeats") == 1 and "rename it" in message


def test_a_date_named_folder_is_refused_as_a_repeat_count(tmp_path):
    """20240101_photos read as 20,240,101 repeats: a warning, then minutes and GBs listing the epoch's samples."""
    root = tmp_path / "data"
    write_image(root / "20240101_photos" / "a.png")
    write_image(root / "100000_x" / "b.png")  # the most still taken (with a warning)
    with pytest.raises(UserError) as caught:
        scan_dataset(root)
    message = str(caught.value)
    assert f"{root / '20240101_photos'}: folder name gives 20240101 repeats per epoch" in message
    assert "rename it 1_20240101_photos" in message and "100000_x" not in message


def test_root_named_like_a_repeat_folder_warns(tmp_path):
    root = tmp_path / "5_me"
    write_image(root / "a.png")
    result = scan_dataset(root)
    assert result.records[0].repeats == 1 and result.records[0].caption == "me"
    assert any("data folder itself is named '5_me'" in w for w in result.warnings)


def test_caption_priority_sidecar_then_metadata_then_folder(tmp_path):
    root = tmp_path / "data"
    for name in "abc":
        write_image(root / "1_cls" / f"{name}.png")
    write_text(root / "1_cls" / "a.txt", "  from sidecar \n")
    write_text(root / "1_cls" / "metadata.jsonl",
               '{"file_name": "a.png", "text": "meta a"}\n\n{"file_name": "b.png", "text": " meta b "}\n')
    result = scan_dataset(root)
    got = [(r.caption, r.caption_source) for r in result.records]
    assert got == [("from sidecar", "sidecar"), ("meta b", "metadata"), ("cls", "folder")]
    assert result.warnings[0].startswith("1 image has no .txt caption file")


def test_custom_caption_extension_and_bom(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_text(root / "a.txt", "ignored")
    write_text(root / "a.caption", b"\xef\xbb\xbfred, dress\r\n")
    [record] = scan_dataset(root, caption_extension=".caption").records
    assert (record.caption, record.caption_source) == ("red, dress", "sidecar")


def test_utf16_caption_is_named_as_such(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_text(root / "a.txt", "red, dress".encode("utf-16"))  # what Windows Notepad saves as "Unicode"
    with pytest.raises(UserError) as caught:
        scan_dataset(root)
    assert f"{root / 'a.png'}: caption file a.txt is UTF-16 (it starts with a UTF-16 byte-order mark); re-save it as UTF-8" in str(caught.value)


def test_utf16_caption_without_bom_is_refused(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_text(root / "a.txt", "red, dress".encode("utf-16-le"))  # no byte-order mark: valid UTF-8, with NULs
    with pytest.raises(UserError) as caught:
        scan_dataset(root)
    assert (f"{root / 'a.png'}: caption file a.txt holds NUL bytes (byte 1): it is UTF-16 without a byte-order mark, "
            "or not text; re-save it as UTF-8") in str(caught.value)


def test_caption_extension_matches_in_any_letter_case(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_text(root / "a.TXT", "upper")
    write_image(root / "B.png")
    write_text(root / "b.Txt", "mixed stem and extension")
    write_image(root / "c.png")
    write_text(root / "c.txt", "exact")
    write_text(root / "c.TXT", "not this one: the exact name wins")
    result = scan_dataset(root)
    assert [(r.path.name, r.caption, r.caption_source) for r in result.records] == [
        ("B.png", "mixed stem and extension", "sidecar"), ("a.png", "upper", "sidecar"), ("c.png", "exact", "sidecar")]
    assert result.warnings == []


def test_another_images_exact_caption_file_is_not_shared_by_letter_case(tmp_path):
    """A.PNG beside a.png and a.txt trained silently on a.png's caption (a.txt matched A.txt in any letter case)."""
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_image(root / "A.PNG")
    write_text(root / "a.txt", "a.png's own")
    result = scan_dataset(root)
    assert [(r.path.name, r.caption, r.caption_source) for r in result.records] == [
        ("A.PNG", "data", "folder"), ("a.png", "a.png's own", "sidecar")]
    assert result.warnings[0].startswith("1 image has no .txt caption file or metadata entry; using the folder name as caption")


def test_caption_files_differing_only_in_case_are_refused(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_text(root / "a.TXT", "one")
    write_text(root / "A.txt", "two")
    with pytest.raises(UserError) as caught:
        scan_dataset(root)
    assert (f"{root / 'a.png'}: caption files A.txt and a.TXT differ only in letter case; keep one of them, named a.txt"
            in str(caught.value))


@pytest.mark.parametrize("extension", ["txt", ".", ".png"])
def test_bad_caption_extension(tmp_path, extension):
    write_image(tmp_path / "a.png")
    with pytest.raises(UserError, match="caption extension"):
        scan_dataset(tmp_path, caption_extension=extension)


def test_empty_and_multiline_captions_warned(tmp_path):
    write_image(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "  \n")
    write_image(tmp_path / "b.png")
    write_text(tmp_path / "b.txt", "one\ntwo")
    write_image(tmp_path / "c.png")
    write_text(tmp_path / "c.txt", " , ,,\n")  # tags with nothing in them: an empty caption too
    result = scan_dataset(tmp_path)
    assert [r.caption for r in result.records] == ["", "one\ntwo", ""]
    assert [w.split(" (")[0] for w in result.warnings] == [
        "2 caption files are empty", "1 caption file has more than one line"]


def test_symlink_loop_does_not_hang(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a" / "x.png")
    os.symlink("..", root / "a" / "loop")
    os.symlink(root / "a", root / "b")
    result = scan_dataset(root)
    assert rel(result, root) == ["a/x.png"]
    assert any("same folder as one already scanned" in w for w in result.warnings)


def make_bad_files(root):
    write_image(root / "ok.png")
    write_text(root / "empty.png", b"")
    write_text(root / "text.png", "hello")
    good = write_image(root / "trunc.jpg", (64, 64))
    good.write_bytes(good.read_bytes()[:200])
    write_image(root / "cap.png")
    write_text(root / "cap.txt", b"caf\xe9")


def test_bad_files_reported_together(tmp_path):
    root = tmp_path / "data"
    make_bad_files(root)
    with pytest.raises(UserError) as caught:
        scan_dataset(root)
    lines = str(caught.value).splitlines()
    assert lines == [
        "4 problems in the training data:",
        f"  {root / 'cap.png'}: caption file cap.txt is not valid UTF-8 (unexpected end of data at byte 3); "
        "re-save it as UTF-8",
        f"  {root / 'empty.png'}: image is empty (0 bytes)",
        f"  {root / 'text.png'}: not an image file (Pillow cannot identify it)",
        f"  {root / 'trunc.jpg'}: cannot decode image (truncated file)",
        "Fix or remove these files, or pass --skip-bad-images to skip them.",
    ]


def test_skip_bad_images(tmp_path):
    root = tmp_path / "data"
    make_bad_files(root)
    result = scan_dataset(root, skip_bad_images=True)
    assert rel(result, root) == ["ok.png"]
    assert [(p.relative_to(root).as_posix(), problem) for p, problem in result.skipped] == [
        ("cap.png", "caption file cap.txt is not valid UTF-8 (unexpected end of data at byte 3); "
                    "re-save it as UTF-8"),
        ("empty.png", "image is empty (0 bytes)"),
        ("text.png", "not an image file (Pillow cannot identify it)"),
        ("trunc.jpg", "cannot decode image (truncated file)"),
    ]
    assert result.warnings[-1].startswith("skipped 4 bad files (--skip-bad-images)")


def test_broken_symlink_is_a_bad_file(tmp_path):
    write_image(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "b.png")
    with pytest.raises(UserError, match=r"b\.png: broken symlink"):
        scan_dataset(tmp_path)


def test_all_images_bad(tmp_path):
    write_text(tmp_path / "a.png", b"")
    with pytest.raises(UserError, match=r"no usable images \(1 bad file, e.g. .*a.png: image is empty"):
        scan_dataset(tmp_path, skip_bad_images=True)


def test_problem_list_is_capped(tmp_path):
    for i in range(MAX_LISTED_PROBLEMS + 5):
        write_text(tmp_path / f"{i:03d}.png", b"")
    with pytest.raises(UserError) as caught:
        scan_dataset(tmp_path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{MAX_LISTED_PROBLEMS + 5} problems in the training data:"
    assert len(lines) == MAX_LISTED_PROBLEMS + 3 and lines[-2] == "  and 5 more"


def test_root_problems(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(UserError, match="is a file, not a folder"):
        scan_dataset(write_text(tmp_path / "f.txt", "x"))
    write_text(tmp_path / "empty" / "notes.txt", "x")
    with pytest.raises(UserError, match=r"no images found \(looked for .png, .jpg, .jpeg, .jpe, .jfif, .webp, .bmp, .tif"):
        scan_dataset(tmp_path / "empty")


def test_dataset_metadata(tmp_path):
    root = tmp_path / "data"
    for name, caption in [("a", "zk, Red hair, smile"), ("b", "zk, red hair,"), ("c", "zk")]:
        write_image(root / "3_zk" / f"{name}.png")
        write_text(root / "3_zk" / f"{name}.txt", caption)
    write_image(root / "reg" / "r.png")
    meta = dataset_metadata(scan_dataset(root).records)
    assert json.loads(meta["ss_tag_frequency"]) == {
        "3_zk": {"zk": 3, "red hair": 2, "smile": 1},
        "reg": {"reg": 1},
    }
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "3_zk": {"n_repeats": 3, "img_count": 3},
        "reg": {"n_repeats": 1, "img_count": 1},
    }
    assert meta["ss_num_train_images"] == "10"
    assert all(isinstance(v, str) for v in meta.values())


def test_every_format_users_save_is_found(tmp_path):
    """.jfif (browsers on Windows), .jpe, .tif/.tiff, .avif and .gif were skipped without a word, their captions too."""
    formats = {"a.png": None, "b.jfif": "JPEG", "c.jpe": "JPEG", "d.tif": "TIFF", "e.TIFF": "TIFF", "f.avif": "AVIF", "g.gif": "GIF"}
    for name, fmt in formats.items():
        write_image(tmp_path / "1_zk" / name, size=(40, 24), fmt=fmt)
        write_text(tmp_path / "1_zk" / f"{name.split('.')[0]}.txt", f"zk {name}")
    result = scan_dataset(tmp_path)
    assert [(r.path.name, r.caption, r.width, r.height) for r in result.records] == [
        (name, f"zk {name}", 40, 24) for name in formats]


def test_the_runs_own_folders_inside_the_data_are_not_read(tmp_path):
    """--output-dir inside --data: the next run trained on the sample grids there, and --resume saw the data changed."""
    from sd_lora.config import load_config
    from sd_lora.data_setup import scan_training_data

    root = tmp_path / "data"
    write_image(root / "2_zk" / "a.png")
    write_text(root / "2_zk" / "a.txt", "zk")
    write_image(root / "2_zk" / "out" / "samples" / "chars-step00000000.png")
    write_image(root / "2_zk" / "cache" / "x.png")
    config = load_config(["--data", str(root), "--model", "m", "--output-dir", str(root / "2_zk" / "out"),
                          "--latent-cache-dir", str(root / "2_zk" / "cache")])
    result = scan_training_data(config)
    assert [r.path.name for r in result.records] == ["a.png"]
    assert sum("out not read: this run writes its outputs there" in w for w in result.warnings) == 1
    assert sum("cache not read: it is --latent-cache-dir (this run writes its cached latents there)" in w
               for w in result.warnings) == 1
    assert [r.path.name for r in scan_dataset(root).records] == ["a.png", "x.png", "chars-step00000000.png"]  # other scans: as before


def test_the_sample_grids_of_an_output_dir_that_is_the_data_folder_are_not_read(tmp_path):
    """--output-dir DATA --data DATA: the second run trained on the first run's sample grids in DATA/samples."""
    from sd_lora.config import load_config
    from sd_lora.data_setup import scan_training_data

    write_image(tmp_path / "2_zk" / "a.png")
    write_image(tmp_path / "samples" / "chars-step00000000.png")
    config = load_config(["--data", str(tmp_path), "--model", "m", "--output-dir", str(tmp_path)])
    result = scan_training_data(config)
    assert [r.path.name for r in result.records] == ["a.png"]
    assert f"{tmp_path / 'samples'} not read: this run writes its sample grids there (they would become training images)" in result.warnings



def test_an_image_dir_holding_only_sub_folders_says_how_to_read_them(tmp_path):
    # kohya's train/10_name/ layout given as one image_dir: the advice was "Put your images in this folder".
    write_image(tmp_path / "train" / "10_zk" / "a.png")
    with pytest.raises(UserError) as caught:
        scan_dataset(tmp_path / "train", recursive=False)
    message = str(caught.value)
    assert f"{tmp_path / 'train'}: no images found" in message and "Put your images in this folder" not in message
    assert (f"Its sub-folders (e.g. {tmp_path / 'train' / '10_zk'}) are not read, as kohya reads an image_dir: make each "
            "folder of images a subset of its own (with a kohya N_name folder's N as its num_repeats), or pass this "
            "folder with --data") in message


def test_kohyas_caption_files_under_another_extension_are_pointed_out(tmp_path):
    # kohya's default extension is .caption; the warning said "no caption file" beside a.caption.
    write_image(tmp_path / "10_zk" / "a.png")
    write_text(tmp_path / "10_zk" / "a.caption", "zk, red hair")
    result = scan_dataset(tmp_path)
    assert [r.caption for r in result.records] == ["zk"]
    assert result.warnings == [
        "1 image has no .txt caption file or metadata entry; using the folder name as caption "
        f"(e.g. {tmp_path / '10_zk' / 'a.png'} -> 'zk'); they have .caption files beside them: set the caption extension "
        "to '.caption'"]
    assert [r.caption for r in scan_dataset(tmp_path, caption_extension=".caption").records] == ["zk, red hair"]


def test_folder_labels_name_the_root_and_never_clash(tmp_path):
    """The images directly in the data folder were labelled ".", in --data's scan and --reg-data's alike, so the two
    merged into one ss_tag_frequency entry. The root is labelled by its name, as kohya labels an image_dir; where a
    label would clash (a sub-folder named as the root; a label another image set took), parent folders are added."""
    write_image(tmp_path / "data" / "a.png")
    write_image(tmp_path / "data" / "data" / "b.png")  # a sub-folder named as the root
    write_image(tmp_path / "data" / "1_p" / "c.png")
    labels = {r.path.name: r.folder for r in scan_dataset(tmp_path / "data").records}
    assert labels == {"a.png": f"{tmp_path.name}/data", "b.png": "data/data", "c.png": "1_p"}
    write_image(tmp_path / "reg" / "r.png")
    write_image(tmp_path / "reg" / "1_p" / "s.png")
    reg = scan_dataset(tmp_path / "reg", taken_labels=set(labels.values()) | {"reg"})
    assert {r.path.name: r.folder for r in reg.records} == {"r.png": f"{tmp_path.name}/reg", "s.png": "reg/1_p"}
    assert not any(str(tmp_path) in r.folder for r in reg.records)  # names, never the local path


@pytest.mark.parametrize("truncated", [False, True], ids=["odd-tag", "truncated-tag"])
def test_images_with_a_broken_exif_block_are_one_warning_with_the_count(tmp_path, truncated):
    """Pillow warns once per image (each text names its numbers, so Python shows them all) and names no file: a folder
    of 500 phone photos printed 500 lines. The scan says it once, with the count, the first files and what to do; the
    images still train, turned upright by the orientation tag read before the broken one."""
    from helpers import odd_exif_photo

    for i in range(5):
        odd_exif_photo(tmp_path / "data" / f"{i}.jpg", entries=3 + i, truncated=truncated)
    write_image(tmp_path / "data" / "plain.png", (40, 40))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        result = scan_dataset(tmp_path / "data")
    assert [str(w.message) for w in shown] == []
    lines = [w for w in result.warnings if "Pillow" in w]
    assert len(lines) == 1 and lines[0].startswith(
        f"5 images have EXIF or other metadata that Pillow could not fully read ({tmp_path / 'data' / '0.jpg'}, "
        f"{tmp_path / 'data' / '1.jpg'}, {tmp_path / 'data' / '2.jpg'} and 2 more; Pillow: ")
    assert "rotate any that show on their side" in lines[0] and "exiftool -all= FILE" in lines[0]
    assert {(r.path.name, r.width, r.height) for r in result.records} == {
        *((f"{i}.jpg", 48, 64) for i in range(5)), ("plain.png", 40, 40)}
