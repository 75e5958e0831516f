"""Atomic writes: the previous file survives any failure before the rename."""

import os
import stat

import pytest

from sd_lora import fsio


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    fsio.atomic_write_bytes(target, b"one")
    fsio.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]  # no temporary left behind


def test_folder_sync_can_be_left_out(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(fsio, "_fsync_dir", synced.append)
    fsio.atomic_write_bytes(tmp_path / "a" / "f.bin", b"one", sync_folder=False)
    assert synced == [] and (tmp_path / "a" / "f.bin").read_bytes() == b"one"
    fsio.atomic_write_bytes(tmp_path / "a" / "f.bin", b"two")
    assert synced == [tmp_path / "a"] and (tmp_path / "a" / "f.bin").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.bin"]


def test_failure_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    fsio.atomic_write_bytes(target, b"previous")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        fsio.atomic_write_bytes(target, b"new but never finished")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_interrupt_mid_write_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "x.txt"
    monkeypatch.setattr(fsio.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fsio.atomic_write_text(target, "hello")
    assert list(tmp_path.iterdir()) == []


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = fsio.atomic_write_bytes(tmp_path / "p", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_check_output_file_refuses_a_folder_and_every_spelling_of_an_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "in.safetensors"
    source.write_bytes(b"lora")
    (tmp_path / "link.safetensors").symlink_to(source)
    os.link(source, tmp_path / "hard.safetensors")
    (tmp_path / "folder").mkdir()
    for output in ["in.safetensors", "./in.safetensors", str(source), "link.safetensors", "hard.safetensors"]:
        with pytest.raises(fsio.UserError, match=r"OUT .*: the output would overwrite the input in\.safetensors; "
                                                 "choose another output file"):
            fsio.check_output_file(output, ["in.safetensors"], "OUT")
    with pytest.raises(fsio.UserError, match=r"--output folder: is a folder; name the file to write, e\.g\. "
                                             r"folder/lora\.safetensors"):
        fsio.check_output_file("folder", ["in.safetensors"], "--output")
    fsio.check_output_file("new.safetensors", ["in.safetensors", "org/hub-model"], "OUT")  # a new file is fine
    assert source.read_bytes() == b"lora"


@pytest.mark.parametrize("output", ["in.safetensors/out.safetensors", "in.safetensors/sub/out.safetensors"])
def test_check_output_file_refuses_a_path_below_a_file(tmp_path, monkeypatch, output):
    """The tools create a missing output folder; below a file that would fail in mkdir with a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.safetensors").write_bytes(b"lora")
    with pytest.raises(fsio.UserError, match=rf"OUT {output}: in\.safetensors is a file, not a folder"):
        fsio.check_output_file(output, ["in.safetensors"], "OUT")
    fsio.check_output_file("new/sub/out.safetensors", ["in.safetensors"], "OUT")  # a missing folder is fine


@pytest.mark.parametrize("value, name", [("./models/base", "base"), ("~/models/base.safetensors", "base.safetensors"),
                                         ("C:\\Users\\me\\base.ckpt", "base.ckpt"), ("org/model", "org/model")])
def test_public_name(value, name):
    assert fsio.public_name(value) == name
