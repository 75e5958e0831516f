"""Scan a data folder into one `ImageRecord` per usable image: path, caption, repeats, size.

Layouts understood (they can be mixed):
  - kohya: `10_zkchar/a.png` repeats every image under the folder 10 times per epoch; "zkchar" is the
    caption of images that have none of their own.
  - sidecar captions: `a.png` + `a.txt` (the extension is configurable; `a.TXT` matches too, as on Windows).
  - Hugging Face imagefolder: a `metadata.jsonl` whose lines are {"file_name": "a.png", "text": "..."}, or a
    `metadata.csv` with `file_name` and `text` columns (see `metadata`).

Every image is fully decoded once here, and every problem in the folder is reported in one error, so a
broken file surfaces before training starts and the user can fix all of them in one pass. Pillow's warnings
about the files' metadata (a damaged EXIF block) are summarised in one line of the scan's warnings.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sd_lora.data import image_warnings
from sd_lora.data.captions import split_tags
from sd_lora.data.images import IMAGE_EXTENSIONS, ImageProblem, check_image, is_image_file
from sd_lora.data.metadata import METADATA_FILES, read_metadata
from sd_lora.data.ss_metadata import distinct_labels
from sd_lora.errors import UserError
from sd_lora.fsio import readable

MAX_LISTED_PROBLEMS = 50
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")  # kohya's N_name; "10_" repeats 10 times with no class token
_MANY_REPEATS = 1000  # above this a folder name like "20240101_photos" was probably not meant as repeats
# ... and above this it cannot be: every epoch lists each repeat (20240101_photos held up a run for minutes and GBs)
MAX_REPEATS = 100_000


@dataclass(frozen=True)
class ImageRecord:
    """One training image."""

    path: Path
    """Absolute, symlinks resolved."""
    caption: str
    caption_source: str
    """Where the caption came from: "sidecar", "metadata", "folder" or "default" (`scan_dataset`'s `default_caption`)."""
    repeats: int
    """Times the image is seen per epoch (kohya `N_name` folders; 1 otherwise)."""
    folder: str
    """Dataset folder label (`_folder_labels`): the repeat folder, else the image's own folder, relative to the root
    in posix form, or the root's own name for the images directly in it. It keys kohya's `ss_dataset_dirs`,
    `ss_reg_dataset_dirs` and `ss_tag_frequency` metadata."""
    width: int
    height: int
    """Size after EXIF orientation."""
    prior: bool = False
    """A regularisation (prior-preservation) image: its loss is weighted by --prior-loss-weight."""
    caption_as_read: str | None = None
    """The caption before a dataset config's caption_prefix / caption_suffix were added to it (None: `caption`, which
    has none). `ss_tag_frequency` counts its tags, as kohya counts the captions it read, not the ones it trains on."""


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """(absolute path, problem) of files left out with `skip_bad_images`."""
    warnings: list[str] = field(default_factory=list)
    """One summary line per kind of warning."""


@dataclass
class _Problems:
    """Problems found so far. `files` can be skipped with --skip-bad-images; `setup` cannot."""

    files: list[tuple[Path, Path, str]] = field(default_factory=list)  # (absolute, as shown, problem)
    setup: list[str] = field(default_factory=list)


def scan_dataset(root: Path, *, caption_extension: str = ".txt", skip_bad_images: bool = False, recursive: bool = True,
                 default_caption: str | None = None, exclude: dict[Path, str] | None = None,
                 taken_labels: Collection[str] = ()) -> ScanResult:
    """Find every image under `root` (recursively, sorted, hidden names skipped) and caption it.

    Caption priority: sidecar `<stem><caption_extension>` (in any letter case), then a `metadata.jsonl` or
    `metadata.csv` entry, then `default_caption` if given (kohya's class_tokens), else the folder name. Raises one `UserError` listing
    every problem; with `skip_bad_images`, unreadable images and caption files are left out and counted instead
    (metadata file and folder-name errors still raise). `recursive=False` reads only the images directly in
    `root`, as kohya reads a dataset config's image_dir (sub-folders are counted in a warning). The folders of
    `exclude`, {folder: why it is not read} (a run's output folders, its held-out and regularisation images, when
    they lie inside `root`), are not entered, with a warning saying why. `taken_labels`: the folder labels of another
    image set of the run (--data's, for --reg-data's), which this one's must not repeat (`_folder_labels`).
    """
    shown_root = Path(root)
    root_abs = _check_root(shown_root)
    _check_caption_extension(caption_extension)
    problems = _Problems()
    excluded = {Path(folder).resolve(): why for folder, why in (exclude or {}).items()}
    images, metadata_files, aliased_dirs, subfolders, left_out = _walk(root_abs, shown_root, problems, recursive, excluded)
    if not images and not problems.files:
        where = "in all sub-folders" if recursive else "directly in it, not in sub-folders"
        fix = "Put your images in this folder."
        if subfolders:  # kohya's layout (train/10_name/) given as one image_dir
            fix = (f"Its sub-folders (e.g. {subfolders[0]}) are not read, as kohya reads an image_dir: make each folder of "
                   "images a subset of its own (with a kohya N_name folder's N as its num_repeats), or pass this folder "
                   "with --data, which reads sub-folders and their N_name repeats.")
        raise UserError(
            f"{shown_root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} in any letter case, "
            f"{where}, skipping names that start with '.'). {fix}"
        )
    metadata, metadata_problems = read_metadata(root_abs, shown_root, metadata_files, set(images), recursive)
    problems.setup.extend(metadata_problems)
    folders = {image: _dataset_folder(root_abs, shown_root, image, problems) for image in images}
    labels = _folder_labels(root_abs, {folder for folder, _, _ in folders.values()}, taken_labels)

    with image_warnings.collect() as odd, ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(_checked_size, images))  # (odd: Pillow's warnings about their metadata, per image)

    records: list[ImageRecord] = []
    fallback, empty, empty_metadata, multiline = [], [], [], []
    listings: dict[Path, dict[str, list[str]]] = {}
    for image, size in zip(images, sizes):
        shown = shown_root / image.relative_to(root_abs)
        if isinstance(size, ImageProblem):
            problems.files.append((image, shown, size.problem))
            continue
        folder, repeats, folder_caption = folders[image]
        try:
            sidecar = _read_sidecar(_sidecar_path(image, caption_extension, listings))
        except UserError as e:
            problems.files.append((image, shown, str(e)))
            continue
        if sidecar is not None:
            caption, source = sidecar, "sidecar"
            if not split_tags(caption):  # nothing but whitespace and commas
                caption = ""
                empty.append(shown)
            elif "\n" in caption:
                multiline.append(shown)
        elif image in metadata:
            caption, source = metadata[image], "metadata"
            if not split_tags(caption):  # "" or ",": kohya and diffusers would train on it as it is
                caption = ""
                empty_metadata.append(shown)
        elif default_caption is not None:
            caption, source = default_caption, "default"
            fallback.append((shown, caption))
        else:
            caption, source = folder_caption, "folder"
            fallback.append((shown, caption))
        records.append(
            ImageRecord(image.resolve(), caption, source, repeats, labels[folder], size[0], size[1])
        )

    _raise_if_problems(problems, skip_bad_images)
    warnings = _root_name_warning(shown_root, root_abs) if recursive else []
    if fallback and default_caption is not None:
        example = fallback[0][0]
        what = f"the class tokens {default_caption!r}" if default_caption else "an empty caption (no class tokens given)"
        warnings.append(f"{_count(len(fallback), 'image has', 'images have')} no {caption_extension} caption file or "
                        f"metadata entry; using {what} (e.g. {example}){_other_extension_hint(fallback, caption_extension)}")
    elif fallback:
        example, caption = fallback[0]
        warnings.append(
            f"{_count(len(fallback), 'image has', 'images have')} no {caption_extension} caption file or metadata entry; "
            f"using the folder name as caption (e.g. {example} -> {caption!r}){_other_extension_hint(fallback, caption_extension)}"
        )
        unnamed = [shown for shown, caption in fallback if not caption]
        if unnamed:
            warnings.append(f"{_count(len(unnamed), 'image trains', 'images train')} with an empty caption: no caption file, "
                            f"and its N_ folder has no name after the repeat count (e.g. {unnamed[0]})")
    if empty:
        warnings.append(f"{_count(len(empty), 'caption file is', 'caption files are')} empty (e.g. "
                        f"{empty[0]}); those images train with an empty caption")
    if empty_metadata:
        warnings.append(f"{_count(len(empty_metadata), 'metadata caption is', 'metadata captions are')} empty or only commas (e.g. "
                        f"the text of {empty_metadata[0]}); those images train with an empty caption")
    if multiline:
        warnings.append(f"{_count(len(multiline), 'caption file has', 'caption files have')} more than one "
                        f"line (e.g. {multiline[0]}); all lines are used (kohya uses only the first)")
    for label, repeats in sorted({(r.folder, r.repeats) for r in records if r.repeats > _MANY_REPEATS}):
        warnings.append(f"folder {label!r} repeats its images {repeats} times per epoch (kohya N_name "
                        "folder); rename it if the number is not meant as a repeat count")
    if subfolders:
        warnings.append(f"{_count(len(subfolders), 'sub-folder is', 'sub-folders are')} not read (e.g. {subfolders[0]}): "
                        "only the images directly in the folder are, as kohya reads an image_dir")
    for folder, why in left_out:
        warnings.append(f"{folder} not read: {why}")
    if aliased_dirs:
        warnings.append(f"{_count(len(aliased_dirs), 'folder is', 'folders are')} the same folder as one "
                        f"already scanned (symlinks, e.g. {aliased_dirs[0]}); scanned once")
    if odd_metadata := odd.summary(lambda image: shown_root / image.relative_to(root_abs)):
        warnings.append(odd_metadata)
    if problems.files:
        warnings.append(f"skipped {_count(len(problems.files), 'bad file', 'bad files')} "
                        f"(--skip-bad-images), e.g. {_file_line(problems.files[0])}")
    if not records:
        bad = _count(len(problems.files), "bad file", "bad files")
        raise UserError(f"{shown_root}: no usable images ({bad}, e.g. {_file_line(problems.files[0])}); "
                        "fix them and run again")
    skipped = [(path, problem) for path, _, problem in problems.files]
    return ScanResult(records=records, skipped=skipped, warnings=warnings)


