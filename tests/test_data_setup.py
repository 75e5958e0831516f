"""The run's data side: the DataLoader over buckets, and its worker processes ended with the run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import psutil
import torch

from sd_lora.config import load_config
from sd_lora.data import BucketBatchSampler
from sd_lora.data_setup import data_loader, stop_workers


class Buckets(torch.utils.data.Dataset):
    """Six items in two buckets, as ImageDataset exposes them to the sampler."""

    bucket_of = [(64, 64)] * 4 + [(64, 96)] * 2
    records = [SimpleNamespace(repeats=1)] * 6

    def __len__(self):
        return 6

    def __getitem__(self, key):
        index, _seed = key
        return {"latents": torch.full((4, 2, 2), float(index)), "original_size": (64, 64), "crop_top_left": (0, 0),
                "target_size": (64, 64), "caption": f"item {index}", "flipped": False, "index": index}


def test_each_process_takes_its_slice_of_one_bucket_per_global_batch(tmp_path):
    config = load_config(["--data", str(tmp_path), "--batch-size", "1", "--num-workers", "1"])
    loaders = [data_loader(config, Buckets(), SimpleNamespace(num_processes=2, process_index=rank, device=torch.device("cpu")))
               for rank in range(2)]
    assert all(isinstance(loader.batch_sampler, BucketBatchSampler) for loader in loaders)
    assert loaders[0].persistent_workers and loaders[0].num_workers == 1
    batches = [[b["index"] for b in loader] for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == 3  # 4 + 2 items, global batches of 2
    for mine, theirs in zip(*batches):
        assert len(mine) == len(theirs) == 1 and Buckets.bucket_of[mine[0]] == Buckets.bucket_of[theirs[0]]
    assert sorted(i for b in batches for batch in b for i in batch) == list(range(6))
    assert len(psutil.Process().children()) == 2  # persistent: alive between epochs
    for loader in loaders:
        stop_workers(loader)
        stop_workers(loader)  # a second call (or a loader never iterated) does nothing
    assert psutil.Process().children() == []


def test_prefetch_yields_the_loaders_batches_in_order_and_hands_over_errors():
    import threading

    import pytest

    from sd_lora.data_setup import Prefetch
    from sd_lora.errors import UserError

    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=3)
    ahead = Prefetch(loader)
    assert len(ahead) == 4
    assert [b.tolist() for b in ahead] == [b.tolist() for b in loader]  # twice: each pass is a new iteration
    assert [b.tolist() for b in ahead] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 2:
                raise UserError("img2.png: cannot decode image (truncated file)")
            return i

    seen = []
    with pytest.raises(UserError, match="img2.png: cannot decode image"):
        for batch in Prefetch(torch.utils.data.DataLoader(Bad(), batch_size=1)):
            seen.append(batch.item())
    assert seen == [0, 1]

    iterator = iter(Prefetch(torch.utils.data.DataLoader(list(range(100)), batch_size=1)))
    assert next(iterator).item() == 0
    iterator.close()  # leaving an epoch early, as the loop does at --max-steps
    assert not any(t.name == "sd_lora-prefetch" for t in threading.enumerate())


def test_problems_of_the_other_image_folders_name_their_option(tmp_path):
    from sd_lora.data.scan import scan_dataset
    from sd_lora.data_setup import regularization_set, split_validation
    from sd_lora.errors import UserError
    from tests.helpers import write_dataset

    data, empty = write_dataset(tmp_path / "data"), tmp_path / "empty"
    empty.mkdir()
    scan = scan_dataset(data)
    for flag, call in (("--reg-data", lambda c: regularization_set(c, scan.records, show=False)[0]),
                       ("--validation-data", lambda c: split_validation(c, scan))):
        config = load_config(["--data", str(data), flag, str(empty)])
        try:
            call(config)
        except UserError as e:
            assert str(e).startswith(f"{flag}: {empty}: no images found"), str(e)
        else:
            raise AssertionError(f"an empty {flag} folder was accepted")


def test_validation_and_reg_folders_inside_data_are_not_trained_as_its_images(tmp_path):
    # --data data --validation-data data/val --reg-data data/reg: the held-out and regularisation images trained as
    # training images too (the validation loss then measured training images).
    from PIL import Image

    from sd_lora.data_setup import regularization_set, scan_training_data, split_validation

    data = tmp_path / "data"
    for path in ("5_zk/a.png", "val/v.png", "reg/r.png"):
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(data / path)
    config = load_config(["--data", str(data), "--validation-data", str(data / "val"), "--reg-data", str(data / "reg")])
    scan = scan_training_data(config)
    train, held = split_validation(config, scan)
    assert [r.path.name for r in train] == ["a.png"]
    assert [r.path.name for r in held] == ["v.png"]
    assert [(r.path.name, r.prior) for r in regularization_set(config, train, show=False)[0]] == [("r.png", True)]
    assert f"{data / 'val'} not read: it is --validation-data (held-out images must not train)" in scan.warnings
    assert f"{data / 'reg'} not read: it is --reg-data (its images train as regularisation images only)" in scan.warnings


def test_the_validation_folders_scan_warnings_are_printed(tmp_path, capsys):
    # --validation-data val/ with v.caption beside v.png (the run reads .txt): the held-out image's loss was measured
    # against the caption "val", its folder's name, and the scan's warning saying so was dropped.
    from PIL import Image

    from sd_lora.data_setup import scan_training_data, split_validation
    from tests.helpers import write_dataset

    data, val = write_dataset(tmp_path / "data"), tmp_path / "val"
    val.mkdir()
    Image.new("RGB", (32, 32)).save(val / "v.png")
    (val / "v.caption").write_text("zkchar, held out")
    config = load_config(["--data", str(data), "--validation-data", str(val)])
    _, held = split_validation(config, scan_training_data(config))
    assert [r.caption for r in held] == ["val"]
    err = capsys.readouterr().err
    assert "warning: --validation-data: 1 image has no .txt caption file or metadata entry; using the folder name" in err
    assert "set the caption extension to '.caption'" in err
    split_validation(config, scan_training_data(config), show=False)  # (processes other than the main one)
    assert "--validation-data" not in capsys.readouterr().err


def test_root_level_data_and_reg_images_are_labelled_apart_in_the_metadata(tmp_path, monkeypatch):
    """--data train --reg-data reg, images directly in each: both were labelled "." in ss_dataset_dirs and
    ss_reg_dataset_dirs, and the regularisation captions' tags were counted in ss_tag_frequency as the training
    folder's. Each is labelled by its folder's name, as kohya labels an image_dir; folders of the same name by
    as many parent folders as tell them apart (in a dataset config, too)."""
    from PIL import Image

    from sd_lora.data import dataset_metadata, reg_dataset_metadata
    from sd_lora.data_setup import regularization_set, scan_training_data

    for folder, caption in (("train", "zk, smile"), ("reg", "a person"), ("a/images", "zk, smile"), ("b/images", "a person")):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32)).save(tmp_path / folder / f"{i}.png")
            (tmp_path / folder / f"{i}.txt").write_text(caption)
    (tmp_path / "same.toml").write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\n'
                                        '  [[datasets.subsets]]\n  image_dir = "a/images"\n'
                                        '  [[datasets.subsets]]\n  image_dir = "b/images"\n  is_reg = true\n')
    monkeypatch.chdir(tmp_path)

    def metadata(args):
        config = load_config(args)
        train = scan_training_data(config).records
        found = regularization_set(config, train, show=False)[1]
        meta = {**dataset_metadata(train, found), **reg_dataset_metadata(found)}
        return [json.loads(meta[key]) for key in ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency")]

    assert metadata(["--data", "train", "--reg-data", "reg"]) == [
        {"train": {"n_repeats": 1, "img_count": 2}}, {"reg": {"n_repeats": 1, "img_count": 2}},
        {"train": {"zk": 2, "smile": 2}, "reg": {"a person": 2}}]
    assert metadata(["--data", "a/images", "--reg-data", "b/images"]) == [
        {"images": {"n_repeats": 1, "img_count": 2}}, {"b/images": {"n_repeats": 1, "img_count": 2}},
        {"images": {"zk": 2, "smile": 2}, "b/images": {"a person": 2}}]
    assert metadata(["--dataset-config", "same.toml"]) == [
        {"a/images": {"n_repeats": 1, "img_count": 2}}, {"b/images": {"n_repeats": 1, "img_count": 2}},
        {"a/images": {"zk": 2, "smile": 2}, "b/images": {"a person": 2}}]
