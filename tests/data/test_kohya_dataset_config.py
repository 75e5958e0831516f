"""kohya's dataset config TOML: the same records as the equivalent folders, kohya's fallbacks, and errors that
name the file, the table and the fix."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from sd_lora.config import load_config
from sd_lora.data.kohya_dataset_config import read_dataset_config, run_options, scan_subsets
from sd_lora.data.ss_metadata import reg_dataset_metadata
from sd_lora.data_setup import regularization_set, scan_training_data
from sd_lora.errors import ConfigError, UserError
from .conftest import write_image

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--model", "unused-model"]  # load_config does not open the model


def write_layout(root: Path) -> None:
    """root/data/3_token: two captioned images and one without; root/reg: two captioned regularisation images."""
    for i, caption in enumerate(("token, red", "token, blue", None)):
        write_image(root / "data" / "3_token" / f"{i}.png", color=(40 * i, 0, 0))
        if caption:
            (root / "data" / "3_token" / f"{i}.txt").write_text(caption)
    for i in range(2):
        write_image(root / "reg" / f"r{i}.png", color=(0, 40 * i, 0))
        (root / "reg" / f"r{i}.txt").write_text(f"a person {i}")


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TWO_SUBSETS = """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "data/3_token"
  num_repeats = 3
  class_tokens = "token"
  caption_extension = ".txt"

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  caption_extension = ".txt"
"""


def summary(records) -> list[tuple]:
    return [(r.path, r.caption, r.repeats, r.prior, r.width, r.height) for r in records]


def test_two_subsets_give_the_records_of_data_and_reg_data_folders(tmp_path, monkeypatch):
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative image_dir paths are read from here, as kohya reads them
    write_toml(tmp_path / "kohya.toml", TWO_SUBSETS)
    folders = load_config([*MODEL, "--data", "data", "--reg-data", "reg"])
    toml = load_config([*MODEL, "--dataset-config", "kohya.toml"])
    assert toml.reg_data is None and toml.dataset_config == Path("kohya.toml")

    train_folders, train_toml = scan_training_data(folders).records, scan_training_data(toml).records
    assert summary(train_toml) == summary(train_folders)
    assert [(r.path.name, r.caption, r.repeats) for r in train_toml] == [
        ("0.png", "token, red", 3), ("1.png", "token, blue", 3), ("2.png", "token", 3)]
    prior_folders, found_folders = regularization_set(folders, train_folders, show=False)
    prior_toml, found_toml = regularization_set(toml, train_toml, show=False)
    assert summary(prior_toml) == summary(prior_folders)
    assert [(r.caption, r.repeats, r.prior) for r in prior_toml] == [("a person 0", 5, True), ("a person 1", 4, True)]
    # kohya's metadata counts the images as found (2 x 1 repeat), not the 9 balanced samples
    assert reg_dataset_metadata(found_toml) == {"ss_reg_dataset_dirs": '{"reg": {"n_repeats": 1, "img_count": 2}}', "ss_num_reg_images": "2"}
    assert reg_dataset_metadata(found_folders) == reg_dataset_metadata(found_toml)  # "reg", the folder's name, as kohya's


def test_subset_values_fall_back_to_the_dataset_then_general(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in "abc":
        write_image(tmp_path / name / "0.png")
    config = read_dataset_config(write_toml(tmp_path / "k.toml", """
[general]
num_repeats = 2
class_tokens = "general tokens"
caption_extension = ".cap"
flip_aug = true
keep_tokens = 1
batch_size = 3

[[datasets]]
num_repeats = 5
keep_tokens = 1
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 7
  class_tokens = "own tokens"
  [[datasets.subsets]]
  image_dir = "b"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
  caption_extension = ".txt"
"""))
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.caption_extension) for s in config.subsets]
    assert got == [("a", 7, "own tokens", ".cap"), ("b", 5, "general tokens", ".cap"), ("c", 2, "general tokens", ".txt")]
    options, problems = run_options(config, {})
    assert problems == [] and options == {"flip": True, "keep_tokens": 1, "batch_size": 3}
    records = scan_subsets(config, prior=False, caption_extension=".txt").records
    assert [(r.caption, r.repeats, r.folder) for r in records] == [("own tokens", 7, "a"), ("general tokens", 5, "b"),
                                                                   ("general tokens", 2, "c")]


def test_the_file_sets_the_run_options_and_a_flag_may_repeat_them(tmp_path, monkeypatch):
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "k.toml", """
[general]
resolution = [96, 96]
enable_bucket = false
min_bucket_reso = 64
max_bucket_reso = 128
bucket_no_upscale = true
shuffle_caption = true
caption_dropout_rate = 0.1
caption_tag_dropout_rate = 0.2
random_crop = true
max_token_length = 225
color_aug = false        # kohya options sd_lora lacks are accepted at the value that does nothing
bucket_reso_steps = 64
[[datasets]]
batch_size = 2
flip_aug = true
  [[datasets.subsets]]
  image_dir = "data/3_token"
