"""Pillow's warnings about the metadata of image files, counted per image and summarised in one line.

Pillow warns, rather than fails, when it cannot fully read an image's metadata: a damaged or non-standard EXIF block
("Truncated File Read", "Metadata Warning, tag 296 had too many entries: 4, expected 1", "Tag data larger than
file ..."), common in phone photos, or a malformed MPO or APNG block. Printed as they come, a folder of 500 photos
from one phone printed up to 500 such lines (their texts differ in the numbers, so Python's once-per-text rule let
each through, and again in every DataLoader worker), none naming a file. The picture itself decodes and trains;
what is lost is the metadata Pillow skipped, the orientation tag among it at worst.

Inside `collect()`, the warnings Pillow raises while a thread decodes an image (`images.py` marks the file with
`decoding(path)`) go to an `ImageWarnings` that keeps them per image, whichever thread decoded it; every other
warning is shown as before. `scan_dataset`, which decodes every image, reports its `summary()` with its other
warnings. Decoding the same files again (the latent cache, the training batches) collects and drops them: the scan
reported them already.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SHOWN_FILES = 3  # files named in the summary; the rest are counted
_decoding = threading.local()  # .path: the image file this thread is decoding, if any


@contextmanager
def decoding(path: Path) -> Iterator[None]:
    """Mark `path` as the file this thread decodes: Pillow's warnings meanwhile are about it (see `collect`)."""
    outer = getattr(_decoding, "path", None)
    _decoding.path = Path(path)
    try:
        yield
    finally:
        _decoding.path = outer


class ImageWarnings:
    """Pillow's warnings diverted by `collect`, as {image path: [messages]}."""

    def __init__(self):
        self.by_image: dict[Path, list[str]] = {}
        self._lock = threading.Lock()  # several threads decode at once

    def add(self, path: Path, message: str) -> None:
        with self._lock:
            self.by_image.setdefault(path, []).append(message)

    def summary(self, shown: Callable[[Path], object] = str) -> str | None:
        """The one line that says how many images had unreadable metadata, an example of Pillow's messages, the first
        files (named as `shown(path)` gives them, e.g. below the folder the user named) and what to do; None if none."""
        if not self.by_image:
            return None
        paths = sorted(self.by_image)
        messages = list(dict.fromkeys(m for p in paths for m in self.by_image[p]))  # first seen first
        names = ", ".join(str(shown(p)) for p in paths[:SHOWN_FILES])
        more = f" and {len(paths) - SHOWN_FILES} more" if len(paths) > SHOWN_FILES else ""
        others = f" and {len(messages) - 1} other message{'s' * (len(messages) > 2)}" if len(messages) > 1 else ""
        has = "image has" if len(paths) == 1 else "images have"
        return (f"{len(paths)} {has} EXIF or other metadata that Pillow could not fully read ({names}{more}; Pillow: "
                f"{messages[0]!r}{others}). They train as decoded, but what Pillow skipped is lost, an orientation tag with "
                "it: rotate any that show on their side, and save them without the damaged metadata (e.g. exiftool -all= "
                "FILE, or re-save them in an image editor) to silence this")


@contextmanager
def collect() -> Iterator[ImageWarnings]:
    """Divert to the `ImageWarnings` given the warnings Pillow raises while any thread decodes an image in `decoding`,
    every one (Python would show a text only once). Enter it in the thread that starts the decoding threads, around
    all of them: it changes the process's warning filters until it ends (`warnings.catch_warnings`), which is not
    safe to enter from several threads at once."""
    found = ImageWarnings()
    with warnings.catch_warnings():
        show = warnings.showwarning

        def divert(message, category, filename, lineno, file=None, line=None):
            path = getattr(_decoding, "path", None)
            if path is not None and _from_pillow(category, filename):
                found.add(path, str(message))
            else:
                show(message, category, filename, lineno, file, line)

        warnings.filterwarnings("always", category=UserWarning, module=r"PIL\.")
        warnings.showwarning = divert
        yield found


def drop_in_worker(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: a worker process decodes images the scan has reported on, so it drops Pillow's
    warnings about them (the process is the worker's alone, so its filters may change for good)."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def _from_pillow(category: type[Warning], filename: str) -> bool:
    """A plain UserWarning raised in Pillow's code (not its DecompressionBombWarning: `images.py` refuses those images)."""
    return category is UserWarning and Path(filename).parent.name == "PIL"
