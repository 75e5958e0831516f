"""Pillow's per-image warnings are collected against the image each thread decodes; every other warning is untouched."""

from __future__ import annotations

import threading
import warnings

from helpers import odd_exif_photo

from sd_lora.data import image_warnings
from sd_lora.data.images import check_image, open_image_resized


def test_warnings_are_counted_against_the_image_each_thread_decodes(tmp_path):
    paths = [odd_exif_photo(tmp_path / f"{i}.jpg", entries=2 + i) for i in range(4)]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        with image_warnings.collect() as found:
            threads = [threading.Thread(target=check_image, args=(p,)) for p in paths]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            open_image_resized(paths[0], (24, 32))  # decoded again: counted again, still one image
            warnings.warn("not Pillow's")  # passes through, as outside the block
        assert warnings.filters == filters  # restored
    assert [str(w.message) for w in shown] == ["not Pillow's"]
    assert sorted(found.by_image) == paths
    assert set(found.by_image[paths[1]]) == {"Metadata Warning, tag 296 had too many entries: 3, expected 1"}
    assert found.summary(lambda p: p.name) == (
        "4 images have EXIF or other metadata that Pillow could not fully read (0.jpg, 1.jpg, 2.jpg and 1 more; Pillow: "
        "'Metadata Warning, tag 296 had too many entries: 2, expected 1' and 3 other messages). They train as decoded, but "
        "what Pillow skipped is lost, an orientation tag with it: rotate any that show on their side, and save them "
        "without the damaged metadata (e.g. exiftool -all= FILE, or re-save them in an image editor) to silence this")


def test_nothing_to_say_without_warnings_and_a_worker_drops_them(tmp_path):
    plain = tmp_path / "plain.jpg"
    odd_exif_photo(tmp_path / "odd.jpg")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(plain)
    with image_warnings.collect() as found:
        check_image(plain)
    assert found.summary() is None
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        image_warnings.drop_in_worker(0)
        assert check_image(tmp_path / "odd.jpg") == (48, 64)
    assert shown == []