""")
    c = load_config([*MODEL, "--dataset-config", "k.toml", "--batch-size", "2", "--no-cache-latents"])
    # bucket_no_upscale does nothing without buckets in kohya; it made the run crash before it trained.
    assert (c.resolution, c.buckets, c.min_bucket_side, c.max_bucket_side, c.no_upscale) == (96, False, 64, 128, False)
    assert (c.batch_size, c.flip, c.shuffle_tags, c.random_crop) == (2, True, True, True)
    assert (c.caption_dropout, c.tag_dropout, c.keep_tokens) == (0.1, 0.2, 0)
    assert c.caption_extension == ".caption"  # kohya's default for subsets that set none
    assert c.max_token_length == 225  # long tag captions, read in 75-token windows as kohya does


def test_image_dir_is_the_folder_itself_as_in_kohya(tmp_path, monkeypatch):
    """A dataset config's image_dir: its N_ prefix gives no repeats, sub-folders are not read, captions end in .caption."""
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "5_cat" / "a.png")
    (tmp_path / "5_cat" / "a.txt").write_text("a cat")
    write_image(tmp_path / "5_cat" / "2_sub" / "b.png")
    config = read_dataset_config(write_toml(tmp_path / "k.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "5_cat"\n'))
    result = scan_subsets(config, prior=False, caption_extension=".caption")
    assert [(r.path.name, r.caption, r.repeats) for r in result.records] == [("a.png", "", 1)]
    assert any("sub-folder is not read (e.g. 5_cat/2_sub)" in w for w in result.warnings)
    assert any("no .caption caption file" in w and "have .txt files beside them: set the caption extension to '.txt'" in w
               and "k.toml: [[datasets]] #1 [[datasets.subsets]] #1" in w for w in result.warnings)


def problems_of(tmp_path: Path, text: str, *flags: str) -> str:
    write_toml(tmp_path / "bad.toml", text)
    with pytest.raises(UserError) as info:
        load_config([*MODEL, "--dataset-config", "bad.toml", *flags])
    return str(info.value)


def test_missing_and_wrong_image_dirs_name_the_file_the_subset_and_the_folder_they_read_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.png").write_bytes(b"")
    message = problems_of(tmp_path, """
[[datasets]]
  [[datasets.subsets]]
  class_tokens = "x"
  [[datasets.subsets]]
  image_dir = "nowhere"
  [[datasets.subsets]]
  image_dir = "file.png"
""")
    assert "bad.toml: [[datasets]] #1 [[datasets.subsets]] #1: image_dir is missing; set it to the folder" in message
    assert (f"bad.toml: [[datasets]] #1 [[datasets.subsets]] #2: image_dir 'nowhere': folder not found ({tmp_path / 'nowhere'}, "
            f"read from the folder you run in, {tmp_path}, as kohya does); fix the path") in message
    assert "#3: image_dir 'file.png': is a file, not a folder" in message


def test_subsets_under_general_are_called_misplaced_not_misspelt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a" / "0.png")
    message = problems_of(tmp_path, """
[general]
  [[general.subsets]]
  image_dir = "a"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
""")
    assert ("bad.toml: [general]: subsets cannot be set in a [general] table: subsets are [[datasets.subsets]] tables "
            "after their [[datasets]] table") in message
    assert "did you mean" not in message


def test_unknown_unsupported_and_misplaced_keys_are_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a" / "0.png")
    message = problems_of(tmp_path, """
[general]
shuffle_captions = true
color_aug = true
[[datasets]]
face_crop_aug_range = [2.0, 3.0]
  [[datasets.subsets]]
  image_dir = "a"
  resolution = 512
  token_warmup_step = 10
  secondary_separator = ";;;"
  [[datasets.subsets]]
  image_dir = "a2"
  metadata_file = "meta_cap.json"
""")
    assert "bad.toml: [general]: unknown key 'shuffle_captions' (did you mean 'shuffle_caption'?)" in message
    assert "bad.toml: [general]: color_aug = true is a kohya option sd_lora does not support; sd_lora has no colour augmentation" in message
    assert "bad.toml: [[datasets]] #1: face_crop_aug_range = [2.0, 3.0] is a kohya option sd_lora does not support" in message
    assert ("bad.toml: [[datasets]] #1 [[datasets.subsets]] #1: resolution cannot be set in a [[datasets.subsets]] table; "
            "move it to [general] or [[datasets]]") in message
    assert "token_warmup_step = 10 is a kohya option sd_lora does not support; sd_lora has no token warm-up" in message
    assert "secondary_separator = ';;;' is a kohya option sd_lora does not support" in message
    assert "#2: metadata_file (kohya's fine-tuning JSON) is not supported; put each caption in a .txt file" in message


def test_bad_types_are_reported_with_the_key_and_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a" / "0.png")
    message = problems_of(tmp_path, """
[[datasets]]
batch_size = "4"
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 0
  flip_aug = "yes"
  caption_dropout_rate = 1.5
  caption_extension = "txt"
""")
    assert "bad.toml: [[datasets]] #1: batch_size = '4' must be a whole number >= 0" in message
    assert "#1 [[datasets.subsets]] #1: num_repeats = 0 must be at least 1; to leave the folder out, remove its subset" in message
    assert "flip_aug = 'yes' must be true or false" in message
    assert "caption_dropout_rate = 1.5 must be a number from 0 to 1" in message
    assert "caption_extension = 'txt' must start with a dot" in message


@pytest.mark.parametrize("general, subset, problem", [
    ("resolution = [512, 768]", "",
     "bad.toml: resolution = [512, 768]: sd_lora trains square-area buckets of one resolution; write resolution = N"),
    # 20240101 repeats listed 20 million samples per image before the first step, as a folder name did
    ("", "num_repeats = 20240101",
     "num_repeats = 20240101 is more than 100,000 repeats per epoch; use a smaller count"),
])
def test_one_subset_with_a_bad_value_is_refused(tmp_path, monkeypatch, general, subset, problem):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a" / "0.png")
    message = problems_of(tmp_path, f'[general]\n{general}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n{subset}\n')
    assert problem in message


def test_subsets_that_disagree_on_a_run_option_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in "ab":
        write_image(tmp_path / name / "0.png")
    message = problems_of(tmp_path, """
[general]
keep_tokens = 1
shuffle_caption = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 2
  flip_aug = true
  [[datasets.subsets]]
  image_dir = "b"
""")
    assert ("bad.toml: keep_tokens differs between the subsets: [[datasets]] #1 [[datasets.subsets]] #1: 2; "
            "[[datasets]] #1 [[datasets.subsets]] #2: 1. sd_lora applies keep_tokens to the whole run (--keep-tokens) and does "
            "not support one value per subset: set it once in [general]") in message
    assert ("flip_aug differs between the subsets: [[datasets]] #1 [[datasets.subsets]] #1: true; "
            "[[datasets]] #1 [[datasets.subsets]] #2: not set, so kohya's default false") in message


def test_a_flag_that_contradicts_the_file_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a" / "0.png")
    message = problems_of(tmp_path, '[general]\nbatch_size = 4\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n',
                          "--batch-size", "2")
    assert ("--batch-size 2 (command line) contradicts batch_size = 4 in bad.toml ([[datasets]] #1); "
            "drop --batch-size or change the dataset config") in message


def test_a_typed_caption_extension_that_every_subset_overrides_is_refused(tmp_path, monkeypatch):
    """The file's caption_extension wins (as in kohya); --caption-extension .txt was then ignored without a word, the
    .txt captions unread, and config.toml recorded .txt. Where some subset reads it, it is kohya's fallback."""
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    message = problems_of(tmp_path, TWO_SUBSETS, "--caption-extension", ".caption")
    assert ("--caption-extension .caption (command line) is not used: every subset of bad.toml sets its own caption_extension "
            "('.txt'); drop --caption-extension or change caption_extension in the dataset config") in message
    assert load_config([*MODEL, "--dataset-config", "bad.toml", "--caption-extension", ".txt"]).caption_extension == ".txt"
    write_toml(tmp_path / "k.toml", TWO_SUBSETS.replace('  caption_extension = ".txt"\n\n', "\n", 1))
    config = load_config([*MODEL, "--dataset-config", "k.toml", "--caption-extension", ".txt"])
    assert [r.caption for r in scan_training_data(config).records] == ["token, red", "token, blue", "token"]


def test_data_and_reg_data_do_not_combine_with_a_dataset_config(tmp_path, monkeypatch):
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    message = problems_of(tmp_path, TWO_SUBSETS, "--data", "data", "--reg-data", "reg")
    assert "--data data and --dataset-config bad.toml are both set; the dataset config lists every image folder" in message
    assert "--reg-data reg cannot be combined with --dataset-config; add the folder to the dataset config as a " \
           "[[datasets.subsets]] with is_reg = true" in message


def test_unreadable_files_name_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"--dataset-config missing.toml: file not found"):
        load_config([*MODEL, "--dataset-config", "missing.toml"])
    write_toml(tmp_path / "broken.toml", "[[datasets]\n")
    with pytest.raises(UserError, match=r"--dataset-config broken.toml: invalid TOML"):
        load_config([*MODEL, "--dataset-config", "broken.toml"])
    with pytest.raises(ConfigError, match=r"no \[\[datasets\]\]; add one"):
        read_dataset_config(write_toml(tmp_path / "empty.toml", "[general]\nflip_aug = true\n"))
    write_image(tmp_path / "reg" / "0.png")
    with pytest.raises(ConfigError, match=r"only-reg.toml: all subsets: every subset has is_reg = true, so nothing would train"):
        read_dataset_config(write_toml(tmp_path / "only-reg.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "reg"\nis_reg = true\n'))


def test_a_dataset_config_saved_with_a_bom_is_read(tmp_path, monkeypatch):
    """Windows editors often write a UTF-8 BOM; it was "invalid TOML (Invalid statement (at line 1, column 1))"."""
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "k.toml").write_bytes(("\ufeff" + TWO_SUBSETS).encode())
    assert [s.image_dir for s in read_dataset_config(tmp_path / "k.toml").subsets] == [Path("data/3_token"), Path("reg")]


def test_a_json_dataset_config_reads_as_its_toml(tmp_path, monkeypatch):
    """kohya reads a .json dataset config as the same tables; it was refused."""
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "k.toml", TWO_SUBSETS)
    (tmp_path / "k.json").write_text(json.dumps({"general": {"flip_aug": True}, **tomllib.loads(TWO_SUBSETS)}))
    from_json = load_config([*MODEL, "--dataset-config", "k.json"])
    assert from_json.flip and from_json.dataset_config == Path("k.json")
    assert summary(scan_training_data(from_json).records) == summary(scan_training_data(load_config([*MODEL, "--dataset-config", "k.toml"])).records)
    assert read_dataset_config(Path("k.json")).subsets == read_dataset_config(Path("k.toml")).subsets
    (tmp_path / "broken.json").write_text('{"datasets": [}')
    with pytest.raises(UserError, match=r"--dataset-config broken.json: invalid JSON \(Expecting value at line 1, column 15\)"):
        load_config([*MODEL, "--dataset-config", "broken.json"])
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserError, match=r"a JSON dataset config is one object .*, not a list"):
        load_config([*MODEL, "--dataset-config", "list.json"])


