"""Captions from Hugging Face imagefolder metadata files, as the diffusers training examples use them.

  - `metadata.jsonl`: one JSON object a line, {"file_name": "a.png", "text": "..."}.
  - `metadata.csv`: a header row naming a `file_name` and a `text` column (other columns are ignored), then
    one row per image; a caption holding commas, quotes or line breaks is quoted ("red hair, smile").

`file_name` is relative to the metadata file's own folder. A folder holds one of the two, not both. This
module only reads and checks the files; `scan` decides the caption priority (sidecar, metadata, folder name).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath

from sd_lora.data.images import IMAGE_EXTENSIONS
from sd_lora.fsio import is_within

JSONL_FILE, CSV_FILE = "metadata.jsonl", "metadata.csv"
METADATA_FILES = (JSONL_FILE, CSV_FILE)
_COLUMNS = ("file_name", "text")

Entry = tuple[str, str] | str
"""(file_name, caption) from one line or row, or the problem with it."""


def read_metadata(
    root: Path, shown_root: Path, metadata_files: list[Path], images: set[Path], recursive: bool = True
) -> tuple[dict[Path, str], list[str]]:
    """Captions from every metadata file, keyed by the image's logical path, and every problem found
    (each as "file:line: problem"). `images` are the scan's images; an entry must name one of them
    (`recursive=False`: the scan read only the images directly in `root`)."""
    captions: dict[Path, str] = {}
    origin: dict[Path, str] = {}
    problems: list[str] = []
    for path in _one_per_folder(root, shown_root, metadata_files, problems):
        shown = shown_root / path.relative_to(root)
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            problems.append(
                f"{shown}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8"
            )
            continue
        except OSError as e:
            problems.append(f"{shown}: cannot read file ({e.strerror or e})")
            continue
        entries = _csv_entries(text) if path.name == CSV_FILE else _jsonl_entries(text)
        for number, entry in entries:
            where = f"{shown}:{number}"
            if isinstance(entry, str):
                problems.append(f"{where}: {entry}")
                continue
            file_name, caption = entry
            target = _metadata_target(root, path, file_name, images, recursive)
            if isinstance(target, str):
                problems.append(f"{where}: {target}")
            elif target in origin:
                problems.append(
                    f"{where}: {file_name!r} already has a caption from {origin[target]}; keep one entry"
                )
            else:
                captions[target], origin[target] = caption, where
    return captions, problems


def _one_per_folder(root: Path, shown_root: Path, metadata_files: list[Path], problems: list[str]) -> list[Path]:
    """`metadata_files` less the folders that hold both kinds: which captions apply there is ambiguous."""
    by_folder: dict[Path, list[Path]] = {}
    for path in metadata_files:
        by_folder.setdefault(path.parent, []).append(path)
    kept = []
    for folder, paths in by_folder.items():
        if len(paths) == 1:
            kept.extend(paths)
            continue
        shown = shown_root / folder.relative_to(root)
        problems.append(f"{shown / JSONL_FILE} and {shown / CSV_FILE}: both give captions for the same folder, "
                        "so which one applies is ambiguous; keep one, moving any entries it lacks into it, "
                        "and remove the other")
    return kept


def _jsonl_entries(text: str) -> Iterator[tuple[int, Entry]]:
    """(line number, entry) for every non-blank line of a metadata.jsonl."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, _parse_metadata_line(line)


def _parse_metadata_line(line: str) -> Entry:
    """(file_name, text) from one jsonl line, or the problem with it."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
    if not isinstance(entry, dict):
        example = '{"file_name": "a.png", "text": "..."}'
        return f"expected a JSON object like {example}, got {line.strip()[:60]}"
    for key in _COLUMNS:
        if key not in entry:
            return f"missing key {key!r}; each line needs \"file_name\" and \"text\""
        if not isinstance(entry[key], str):
            return f"{key!r} must be a string, got {json.dumps(entry[key])[:60]}"
    return entry["file_name"], entry["text"].strip()


def _csv_entries(text: str) -> Iterator[tuple[int, Entry]]:
    """(line number where the row starts, entry) for every row of a metadata.csv after its header.

    Rows are read by Python's csv module (quoted fields may hold commas and line breaks); blank rows are
    skipped. `strict`, so that an unclosed quote is reported instead of swallowing every row after it. A
    header problem or a CSV syntax error ends the file: nothing after it can be trusted.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    columns: list[str] | None = None
    line = 1
    try:
        for row in reader:
            start, line = line, reader.line_num + 1
            if not any(field.strip() for field in row):
                continue
            if columns is None:
                columns = row
                problem = _header_problem(columns)
                if problem:
                    yield start, problem
                    return
                continue
            yield start, _parse_csv_row(row, columns)
    except csv.Error as e:
        yield line, (f"invalid CSV ({e}); a field with commas, quotes or line breaks must be wholly quoted, "
                     'with quotes inside it doubled: "a ""quoted"" word, and more"')


def _header_problem(columns: list[str]) -> str | None:
    for key in _COLUMNS:
        if key not in columns:
            return (f"the header row has no {key!r} column (it has {', '.join(map(repr, columns))}); "
                    "the first row must name the columns, e.g. file_name,text")
        if columns.count(key) > 1:
            return f"the header row has {columns.count(key)} {key!r} columns; keep one"
    return None


def _parse_csv_row(row: list[str], columns: list[str]) -> Entry:
    """(file_name, text) from one csv row, or the problem with it."""
    if len(row) > len(columns):
        return (f"{len(row)} fields, but the header names {len(columns)} columns; quote a caption that "
                'holds commas: a.png,"red hair, smile"')
    values = dict(zip(columns, row))
    for key in _COLUMNS:
        if not values.get(key, "").strip():
            return (f"no {key!r} value; every row needs a file_name and a text (for an empty caption, "
                    "put an empty .txt file beside the image instead)")
    return values["file_name"], values["text"].strip()


def _metadata_target(root: Path, metadata_file: Path, file_name: str, images: set[Path], recursive: bool = True) -> Path | str:
    """The scanned image a `file_name` in `metadata_file` names (relative to its folder), or the problem.

    Paths are compared lexically with the scan's own (symlinks followed by the scan stay usable); a name
    that leaves the data folder by `..`, an absolute path, or a symlink the scan does not follow is refused.
    """
    if not file_name:
        return "'file_name' is empty"
    if os.path.isabs(file_name) or PureWindowsPath(file_name).anchor:
        return (f"file_name {file_name!r} is absolute; write it relative to the folder of this "
                f"{metadata_file.name}")
    target = Path(os.path.normpath(metadata_file.parent / file_name))
    if not is_within(target, root):
        return f"file_name {file_name!r} points outside the data folder; keep images inside it"
    if target in images:
        return target
    if not target.exists():
        return f"file_name {file_name!r} does not exist (looked for {target})"
    if not is_within(target.resolve(), root.resolve()):
        return (f"file_name {file_name!r} resolves outside the data folder through a symlink; "
                "copy the image in")
    if not recursive and target.parent != root:
        return (f"file_name {file_name!r} is in a sub-folder, which is not read (only the images directly in the folder "
                "are, as kohya reads an image_dir); move the image up and fix its file_name, or remove this line")
    return (f"file_name {file_name!r} is not an image the scan uses (supported: "
            f"{', '.join(IMAGE_EXTENSIONS)}; names starting with '.' are skipped)")

