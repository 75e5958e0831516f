"""Atomic writes: the previous file survives any failure before the rename."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

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


# --- what a killed writer leaves behind ---------------------------------------------------------------------

LONG_AGO = 1_000_000_000.0  # 2001: before any process that runs these tests started


def _old(path, when=LONG_AGO):
    os.utime(path, (when, when))
    return path


def _owns_lora(name):
    return name.endswith(".safetensors") or name.startswith("state-")


def test_a_writer_killed_mid_save_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    """kill -9 runs no `except`: the temporary stays. Its lock dies with the process, so the next run may delete it."""
    target = tmp_path / "lora.safetensors"
    writer = ("import os, signal, sys; from pathlib import Path; from sd_lora import fsio\n"
              "with fsio.temporary_beside(Path(sys.argv[1])) as tmp:\n"
              "    tmp.write_bytes(b'x' * 5000)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", writer, str(target)], cwd=Path(__file__).parents[1])
    assert done.returncode == -signal.SIGKILL
    [left] = list(tmp_path.iterdir())
    assert fsio.TEMPORARY_NAME.fullmatch(left.name)["target"] == "lora.safetensors"
    assert fsio.remove_abandoned(tmp_path, owns=_owns_lora, before=time.time() + 60) == [(left, 5000)]
    assert list(tmp_path.iterdir()) == []


def test_only_old_unheld_temporaries_of_the_callers_kind_are_removed(tmp_path):
    kept = [
        tmp_path / "lora.safetensors",  # a finished file
        tmp_path / ".lora.safetensors.tmp",  # not a temporary_beside name: no random part
        tmp_path / ".lora.safetensors.ABCD1234.tmp",  # tempfile's random part has no capitals
        tmp_path / ".notes.txt.abcd1234.tmp",  # not the caller's kind (owns says no)
        tmp_path / ".lora.safetensors.new12345.tmp",  # written after the run started
    ]
    for path in kept:
        path.write_bytes(b"keep")
        if "new" not in path.name:
            _old(path)
    file = tmp_path / ".lora-step00000010.safetensors.ab_12cd3.tmp"
    file.write_bytes(b"x" * 300)
    _old(file)
    state = tmp_path / ".state-00000010.k2j4h6g8.tmp"
    (state / "sub").mkdir(parents=True)
    (state / "training_state.pt").write_bytes(b"y" * 1000)
    (state / "sub" / "more").write_bytes(b"z" * 24)
    for path in (state / "sub" / "more", state / "sub", state / "training_state.pt", state):
        _old(path)
    touched_inside = tmp_path / ".state-00000020.qwertyui.tmp"  # its folder is old, but a file in it is new
    touched_inside.mkdir()
    (touched_inside / "lora_params.safetensors").write_bytes(b"new")
    _old(touched_inside)
    kept.append(touched_inside)
    (tmp_path / "target").write_bytes(b"outside")
    link = tmp_path / ".link.safetensors.zzzzzzzz.tmp"  # never a symlink, nor what it points to
    link.symlink_to(tmp_path / "target")
    kept.append(link)

    removed = fsio.remove_abandoned(tmp_path, owns=_owns_lora, before=time.time() - 30)
    assert sorted(removed) == sorted([(file, 300), (state, 1024)])
    assert not file.exists() and not state.exists()
    assert all(path.is_symlink() or path.exists() for path in kept) and (tmp_path / "target").read_bytes() == b"outside"


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_a_live_writers_temporary_is_never_removed(tmp_path, folder):
    """Another run writing into the same folder holds its temporary's lock for as long as the temporary exists, however
    old the temporary looks (a slow fsync of a large file)."""
    with fsio.temporary_beside(tmp_path / "lora.safetensors", folder=folder) as tmp:
        _old(tmp)
        assert fsio.remove_abandoned(tmp_path, owns=_owns_lora, before=time.time() + 60) == []
        assert tmp.exists()
    assert fsio.remove_abandoned(tmp_path, owns=_owns_lora, before=time.time() + 60) == [(tmp, 0)]  # released: abandoned


def test_without_locks_a_temporary_must_be_an_hour_old(tmp_path, monkeypatch):
    """Where flock is missing (Windows, some network file systems) a live writer cannot be told from a dead one: only
    a temporary unchanged for UNLOCKED_MIN_AGE goes."""
    monkeypatch.setattr(fsio, "fcntl", None)
    recent = tmp_path / ".a.safetensors.aaaaaaaa.tmp"
    recent.write_bytes(b"1")
    _old(recent, time.time() - 600)
    old = tmp_path / ".b.safetensors.bbbbbbbb.tmp"
    old.write_bytes(b"22")
    _old(old, time.time() - 2 * fsio.UNLOCKED_MIN_AGE)
    assert fsio.remove_abandoned(tmp_path, owns=_owns_lora, before=time.time()) == [(old, 2)]
    assert recent.exists()
    assert fsio.remove_abandoned(tmp_path / "missing", owns=_owns_lora, before=time.time()) == []


def test_temporary_beside_removes_its_temporary_when_the_block_fails(tmp_path):
    for folder in (False, True):
        with pytest.raises(KeyboardInterrupt):
            with fsio.temporary_beside(tmp_path / "x", folder=folder) as tmp:
                assert tmp.is_dir() == folder and fsio.TEMPORARY_NAME.fullmatch(tmp.name)["target"] == "x"
                raise KeyboardInterrupt
        assert list(tmp_path.iterdir()) == []


def test_without_locks_the_temporary_is_closed_before_it_is_deleted(tmp_path, monkeypatch):
    """Windows has no flock and cannot delete a file that is open (PermissionError): the descriptor opened to try the
    lock must be closed before the abandoned temporary is deleted, or it is never removed there."""
    monkeypatch.setattr(fsio, "fcntl", None)
    opened, real_open, real_close, real_unlink = {}, os.open, os.close, os.unlink

    def tracking_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = os.fspath(path)
        return fd

    def tracking_close(fd):
        opened.pop(fd, None)
        real_close(fd)

    def windows_unlink(path, *args, **kwargs):
        if os.fspath(path) in opened.values():
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_unlink(path, *args, **kwargs)

    old = tmp_path / ".b.safetensors.bbbbbbbb.tmp"
    old.write_bytes(b"22")
    _old(old)
    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "close", tracking_close)
    monkeypatch.setattr(os, "unlink", windows_unlink)
    assert fsio.remove_abandoned(tmp_path, owns=_owns_lora, before=time.time()) == [(old, 2)]
    assert not old.exists() and opened == {}