def test_the_example_config_loads(monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root
    c = load_config(["--dataset-config", "configs/datasets/zkchar.toml"])
    assert (c.resolution, c.batch_size, c.buckets, c.shuffle_tags, c.keep_tokens) == (64, 4, True, True, 1)
    config = read_dataset_config(Path("configs/datasets/zkchar.toml"))
    assert [(s.image_dir.name, s.num_repeats, s.is_reg, s.class_tokens, s.caption_extension) for s in config.subsets] == [
        ("5_zkchar", 5, False, "zkchar", ".txt"), ("regularization", 1, True, None, ".txt")]


def test_a_dataset_config_passed_as_config_says_which_option_takes_it(tmp_path):
    toml = write_toml(tmp_path / "kohya.toml", TWO_SUBSETS)
    with pytest.raises(ConfigError, match=r"kohya.toml: has \[\[datasets\]\] tables, so it is a kohya dataset config; pass it "
                                          r"with --dataset-config .*kohya.toml \(--config takes sd_lora's options\)"):
        load_config([*MODEL, "--config", str(toml)])


def test_problems_with_the_files_values_name_the_key_and_the_file_not_a_flag(tmp_path, monkeypatch):
    """A batch_size = 0 in the file was reported as '--batch-size 0 is out of range', a flag the user never typed."""
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "k.toml", "[general]\nbatch_size = 0\nmax_bucket_reso = 32\nresolution = 64\n" + TWO_SUBSETS)
    with pytest.raises(ConfigError) as caught:
        load_config([*MODEL, "--dataset-config", "k.toml"])
    message = str(caught.value)
    assert "--batch-size 0 is out of range" in message and "(set by batch_size in k.toml)" in message
    assert "--max-bucket-side 32 is smaller than --resolution 64 (set by max_bucket_reso in k.toml)" in message


