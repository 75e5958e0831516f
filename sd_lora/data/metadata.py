"""Captions from Hugging Face imagefolder metadata files: `metadata.jsonl`, one JSON object a line,
{"file_name": "a.png", "text": "..."}, with `file_name` relative to the file's own folder.

Only reads and checks the files; `scan` decides the caption priority (sidecar, then metadata, then folder name).
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PureWindowsPath

from sd_lora.data.images import IMAGE_EXTENSIONS

METADATA_FILE = "metadata.jsonl"


def read_metadata(
    root: Path, shown_root: Path, jsonl_files: list[Path], images: set[Path]
) -> tuple[dict[Path, str], list[str]]:
    """Captions from every metadata.jsonl, keyed by the image's logical path, and every problem found
    (each as "file:line: problem"). `images` are the scan's images; an entry must name one of them."""
    captions: dict[Path, str] = {}
    origin: dict[Path, str] = {}
    problems: list[str] = []
    for jsonl in jsonl_files:
        shown = shown_root / jsonl.relative_to(root)
        try:
            text = jsonl.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            problems.append(
                f"{shown}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8"
            )
            continue
        except OSError as e:
            problems.append(f"{shown}: cannot read file ({e.strerror or e})")
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{shown}:{number}"
            entry = _parse_metadata_line(line)
            if isinstance(entry, str):
                problems.append(f"{where}: {entry}")
                continue
            file_name, caption = entry
            target = _metadata_target(root, jsonl.parent, file_name, images)
            if isinstance(target, str):
                problems.append(f"{where}: {target}")
            elif target in origin:
                problems.append(
                    f"{where}: {file_name!r} already has a caption from {origin[target]}; keep one entry"
                )
            else:
                captions[target], origin[target] = caption, where
    return captions, problems


def _parse_metadata_line(line: str) -> tuple[str, str] | str:
    """(file_name, text) from one jsonl line, or the problem with it."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
    if not isinstance(entry, dict):
        example = '{"file_name": "a.png", "text": "..."}'
        return f"expected a JSON object like {example}, got {line.strip()[:60]}"
    for key in ("file_name", "text"):
        if key not in entry:
            return f"missing key {key!r}; each line needs \"file_name\" and \"text\""
        if not isinstance(entry[key], str):
            return f"{key!r} must be a string, got {json.dumps(entry[key])[:60]}"
    return entry["file_name"], entry["text"].strip()


def _metadata_target(root: Path, base: Path, file_name: str, images: set[Path]) -> Path | str:
    """The scanned image a metadata `file_name` names (relative to `base`), or the problem with it.

    Paths are compared lexically with the scan's own (symlinks followed by the scan stay usable); a name
    that leaves the data folder by `..`, an absolute path, or a symlink the scan does not follow is refused.
    """
    if not file_name:
        return "'file_name' is empty"
    if os.path.isabs(file_name) or PureWindowsPath(file_name).anchor:
        return f"file_name {file_name!r} is absolute; write it relative to the folder of this {METADATA_FILE}"
    target = Path(os.path.normpath(base / file_name))
    if not _is_within(target, root):
        return f"file_name {file_name!r} points outside the data folder; keep images inside it"
    if target in images:
        return target
    if not target.exists():
        return f"file_name {file_name!r} does not exist (looked for {target})"
    if not _is_within(target.resolve(), root.resolve()):
        return (f"file_name {file_name!r} resolves outside the data folder through a symlink; "
                "copy the image in")
    return (f"file_name {file_name!r} is not an image the scan uses (supported: "
            f"{', '.join(IMAGE_EXTENSIONS)}; names starting with '.' are skipped)")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents
