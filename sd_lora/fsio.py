"""Atomic file writes: a crash or Ctrl-C mid-save never leaves a half-written file behind.

Every output sd_lora writes (LoRA files, grids, configs) goes through `atomic_write_bytes`: the bytes go to a
temporary file in the same folder, are flushed and fsync'd, then renamed over the target. A rename within
one filesystem is atomic, so readers see either the old file or the new one. The file tools (convert,
merge, resize, extract) first `check_output_file`: never a folder, never one of their own inputs. What a
shared file may record of a path the user gave is its `public_name`.

Only a process killed outright (`kill -9`, the kernel's OOM killer, a power cut) runs no clean-up and leaves its
temporary behind: `remove_abandoned` deletes those when the next run starts.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from sd_lora.errors import UserError


TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
"""The name of every temporary `temporary_beside` makes: `.<target's name>.XXXXXXXX.tmp` (tempfile's 8 random characters)."""

UNLOCKED_MIN_AGE = 3600.0
"""Seconds a temporary must have stood unchanged before `remove_abandoned` deletes it where locks cannot tell whether
its writer lives (Windows, a file system without `flock`)."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync_folder: bool = True) -> Path:
    """Write `data` to `path` atomically; the previous file (if any) survives any failure before the rename.

    `sync_folder=False` skips the fsync of the folder after the rename, for a cache that writes many files and makes
    a missing one again: after a power cut the file may then be absent (or still the previous one), never partial."""
    path = Path(path)
    with temporary_beside(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if sync_folder:
        _fsync_dir(path.parent)
    return path


@contextmanager
def temporary_beside(path: Path, *, folder: bool = False) -> Iterator[Path]:
    """A new, empty, hidden file (with `folder`, a folder) `.<name>.XXXXXXXX.tmp` beside `path`, for the block to fill
    and rename over `path`. It has the usual umask permissions (mkstemp and mkdtemp create theirs 0600 and 0700: a
    model other users of a shared machine could not read). It is removed if the block raises (also on Ctrl-C), and
    locked (`flock`) until the block ends, which tells `remove_abandoned` that its writer is alive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = None
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        lock, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
    try:
        if folder:
            lock = _open_to_lock(tmp)
        if lock is not None and not _lock(lock):
            os.close(lock)  # no locks here (Windows), where an open file could not be renamed either
            lock = None
        usual_permissions(tmp)
        yield tmp
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def remove_abandoned(folder: Path, *, owns: Callable[[str], bool], before: float) -> list[tuple[Path, int]]:
    """Delete the temporaries of `temporary_beside` that a killed writer left in `folder` (not in its sub-folders), and
    return each one's path and size in bytes (a folder's: its files'). A missing `folder` has none.

    Only names `temporary_beside` gives are looked at, and only those whose target name `owns` accepts (the caller's
    kind of file: `owns("lora.safetensors")` for `.lora.safetensors.a1b2c3d4.tmp`); nothing else is ever touched.
    Such a temporary is abandoned, and removed, when no live process can be writing it:
    - its writer holds no lock on it: `temporary_beside` keeps one until its block ends, and the system drops a
      process's locks when it dies, however it dies. This is what keeps the temporaries of another run writing into
      the same folder (or a tool's, or another machine's on a network file system with locks) safe;
    - and nothing in it changed at or after `before` (the start of the calling process): that covers the instant
      between a temporary's creation and its lock, and writers from before the locks.
    Where a lock cannot be tried (Windows, a file system without `flock`), it must also have stood unchanged for
    `UNLOCKED_MIN_AGE` (an hour). A temporary that cannot be opened or deleted (another user's) is left alone."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:  # missing, or not a folder this process may list
        return []
    removed = []
    for entry in entries:
        match = TEMPORARY_NAME.fullmatch(entry.name)
        if not match or not owns(match["target"]):
            continue
        path = Path(entry.path)
        try:
            info = path.lstat()  # never a symlink: temporary_beside makes none
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                continue
            lock = _open_to_lock(path)
        except OSError:
            continue
        try:
            held = _lock(lock) if lock is not None else None
            if held is False:  # a live writer's
                continue
            size, changed = _size_and_last_change(path)
            cutoff = before if held else min(before, time.time() - UNLOCKED_MIN_AGE)
            if changed >= cutoff:
                continue
            if not held and lock is not None:  # no lock to keep, and Windows cannot delete a file that is open
                os.close(lock)
                lock = None
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        finally:
            if lock is not None:
                os.close(lock)
        removed.append((path, size))
    return removed


def held_by_writer(path: Path) -> bool:
    """Whether a live process holds `path`'s lock, as `temporary_beside` does on its temporary until its block ends
    (False where locks cannot tell: Windows, a file system without `flock`; or where `path` cannot be opened)."""
    try:
        lock = _open_to_lock(path)
    except OSError:
        return False
    if lock is None:
        return False
    try:
        return _lock(lock) is False
    finally:
        os.close(lock)


def _open_to_lock(path: Path) -> int | None:
    """A descriptor of file or folder `path` to `flock`; None where a folder cannot be opened (Windows)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except PermissionError:
        if path.is_dir():
            return None
        raise


def _lock(fd: int) -> bool | None:
    """Take an exclusive `flock` on `fd` without waiting: True when taken, False when another open file holds one,
    None where there are no locks (Windows, a file system without them)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP ...
        return None
    return True


def _size_and_last_change(path: Path) -> tuple[int, float]:
    """Bytes of the file, or of every file in the folder, and the newest modification time in it."""
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size, info.st_mtime
    size, changed = 0, info.st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs:
            changed = max(changed, os.lstat(os.path.join(root, name)).st_mtime)
        for name in files:
            child = os.lstat(os.path.join(root, name))
            changed, size = max(changed, child.st_mtime), size + child.st_size
    return size, changed


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of the file's bytes, read a MiB at a time (hashlib releases the GIL: threads hash files in
    parallel)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def usual_permissions(path: Path) -> None:
    """Give `path` the permissions a plain `open()` or `mkdir()` would: 0666 for a file, 0777 for a folder, less the
    umask (mkdtemp and safetensors' `save_file` create theirs 0700 and 0600)."""
    os.chmod(path, _usual_mode(folder=path.is_dir()))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output_file(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str) -> None:
    """Refuse, as a `UserError`, an output file that is an existing folder (the rename would fail with a
    traceback), one below a file (so would the mkdir of its folder) or the same file as one of `inputs` (also through
    a symlink, a hard link or `./`): the tool would replace the file it reads. `flag` names the argument in the
    message ("OUT", "--output")."""
    output = Path(output)
    if output.is_dir():
        raise UserError(f"{flag} {output}: is a folder; name the file to write, e.g. {output / 'lora.safetensors'}")
    # A missing folder is created (`atomic_write_bytes`), but not where a file stands: mkdir would fail with a traceback.
    if blocking := next((p for p in output.parents if p.exists() and not p.is_dir()), None):
        raise UserError(f"{flag} {output}: {blocking} is a file, not a folder, so nothing can be written inside it; "
                        "choose another output path")
    for source in inputs:
        if output.exists() and Path(source).exists() and os.path.samefile(output, source):
            raise UserError(f"{flag} {output}: the output would overwrite the input {source}; "
                            "choose another output file")


def readable(name: str | os.PathLike) -> str:
    """`name` as valid text: bytes of a file name that are not UTF-8 (a Windows zip unpacked on Linux: Python
    holds them as lone surrogates, which no UTF-8 writer accepts) become U+FFFD. For captions, labels and
    metadata; open files by the original path."""
    return os.fsencode(name).decode("utf-8", "replace")


def is_within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it, by the paths as given (resolve them first to follow symlinks)."""
    return path == folder or folder in path.parents


def _usual_mode(folder: bool) -> int:
    return (0o777 if folder else 0o666) & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def public_name(value: str) -> str:
    """What a shared file may say about a path the user gave: a local file or folder's basename (as kohya writes
    ss_sd_model_name); anything else, such as a Hugging Face Hub id ("runwayml/stable-diffusion-v1-5"), whole."""
    if "\\" in value or re.match(r"[A-Za-z]:[\\/]", value):  # a Windows path
        return PureWindowsPath(value).name
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith(".") or path.exists():
        return path.name or path.resolve().name  # "." names the current folder
    return value