def test_keep_tokens_without_shuffling_is_accepted_from_a_dataset_config_as_kohya_does(tmp_path, monkeypatch):
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "k.toml", "[general]\nkeep_tokens = 1\n" + TWO_SUBSETS)
    assert load_config([*MODEL, "--dataset-config", "k.toml"]).keep_tokens == 1
    with pytest.raises(ConfigError, match="--keep-tokens 1 only has an effect with --shuffle-tags"):  # typed: refused
        load_config([*MODEL, "--data", str(tmp_path / "data"), "--keep-tokens", "1"])


@pytest.mark.parametrize("table", ["[general]", "[[datasets]]"])
def test_num_repeats_below_one_is_refused_where_subsets_inherit_it(tmp_path, monkeypatch, table):
    # Inherited by the subset, num_repeats = 0 gave records that repeat 0 times: the batch sampler then failed.
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a" / "0.png")
    text = ('[general]\nnum_repeats = 0\n[[datasets]]\n' if table == "[general]" else '[[datasets]]\nnum_repeats = 0\n') + \
        '[[datasets.subsets]]\nimage_dir = "a"\n'
    message = problems_of(tmp_path, text)
    place = "[general]" if table == "[general]" else "[[datasets]] #1"
    assert f"bad.toml: {place}: num_repeats = 0 must be at least 1; set it in each subset that should train" in message


