"""Atomic file writes: a crash or Ctrl-C mid-save never leaves a half-written file behind.

Every output sd_lora writes (LoRA files, grids, configs) goes through `atomic_write_bytes`: the bytes go to a
temporary file in the same folder, are flushed and fsync'd, then renamed over the target. A rename within
one filesystem is atomic, so readers see either the old file or the new one. The file tools (convert,
merge, resize, extract) first `check_output_file`: never a folder, never one of their own inputs. What a
shared file may record of a path the user gave is its `public_name`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path, PureWindowsPath

from sd_lora.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync_folder: bool = True) -> Path:
    """Write `data` to `path` atomically; the previous file (if any) survives any failure before the rename.

    `sync_folder=False` skips the fsync of the folder after the rename, for a cache that writes many files and makes
    a missing one again: after a power cut the file may then be absent (or still the previous one), never partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0600; give the file the usual umask permissions
            os.fchmod(fd, _usual_mode(folder=False))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    if sync_folder:
        _fsync_dir(path.parent)
    return path


def temp_folder(parent: Path, name: str) -> Path:
    """A new hidden folder `.<name>.XXXX.tmp` in `parent` to fill and then rename into place, with the usual umask
    permissions (mkdtemp creates it 0700: a state folder other users of a shared machine could not read)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    usual_permissions(folder)
    return folder


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