def _check_root(root: Path) -> Path:
    if not root.exists():
        raise UserError(f"{root}: data folder does not exist ({Path(os.path.abspath(root))}); check the path")
    if not root.is_dir():
        raise UserError(f"{root}: is a file, not a folder; pass the folder that holds the training images")
    return Path(os.path.abspath(root))


def _check_caption_extension(extension: str) -> None:
    if not extension.startswith(".") or len(extension) < 2 or "/" in extension:
        raise UserError(f"caption extension {extension!r} must start with a dot, e.g. '.txt' or '.caption'")
    if extension.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"caption extension {extension!r} is an image extension; use e.g. '.txt'")


def _walk(root: Path, shown_root: Path, problems: _Problems, recursive: bool = True, excluded: dict[Path, str] | None = None):
    """Images and metadata files under `root` (logical paths, sorted), folders seen twice, (not `recursive`)
    the sub-folders left unread, and (folder, why) for the folders of `excluded` ({resolved path: why}) that were
    found and left out.

    Symlinks are followed; a folder whose resolved path was already visited is not entered again, which
    both stops symlink loops and keeps an image reachable twice from being trained twice.
    """
    images, metadata_files, aliased, unread, left_out = [], [], [], [], []
    visited = {root.resolve()}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            shown = shown_root / folder.relative_to(root)
            problems.files.append((folder, shown, f"cannot read folder ({e.strerror or e})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir = is_file = False  # e.g. a symlink pointing at itself
            if not (is_dir or is_file):
                if is_image_file(path):  # never opened: a FIFO would block the scan forever
                    shown = shown_root / path.relative_to(root)
                    problems.files.append((path, shown, _not_a_file(path)))
                continue
            resolved = path.resolve() if is_dir else None
            if is_dir and resolved in (excluded or {}):
                left_out.append((shown_root / path.relative_to(root), excluded[resolved]))
            elif is_dir and not recursive:
                unread.append(shown_root / path.relative_to(root))
            elif is_dir:
                if resolved in visited:
                    aliased.append(shown_root / path.relative_to(root))
                else:
                    visited.add(resolved)
                    pending.append(path)
            elif is_file and is_image_file(path):
                images.append(path)
            elif is_file and entry.name in METADATA_FILES:
                metadata_files.append(path)
    order = lambda p: p.relative_to(root).parts  # noqa: E731
    return sorted(images, key=order), sorted(metadata_files, key=order), sorted(aliased), unread, left_out


def _other_extension_hint(uncaptioned: list[tuple[Path, str]], caption_extension: str) -> str:
    """A hint when uncaptioned images have captions under another common extension (kohya's default is .caption)."""
    for other in (".txt", ".caption"):
        if other != caption_extension and any(shown.with_suffix(other).is_file() for shown, _ in uncaptioned):
            return f"; they have {other} files beside them: set the caption extension to {other!r}"
    return ""


def _not_a_file(path: Path) -> str:
    """Why an image-named entry that is neither a file nor a folder (even through symlinks) cannot be used."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symlink loop ({os.readlink(path)} leads back to itself); point it at the image file"
        return f"broken symlink ({os.readlink(path)}); point it at an existing image or remove it"
    return "not a regular file (a pipe, socket or device); replace it with the image file"


def _dataset_folder(root: Path, shown_root: Path, image: Path, problems: _Problems) -> tuple[tuple[str, ...], int, str]:
    """(dataset folder relative to `root`, as readable names; () for `root` itself, repeats, fallback caption) for an
    image, from its nearest kohya `N_name` folder."""
    folders = tuple(map(readable, image.relative_to(root).parts[:-1]))
    for depth in range(len(folders), 0, -1):
        match = _REPEAT_FOLDER.match(folders[depth - 1])
        if match:
            label = PurePosixPath(*folders[:depth]).as_posix()  # (for the messages)
            repeats = int(match[1])
            problem = None
            if repeats < 1:
                problem = (f"{shown_root / label}: folder gives {repeats} repeats; kohya repeat folders are "
                           f"named N_name with N >= 1 (e.g. 1_{match[2]}); rename it")
            elif repeats > MAX_REPEATS:
                problem = (f"{shown_root / label}: folder name gives {repeats} repeats per epoch (kohya N_name folder), "
                           f"more than {MAX_REPEATS:,}; if the number is part of the name (a date?), rename it "
                           f"1_{folders[depth - 1]}, else use a smaller count")
            if problem and problem not in problems.setup:
                problems.setup.append(problem)
            return folders[:depth], max(repeats, 1), match[2]
    name = folders[-1] if folders else readable(root.name)
    match = _REPEAT_FOLDER.match(name)
    return folders, 1, match[2] if match else name.replace("_", " ")


def _folder_labels(root: Path, folders: set[tuple[str, ...]], taken: Collection[str]) -> dict[tuple[str, ...], str]:
    """{dataset folder relative to `root` (`_dataset_folder`): its label in kohya's metadata}: its path relative to
    `root` (`10_zk`, `chars/3_me`), and for `root` itself its name, as kohya labels an image_dir by its name ("."
    labelled --data's and --reg-data's images alike, and their tags were counted as one folder's); parent folders
    are added where that would not tell it from another folder or from a label in `taken` (`ss_metadata.distinct_labels`)."""
    root_names = tuple(map(readable, root.parts[1:]))  # (its anchor, "/" or a drive, is not a folder name)
    order = sorted(folders)
    labels = distinct_labels([root_names + folder for folder in order], [len(folder) for folder in order], taken)
    return dict(zip(order, labels))


def _root_name_warning(shown_root: Path, root: Path) -> list[str]:
    match = _REPEAT_FOLDER.match(root.name)
    if not match:
        return []
    return [f"the data folder itself is named {root.name!r}, but repeat counts come from folders inside "
            f"it, so its images repeat once; pass its parent folder ({shown_root.parent}) to repeat them "
            f"{match[1]} times"]


def _checked_size(path: Path) -> tuple[int, int] | ImageProblem:
    try:
        return check_image(path)
    except ImageProblem as problem:
        return problem


def _sidecar_path(image: Path, extension: str, listings: dict[Path, dict[str, list[str]]]) -> Path | None:
    """The caption file of `image`: `<stem><extension>` exactly, else the one file whose name differs only in letter
    case (`a.TXT`, as Windows, where datasets are often made, matches it) unless it is another image's exact caption
    file (`A.PNG` beside `a.png` and `a.txt`), else None. `listings` caches each folder's names by their lower-case form."""
    exact = image.parent / (image.stem + extension)
    if exact.exists():
        return exact
    if image.parent not in listings:
        names: dict[str, list[str]] = {}
        for name in sorted(os.listdir(image.parent)):
            names.setdefault(name.lower(), []).append(name)
        listings[image.parent] = names
    names = listings[image.parent]
    matches = names.get(exact.name.lower(), [])
    if len(matches) > 1:
        raise UserError(f"caption files {' and '.join(matches)} differ only in letter case; keep one of them, named "
                        f"{exact.name}")
    if not matches:
        return None
    owner = matches[0][:-len(extension)] if matches[0].endswith(extension) else None  # the image it is the exact caption of
    owned = owner is not None and any(Path(name).stem == owner for suffix in IMAGE_EXTENSIONS
                                      for name in names.get((owner + suffix).lower(), []))
    if owned:  # kohya (on Linux) gives this image no caption file either: never another image's caption
        return None
    return image.parent / matches[0]


def _read_sidecar(path: Path | None) -> str | None:
    """The caption in `path` (BOM and surrounding whitespace stripped), None if there is no such file."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as e:
        raise UserError(f"cannot read caption file {path.name} ({e.strerror or e})") from e
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows Notepad's "Unicode"
        raise UserError(f"caption file {path.name} is UTF-16 (it starts with a UTF-16 byte-order mark); re-save it as UTF-8")
    if b"\x00" in data:  # UTF-16 saved without a byte-order mark decodes as UTF-8 with a NUL in every other byte
        raise UserError(f"caption file {path.name} holds NUL bytes (byte {data.index(0)}): it is UTF-16 without a "
                        "byte-order mark, or not text; re-save it as UTF-8")
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise UserError(
            f"caption file {path.name} is not valid UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8"
        ) from e


def _raise_if_problems(problems: _Problems, skip_bad_images: bool) -> None:
    listed_files = [] if skip_bad_images else [_file_line(entry) for entry in problems.files]
    lines = problems.setup + listed_files
    if not lines:
        return
    shown = lines[:MAX_LISTED_PROBLEMS]
    if len(lines) > len(shown):
        shown.append(f"and {len(lines) - len(shown)} more")
    fixes = []
    if problems.setup:
        fixes.append(
            f"Fix the {'/'.join(METADATA_FILES)} lines and folder names above "
            "(--skip-bad-images does not skip them)."
        )
    if listed_files:
        fixes.append("Fix or remove these files, or pass --skip-bad-images to skip them.")
    body = "\n".join(f"  {line}" for line in shown)
    heading = f"{_count(len(lines), 'problem', 'problems')} in the training data:"
    raise UserError(f"{heading}\n{body}\n" + "\n".join(fixes))


def _file_line(entry: tuple[Path, Path, str]) -> str:
    _, shown, problem = entry
    return f"{shown}: {problem}"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def fingerprint(records: list[ImageRecord]) -> str:
    """A short hash of what training sees: paths, captions, repeats, sizes and file lengths.

    A resumed run compares it with the saved one, so changed images or captions are noticed.
    """
    import hashlib

    h = hashlib.sha256()
    for r in records:
        prior = "\0prior" if r.prior else ""  # (only when set: fingerprints of runs without regularisation stay as they were)
        line = f"{r.path}\0{r.caption}\0{r.repeats}\0{r.width}x{r.height}\0{r.path.stat().st_size}{prior}\n"
        h.update(line.encode("utf-8", "surrogateescape"))  # a file name's non-UTF-8 bytes as they are on disk
    return h.hexdigest()[:16]