def test_prior_loss_weight_applies_to_the_is_reg_subsets(tmp_path, monkeypatch):
    # It was refused as if there were no regularisation images, with the fix "add --reg-data", which a dataset config refuses.
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "kohya.toml", TWO_SUBSETS)
    config = load_config([*MODEL, "--dataset-config", "kohya.toml", "--prior-loss-weight", "0.5"])
    assert config.prior_loss_weight == 0.5
    prior, _ = regularization_set(config, scan_training_data(config).records, show=False)
    assert [(r.path.name, r.prior) for r in prior] == [("r0.png", True), ("r1.png", True)]

    message = problems_of(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "reg"\n', "--prior-loss-weight", "0.5")
    assert ("--prior-loss-weight 0.5 weighs regularisation images, but bad.toml has no is_reg subset; add a "
            "[[datasets.subsets]] of them with is_reg = true, or drop --prior-loss-weight") in message


def test_image_dirs_of_one_name_keep_their_own_dataset_dirs_entries(tmp_path, monkeypatch):
    """char_a/images (3 repeats, 2 images) and char_b/images (1 repeat, 1 image) were merged under "images" in
    ss_dataset_dirs: 3 repeats of 3 images, 9 samples where the run had 7 (ss_num_train_images)."""

    from sd_lora.data.ss_metadata import dataset_metadata

    for folder, count in (("char_a", 2), ("char_b", 1)):
        for i in range(count):
            write_image(tmp_path / folder / "images" / f"{i}.png")
            (tmp_path / folder / "images" / f"{i}.txt").write_text(f"{folder}, smile")
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "kohya.toml", """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "char_a/images"
  num_repeats = 3
  caption_extension = ".txt"
  [[datasets.subsets]]
  image_dir = "char_b/images"
  caption_extension = ".txt"
""")
    meta = dataset_metadata(scan_training_data(load_config([*MODEL, "--dataset-config", "kohya.toml"])).records)
    assert json.loads(meta["ss_dataset_dirs"]) == {"char_a/images": {"n_repeats": 3, "img_count": 2},
                                                   "char_b/images": {"n_repeats": 1, "img_count": 1}}
    assert json.loads(meta["ss_tag_frequency"]) == {"char_a/images": {"char_a": 2, "smile": 2},
                                                    "char_b/images": {"char_b": 1, "smile": 1}}
    assert meta["ss_num_train_images"] == "7"


def test_an_image_dir_in_two_datasets_keeps_one_dataset_dirs_entry_each(tmp_path, monkeypatch):
    """The same folder in two [[datasets]] (2 and 5 repeats) was one "a" entry with 2 repeats of 4 images, 8 samples
    where the run had 14; kohya names the second "a (2)" and counts its tags once."""

    from sd_lora.data.ss_metadata import dataset_metadata

    for i in range(2):
        write_image(tmp_path / "a" / f"{i}.png")
        (tmp_path / "a" / f"{i}.txt").write_text("a, smile")
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "kohya.toml", """
[general]
caption_extension = ".txt"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 2
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 5
""")
    meta = dataset_metadata(scan_training_data(load_config([*MODEL, "--dataset-config", "kohya.toml"])).records)
    assert json.loads(meta["ss_dataset_dirs"]) == {"a": {"n_repeats": 2, "img_count": 2}, "a (2)": {"n_repeats": 5, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"]) == {"a": {"a": 2, "smile": 2}}
    assert meta["ss_num_train_images"] == "14"


def test_tag_frequency_counts_the_captions_as_read_without_caption_prefix_and_suffix(tmp_path, monkeypatch):
    """kohya counts ss_tag_frequency when it reads the caption files (train_util's set_tag_frequency) and adds
    caption_prefix / caption_suffix only when it draws a sample; ours counted them in every image's tags."""
    from sd_lora.data.ss_metadata import dataset_metadata

    write_image(tmp_path / "a" / "0.png")
    (tmp_path / "a" / "0.txt").write_text("Red Hair, smile")
    write_image(tmp_path / "a" / "1.png")  # no caption file: its class tokens are the caption as read
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "kohya.toml", """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  class_tokens = "zk"
  caption_extension = ".txt"
  caption_prefix = "masterpiece,"
  caption_suffix = ", best quality"
""")
    records = scan_training_data(load_config([*MODEL, "--dataset-config", "kohya.toml"])).records
    assert [r.caption for r in records] == ["masterpiece, Red Hair, smile , best quality", "masterpiece, zk , best quality"]
    assert json.loads(dataset_metadata(records)["ss_tag_frequency"]) == {"a": {"red hair": 1, "smile": 1, "zk": 1}}


def test_tag_frequency_counts_the_regularisation_images_as_found(tmp_path, monkeypatch):
    """kohya counts the tags of every subset it reads, is_reg ones (and --reg_data_dir's folders) included
    (train_util's load_dreambooth_dir); ours left the regularisation folders out of ss_tag_frequency."""
    from sd_lora.data.ss_metadata import dataset_metadata

    write_layout(tmp_path)
    write_image(tmp_path / "reg" / "r2.png")  # uncaptioned: --reg-data captions it by its folder name, the config by its (empty) class tokens
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "kohya.toml", TWO_SUBSETS)
    for argv in (["--dataset-config", "kohya.toml"], ["--data", "data", "--reg-data", "reg"]):
        config = load_config([*MODEL, *argv])
        train = scan_training_data(config).records
        prior, found = regularization_set(config, train, show=False)
        assert len(found) == 3 and len(prior) == 3
        assert json.loads(dataset_metadata(train, found)["ss_tag_frequency"]) == {
            "3_token": {"token": 3, "red": 1, "blue": 1},
            "reg": {"a person 0": 1, "a person 1": 1, **({} if config.dataset_config else {"reg": 1})},
        }


def test_labels_take_as_many_parent_folders_as_tell_image_dirs_apart(tmp_path, monkeypatch):
    from sd_lora.data.kohya_dataset_config import _labels

    dirs = ["/d/char_a/images", "/d/char_b/images", "/d/x/a/images", "/d/y/a/images", "/d/char_a/images", "/d/solo",
            "/images", "/d/images", "/d/char_a/images", "/d/solo"]
    assert _labels(dirs) == ["char_a/images", "char_b/images", "x/a/images", "y/a/images", "char_a/images (2)", "solo",
                             "images", "d/images", "char_a/images (3)", "solo (2)"]
    monkeypatch.chdir(tmp_path)  # a relative image_dir is the same folder as its absolute path
    assert _labels(["rel/set", str(tmp_path / "rel" / "set"), "other/set"]) == ["rel/set", "rel/set (2)", "other/set"]


def test_is_reg_images_balance_against_the_training_images_of_their_own_dataset(tmp_path, monkeypatch, capsys):
    """As kohya's: dataset 1's 2 regularisation images were balanced against all 14 training samples of the run
    (7 repeats each) instead of dataset 1's 2; a dataset without training images leaves its own unused."""
    write_layout(tmp_path)
    for i in range(3):
        write_image(tmp_path / "b" / f"{i}.png")
        write_image(tmp_path / "c" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "kohya.toml", """
[general]
caption_extension = ".txt"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "data/3_token"
  num_repeats = 1
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = 4
[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
  is_reg = true
""")
    config = load_config([*MODEL, "--dataset-config", "kohya.toml"])
    train = scan_training_data(config).records
    assert sum(r.repeats for r in train) == 3 + 12
    prior, found = regularization_set(config, train)
    assert [(r.path.name, r.repeats) for r in prior] == [("r0.png", 2), ("r1.png", 1)]
    assert reg_dataset_metadata(found)["ss_num_reg_images"] == "5"  # the images as found, as kohya counts them
    assert ("warning: --dataset-config: kohya.toml: [[datasets]] #3: its is_reg images are not used: the dataset has no "
            "training images to balance them against (as in kohya); move them to the dataset of the images they "
            "regularise") in capsys.readouterr().err


def test_balance_keeps_each_datasets_is_reg_images_together_in_their_order(tmp_path):
    """is_reg subsets of two [[datasets]], interleaved in the file: dataset 1's images first, each in scan order."""
    from sd_lora.data.kohya_dataset_config import KohyaDatasetConfig, KohyaSubset, balance_regularization
    from sd_lora.data.scan import ImageRecord

    subsets = [KohyaSubset("s1", 2, tmp_path / "t2"), KohyaSubset("s2", 1, tmp_path / "r1", is_reg=True),
               KohyaSubset("s3", 2, tmp_path / "r2", is_reg=True), KohyaSubset("s4", 1, tmp_path / "t1"),
               KohyaSubset("s5", 1, tmp_path / "r1b", is_reg=True)]
    config = KohyaDatasetConfig(tmp_path / "k.toml", subsets, {})

    def record(folder, name, repeats=1):
        return ImageRecord(tmp_path / folder / name, name, "sidecar", repeats, folder, 32, 32)

    train = [record("t1", "a.png", 2), record("t2", "b.png", 3), record("t1", "c.png", 3)]
    prior = [record("r2", "x.png"), record("r1", "y.png"), record("r1b", "z.png"), record("r2", "w.png"), record("r1", "v.png")]
    out, warnings = balance_regularization(config, train, prior)
    assert [(r.path.name, r.repeats, r.prior) for r in out] == [("y.png", 2, True), ("z.png", 2, True), ("v.png", 1, True),
                                                               ("x.png", 2, True), ("w.png", 1, True)]
    assert not warnings


def test_token_warmup_step_at_zero_is_accepted_written_as_a_share_too(tmp_path, monkeypatch):
    # kohya reads token_warmup_step as steps, or below 1 as a share of the run's steps: 0.0 is as much a no-op as 0.
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "k.toml", "[general]\ntoken_warmup_step = 0.0\n" + TWO_SUBSETS)
    assert [s.image_dir for s in read_dataset_config(tmp_path / "k.toml").subsets] == [Path("data/3_token"), Path("reg")]


def test_the_config_toml_of_a_run_without_buckets_reruns_it(tmp_path, monkeypatch):
    """Without buckets the run records bucket_no_upscale off (it does nothing then, as in kohya); fed back with
    --config, that off was refused as contradicting the dataset config's bucket_no_upscale = true."""
    write_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "k.toml", """
[[datasets]]
enable_bucket = false
bucket_no_upscale = true
  [[datasets.subsets]]
  image_dir = "data/3_token"
""")
    c = load_config([*MODEL, "--dataset-config", "k.toml"])
    saved = write_toml(tmp_path / "config.toml", c.to_toml())
    again = load_config(["--config", str(saved)])
    assert (again.buckets, again.no_upscale) == (False, False) and again.to_toml() == c.to_toml()
    with pytest.raises(ConfigError, match="--no-upscale false .* contradicts bucket_no_upscale = true"):
        write_toml(tmp_path / "k.toml", (tmp_path / "k.toml").read_text().replace("enable_bucket = false", "enable_bucket = true"))
        load_config(["--config", str(saved), "--buckets"])
